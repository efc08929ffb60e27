"""The search facade: `search(problem, algorithm, evaluator=..., executor=..., workdir=...)`.

Shaped like pymoo's `minimize(problem, algorithm, termination)`: the problem (model, space,
objectives, constraints), the algorithm settings (NSGA-III: population, generations, seed), the
evaluator (`qat` | `supernet` | your own) and the executor (local | ray | your own) are separate
objects; none knows the others. The loop is pymoo's ask-and-tell, so evaluations can be logged one
by one as they finish (`checkpoint.py`) and served from the log on `--resume`.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qtool.errors import QtoolError
from qtool.bitsearch.checkpoint import EvaluationLog, check_config, write_state
from qtool.bitsearch.config import SearchConfig
from qtool.bitsearch.evaluators import Evaluator, SearchData
from qtool.bitsearch.objectives import Metrics, Objective, make_objectives, metric
from qtool.bitsearch.space import Candidate, SearchSpace

log = logging.getLogger(__name__)


@dataclass
class SearchProblem:
    fused: onnx.ModelProto
    space: SearchSpace
    data: SearchData
    objectives: list[Objective]
    metrics: Metrics
    constraints: dict[str, float] = field(default_factory=dict)  # metric name -> upper bound

    @classmethod
    def from_model(cls, model: onnx.ModelProto, data: str | SearchData, *, objectives="acc,flops",
                   bits=None, fix_first: int | None = 8, fix_last: int | None = 8, target: str = "grid",
                   max_size: float | None = None, max_latency: float | None = None,
                   train_limit: int | None = None, val_limit: int | None = None, calib_size: int = 256,
                   latency_threads: int = 1) -> "SearchProblem":
        """`model`: any ONNX classifier (fused here unless it already carries qtool.units). target: "grid"
        (per-layer w/a bits over `bits`, default 2, 4, 8) or "cpu" (float / int8 / w4a8 per layer, `bits` not given);
        `SearchConfig` defaults to cpu."""
        from qtool.calibrate import collect_stats
        from qtool.fusion import is_fused, fuse

        objs = [o for o in objectives] if isinstance(objectives, (list, tuple)) and objectives \
            and isinstance(objectives[0], Objective) else make_objectives(objectives)
        constraints = {}
        for name, v in (("size", max_size), ("latency", max_latency)):
            if v is not None:
                if not v > 0:
                    raise QtoolError(f"--max-{name} must be > 0, got {v}")
                constraints[name] = float(v)
        fused = model if is_fused(model) else fuse(model)[0]
        space = SearchSpace.from_model(fused, None if bits is None else tuple(bits), fix_first=fix_first,
                                       fix_last=fix_last, target=target)
        if isinstance(data, str):
            data = SearchData.load(fused, data, train_limit=train_limit, val_limit=val_limit, calib_size=calib_size)
        from qtool.data import model_image_input

        name, _ = model_image_input(fused)
        stats = collect_stats(fused, data.calib_feeds(name), list(space.groups))
        ranges = {r: stats[r].range("minmax", signed=False) for r in space.groups}
        metrics = Metrics(fused, space, ranges, latency_threads=latency_threads)
        return cls(fused, space, data, objs, metrics, constraints)

    def model_hash(self) -> str:
        return hashlib.sha256(self.fused.SerializeToString(deterministic=True)).hexdigest()[:16]

    @property
    def needed(self) -> list[str]:
        return list(dict.fromkeys([o.name for o in self.objectives if not o.needs_accuracy] + list(self.constraints)))


@dataclass(frozen=True)
class NSGA3Config:
    pop: int = 16
    gens: int = 10
    seed: int = 0
    crossover_prob: float = 0.9
    crossover_eta: float = 15.0
    mutation_eta: float = 20.0
    # The initial population holds the uniform configurations (grid: every (w, a), W8A8, W4A8, ..., W2A2;
    # cpu: float, int8, w4a8), the rest random. Random genes alone put almost every layer of every member
    # near the middle of the space, and the front then never reaches the mostly-4/8-bit region where the
    # uniform baselines sit (measured on ResNet-20: every front member kept a 2-bit layer, none dominated
    # W4A4 or W8A8).
    seed_uniform: bool = True

    def __post_init__(self):
        if not isinstance(self.pop, int) or self.pop < 2:
            raise QtoolError(f"--pop must be an integer >= 2, got {self.pop!r}")
        if not isinstance(self.gens, int) or self.gens < 1:
            raise QtoolError(f"--gens must be an integer >= 1, got {self.gens!r}")

    def initial(self, space) -> np.ndarray | None:
        """Initial genes with `seed_uniform`: the uniform pairs first, then random ones (seeded)."""
        if not self.seed_uniform:
            return None
        X = [space.encode(c) for c in space.uniform_pairs()][:self.pop]
        rng = np.random.default_rng(self.seed)
        X += [space.random_genes(rng) for _ in range(self.pop - len(X))]
        return np.array(X, dtype=int)

    def build(self, n_obj: int, space=None):
        """pymoo NSGA-III with integer operators: random integer sampling (or `initial` genes), SBX
        and polynomial mutation on the real line followed by rounding (pymoo's documented integer recipe)."""
        from pymoo.algorithms.moo.nsga3 import NSGA3
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.operators.sampling.rnd import IntegerRandomSampling
        from pymoo.util.ref_dirs import get_reference_directions

        p = 1  # das-dennis partitions: as many reference directions as fit the population
        while math.comb(p + 1 + n_obj - 1, n_obj - 1) <= self.pop:
            p += 1
        ref_dirs = get_reference_directions("das-dennis", n_obj, n_partitions=p)
        X0 = self.initial(space) if space is not None else None
        return NSGA3(ref_dirs, pop_size=self.pop, sampling=IntegerRandomSampling() if X0 is None else X0,
                     crossover=SBX(prob=self.crossover_prob, eta=self.crossover_eta, vtype=float, repair=RoundingRepair()),
                     mutation=PM(eta=self.mutation_eta, vtype=float, repair=RoundingRepair()),
                     eliminate_duplicates=True)


@dataclass
class SearchResult:
    workdir: str
    objectives: list[str]
    front: list[dict]
    baselines: list[dict]
    evaluated: int  # evaluations computed by this call
    reused: int  # served from the log (resume / repeats)
    generations: int
    wall_s: float
    supernet_train_s: float | None = None

    def table(self):
        from rich.table import Table

        t = Table(title=f"Pareto front ({len(self.front)} members; {self.evaluated} evaluated, {self.reused} from the log, "
                        f"{self.wall_s:.0f} s)")
        t.add_column("#", justify="right")
        t.add_column("bits (w/a per layer; f: float)", overflow="fold")
        for o in self.objectives:
            t.add_column(metric(o).label, justify="right", no_wrap=True)
        t.add_column("top-1 ORT", justify="right")
        for i, m in enumerate(self.front):
            t.add_row(str(i), m["key"], *[_fmt(o, m["objectives"][o]) for o in self.objectives],
                      "-" if m.get("acc_ort") is None else f"{m['acc_ort'] * 100:.2f}")
        for b in self.baselines:
            t.add_row(b["name"], b["key"], *[_fmt(o, b["objectives"][o]) for o in self.objectives],
                      "-" if b.get("acc_ort") is None else f"{b['acc_ort'] * 100:.2f}", style="dim")
        return t


def _fmt(name: str, v: float) -> str:
    if name == "acc":
        return f"{v * 100:.2f}"
    if name == "latency":
        return f"{v:.3f}"
    return f"{v:.4g}"


class _Runner:
    def __init__(self, problem: SearchProblem, evaluator: Evaluator, executor, workdir: Path, log_: EvaluationLog,
                 bar=None):
        self.p, self.ev, self.ex, self.workdir, self.log, self.bar = problem, evaluator, executor, workdir, log_, bar
        self.evaluated = self.reused = 0

    def _complete(self, rec: dict) -> dict:
        """Fill metrics the record lacks (a resume that added an objective or constraint)."""
        missing = [n for n in self.p.needed if n not in rec["metrics"]]
        if missing:
            c = Candidate.from_key(rec["key"])
            for n in missing:
                rec["metrics"][n] = metric(n).compute(c, self.p.metrics, rec["acc"])
            self.log.update(rec)
        return rec

    def evaluate(self, cands: list[Candidate], origin: str) -> list[dict]:
        todo = []
        for c in dict.fromkeys(cands):
            if c.key in self.log:
                self.reused += 1
            else:
                todo.append(c)
        if todo:
            state = np.random.get_state()  # evaluators must not disturb anyone's global RNG
            for c, acc in self.ex.run(self.ev, todo):
                t0 = time.perf_counter()
                metrics = {n: metric(n).compute(c, self.p.metrics, acc) for n in self.p.needed}
                self.log.append({"key": c.key, "bits": [list(b) for b in c.bits], "acc": float(acc), "metrics": metrics,
                                 "metrics_s": round(time.perf_counter() - t0, 4), "origin": origin,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
                self.evaluated += 1
            np.random.set_state(state)
        return [self._complete(self.log.get(c.key)) for c in cands]

    def F(self, rec: dict) -> list[float]:
        return [1.0 - rec["acc"] if o.needs_accuracy else rec["metrics"][o.name] for o in self.p.objectives]

    def G(self, rec: dict) -> list[float]:
        return [rec["metrics"][n] - bound for n, bound in self.p.constraints.items()]


def _display(problem: SearchProblem, rec: dict) -> dict:
    out = {}
    for o in problem.objectives:
        out[o.name] = rec["acc"] if o.needs_accuracy else rec["metrics"][o.name]
    return out


def non_dominated(F: np.ndarray) -> np.ndarray:
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    if len(F) == 0:
        return np.zeros(0, dtype=int)
    return np.asarray(NonDominatedSorting().do(F, only_non_dominated_front=True), dtype=int)


def search(problem: SearchProblem, algorithm: NSGA3Config = NSGA3Config(), *, evaluator: Evaluator, executor=None,
           workdir: str | Path, resume: bool = False, baselines: tuple[int, ...] | None = None,
           export_front: bool = True, progress: bool = True) -> SearchResult:
    from pymoo.core.evaluator import Evaluator as PymooEvaluator
    from pymoo.core.problem import Problem
    from pymoo.problems.static import StaticProblem

    from qtool.progress import progress as progress_bar
    from qtool.bitsearch import report
    from qtool.bitsearch.executors import LocalExecutor

    t_start = time.perf_counter()
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise QtoolError(f"--workdir is not a directory: {workdir}")
    if not workdir.parent.is_dir():
        raise QtoolError(f"parent of --workdir does not exist: {workdir.parent}")
    if resume and not workdir.exists():
        raise QtoolError(f"--resume: {workdir} does not exist")
    workdir.mkdir(exist_ok=True)
    sp = problem.space
    config = {"model": problem.model_hash(), "space": sp.describe(), "evaluator": evaluator.settings(),
              "seed": algorithm.seed, "seed_uniform": algorithm.seed_uniform, "val_images": int(len(problem.data.val)),
              "train_images": int(len(problem.data.train))}
    check_config(workdir, config, resume)
    elog = EvaluationLog(workdir)
    executor = executor or LocalExecutor(1)
    n_obj, n_constr = len(problem.objectives), len(problem.constraints)
    pproblem = Problem(n_var=sp.n_var, n_obj=n_obj, n_ieq_constr=n_constr, xl=0, xu=sp.levels - 1, vtype=int)
    alg = algorithm.build(n_obj, sp)
    alg.setup(pproblem, termination=("n_gen", algorithm.gens), seed=algorithm.seed)
    requested: list[str] = []
    gen = 0
    try:
        with progress_bar(disable=not progress) as bar:
            evaluator.prepare(problem.fused, sp, problem.data, workdir=workdir, seed=algorithm.seed, progress=bar)
            run = _Runner(problem, evaluator, executor, workdir, elog, bar)
            task = bar.add_task("NSGA-III", total=algorithm.gens, info="")
            while alg.has_next():
                pop = alg.ask()
                cands = [sp.decode(x) for x in pop.get("X")]
                recs = run.evaluate(cands, "search")
                requested += [c.key for c in cands]
                F = np.array([run.F(r) for r in recs], dtype=float)
                kw = {"F": F}
                if n_constr:
                    kw["G"] = np.array([run.G(r) for r in recs], dtype=float)
                PymooEvaluator().eval(StaticProblem(pproblem, **kw), pop)
                alg.tell(infills=pop)
                gen += 1
                best = max(elog.get(k)["acc"] for k in requested)
                write_state(workdir, {"generation": gen, "generations": algorithm.gens, "log_records": len(elog),
                                      "evaluated_this_run": run.evaluated, "reused": run.reused,
                                      "population": [c.key for c in cands], "best_acc": best})
                bar.update(task, advance=1, info=f"gen {gen}: {run.evaluated} evaluated, {run.reused} from log, "
                                                 f"best top-1 {best * 100:.2f}%")
            base_recs = []
            # baselines: the space's uniform members (cpu: float, int8, w4a8; grid: w8a8, w4a4, w2a2), or
            # the grid's uniform bit-widths given.
            uniform = sp.uniform_members() if baselines is None else \
                [(f"w{b}a{b}", sp.uniform(b)) for b in baselines if b in sp.choices]
            for name, c in uniform:
                rec = run.evaluate([c], "baseline")[0]
                base_recs.append({"name": name, "key": c.key, "acc": rec["acc"], "objectives": _display(problem, rec),
                                  "metrics": rec["metrics"]})
            # The front: non-dominated feasible candidates among everything this search asked for.
            keys = list(dict.fromkeys(requested))
            recs = [elog.get(k) for k in keys]
            feasible = [r for r in recs if all(g <= 0 for g in run.G(r))]
            F = np.array([run.F(r) for r in feasible], dtype=float).reshape(len(feasible), n_obj)
            front_recs = [feasible[i] for i in non_dominated(F)]
            order = next((o.name for o in problem.objectives if not o.needs_accuracy), None)
            front_recs.sort(key=lambda r: (r["metrics"][order] if order else 0.0, -r["acc"]))
            front = []
            for i, r in enumerate(front_recs):
                c = Candidate.from_key(r["key"])
                m = {"index": i, "key": r["key"], "acc": r["acc"], "objectives": _display(problem, r),
                     "metrics": r["metrics"],
                     "choices": {l.node: sp.option_name(p) for l, p in zip(sp.layers, c.bits)},
                     "bits": {l.node: {"w": w, "a": a} for l, (w, a) in zip(sp.layers, c.bits)},
                     "effective_bits": {l.node: {"w": w, "a": a} for l, (w, a) in zip(sp.layers, sp.effective(c))}}
                front.append(m)
            if export_front and front:
                etask = bar.add_task("export front", total=len(front), info="")
                for m in front:
                    report.export_member(workdir, problem, evaluator, m)
                    bar.update(etask, advance=1)
            if export_front:
                for b in base_recs:  # the baselines re-checked the same way: the plot compares like with like
                    b["acc_ort"] = report.ort_check(problem, evaluator, Candidate.from_key(b["key"]))
    finally:
        executor.close()
    result = SearchResult(str(workdir), [o.name for o in problem.objectives], front, base_recs,
                          run.evaluated, run.reused, gen, time.perf_counter() - t_start,
                          getattr(evaluator, "train_seconds", None))
    report.write_all(workdir, problem, result)
    return result


def run_search(model: onnx.ModelProto, data: str, config: SearchConfig, workdir: Path, *,
               progress: bool = True) -> SearchResult:
    """The search of `config` on `model`: build the parts (problem, NSGA-III, evaluator, executor), run."""
    from qtool.bitsearch.evaluators import make_evaluator
    from qtool.bitsearch.executors import make_executor

    c = config
    objs = make_objectives(list(c.objectives))
    algo = NSGA3Config(pop=c.pop, gens=c.gens, seed=c.seed, seed_uniform=c.seed_uniform)
    kw = {"batch_size": c.batch_size, "lr": c.lr, "device": c.device}
    settings = {"supernet": dict(epochs=c.supernet_epochs, sandwich_low=c.sandwich_low, **kw),
                "qat": dict(steps=c.qat_steps, distill=c.qat_distill, loss=c.qat_loss, **kw),
                "ptq": {"device": c.device}}  # no training: nothing of the fine-tunes applies
    ev = make_evaluator(c.evaluator, **settings[c.evaluator])
    ex = make_executor(c.executor, c.workers)  # ray missing: exit 2 before any work
    try:
        fb = c.fixed_bits or None
        problem = SearchProblem.from_model(model, data, objectives=objs, bits=c.grid_bits if c.target == "grid" else None,
                                           target=c.target, fix_first=fb, fix_last=fb,
                                           max_size=c.max_size, max_latency=c.max_latency,
                                           train_limit=c.train_limit, val_limit=c.val_limit)
    except BaseException:
        ex.close()
        raise
    return search(problem, algo, evaluator=ev, executor=ex, workdir=workdir, resume=c.resume, progress=progress)
