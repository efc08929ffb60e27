"""Mixed-precision bit-width search (NSGA-III, pymoo) over per-layer weight/activation bits.

    from qtool.bitsearch import SearchProblem, NSGA3Config, SupernetEvaluator, LocalExecutor, search
    problem = SearchProblem.from_model(model, "digits", objectives="acc,bitops", bits=(2, 4, 8))
    result = search(problem, NSGA3Config(pop=16, gens=10, seed=0), evaluator=SupernetEvaluator(epochs=1),
                    executor=LocalExecutor(2), workdir="search-out")

Parts: `space` (encoding, candidate -> tensor bits), `objectives` (what is minimized, and what ORT's
CPU kernels really reward), `evaluators` (qat | supernet), `supernet` (the multi-bit fake-quant
model both evaluators train), `executors` (local | ray), `checkpoint` (log + resume), `report`.
"""
from qtool.bitsearch.config import SearchConfig
from qtool.bitsearch.evaluators import (Evaluator, QATEvaluator, SearchData, SupernetEvaluator, make_evaluator, rank_correlation)
from qtool.bitsearch.executors import LocalExecutor, RayExecutor, make_executor
from qtool.bitsearch.objectives import Metrics, Objective, make_objectives
from qtool.bitsearch.runner import NSGA3Config, SearchProblem, SearchResult, non_dominated, run_search, search
from qtool.bitsearch.space import Candidate, SearchSpace

__all__ = ["Candidate", "Evaluator", "LocalExecutor", "Metrics", "NSGA3Config", "Objective", "QATEvaluator",
           "RayExecutor", "SearchData", "SearchProblem", "SearchResult", "SearchSpace", "SupernetEvaluator",
           "make_evaluator", "make_executor", "make_objectives", "non_dominated", "rank_correlation", "run_search",
           "search", "SearchConfig"]
