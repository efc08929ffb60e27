"""Mixed-precision search (NSGA-III, pymoo) per layer: float / int8 / w4a8 (target cpu, `SearchConfig`'s
default) or weight/activation bits over a grid (target grid, the default of the parts below).

    from qtool.bitsearch import SearchProblem, NSGA3Config, SupernetEvaluator, LocalExecutor, search
    problem = SearchProblem.from_model(model, "digits", objectives="acc,bitops", bits=(2, 4, 8))
    result = search(problem, NSGA3Config(pop=16, gens=10, seed=0), evaluator=SupernetEvaluator(epochs=1),
                    executor=LocalExecutor(2), workdir="search-out")

Parts: `space` (encoding, candidate -> tensor bits), `objectives` (what is minimized, and what ORT's
CPU kernels really reward), `evaluators` (qat | supernet), `supernet` (the multi-bit fake-quant
model both evaluators train), `executors` (local | ray), `checkpoint` (log + resume), `report`.
"""
from qtool.lazy import lazy_getattr

# Names load on first use (PEP 562): importing qtool.bitsearch.config (SearchConfig) for the API must not
# pull in the evaluators and torch.
_WHERE = {
    'SearchConfig': 'qtool.bitsearch.config',
    'Evaluator': 'qtool.bitsearch.evaluators',
    'QATEvaluator': 'qtool.bitsearch.evaluators',
    'SearchData': 'qtool.bitsearch.evaluators',
    'SupernetEvaluator': 'qtool.bitsearch.evaluators',
    'make_evaluator': 'qtool.bitsearch.evaluators',
    'rank_correlation': 'qtool.bitsearch.evaluators',
    'LocalExecutor': 'qtool.bitsearch.executors',
    'RayExecutor': 'qtool.bitsearch.executors',
    'make_executor': 'qtool.bitsearch.executors',
    'Metrics': 'qtool.bitsearch.objectives',
    'Objective': 'qtool.bitsearch.objectives',
    'make_objectives': 'qtool.bitsearch.objectives',
    'NSGA3Config': 'qtool.bitsearch.runner',
    'SearchProblem': 'qtool.bitsearch.runner',
    'SearchResult': 'qtool.bitsearch.runner',
    'non_dominated': 'qtool.bitsearch.runner',
    'run_search': 'qtool.bitsearch.runner',
    'search': 'qtool.bitsearch.runner',
    'Candidate': 'qtool.bitsearch.space',
    'SearchSpace': 'qtool.bitsearch.space',
}

__all__ = ["Candidate", "Evaluator", "LocalExecutor", "Metrics", "NSGA3Config", "Objective", "QATEvaluator",
           "RayExecutor", "SearchData", "SearchProblem", "SearchResult", "SearchSpace", "SupernetEvaluator",
           "make_evaluator", "make_executor", "make_objectives", "non_dominated", "rank_correlation", "run_search",
           "search", "SearchConfig"]

__getattr__ = lazy_getattr(__name__, _WHERE, globals())
