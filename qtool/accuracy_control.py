"""Accuracy-aware PTQ: per quantization unit the cheapest choice that keeps the model within a budget
(`qtool quantize --max-drop PP` / `QuantConfig(max_drop=...)`; docs/DESIGN.md, "Accuracy-aware PTQ").

A unit (passes.units: a Conv / Gemm / MatMul and its fused activation) takes one of the target's choices
(`qtool.control_config.TARGET_CHOICES`; on "cpu": float = the unit excluded like `--exclude`, int8 = W8A8,
w4a8 = 4-bit weights in int8 containers), starting from the most aggressive one `weight_bits` names:

1. every unit at `weight_bits`; the metric is measured on onnxruntime on the evaluation samples, which are
   disjoint from the calibration samples (`control_data`);
2. over budget: each unit's sensitivity, cheap first (the noise it adds, from the per-tensor error report
   on calibration samples: NSR of its output minus NSR of its input), and the cost of each raise: the
   latency it adds relative to uniform int8's plus the weight bytes it adds relative to uniform int8's
   (4-bit weights counted packed, as the INT4 export stores them; float 4 bytes), floored at `COST_FLOOR`.
   Latency is measured on onnxruntime (batch 1, `LATENCY_THREADS` threads) on candidate graphs and cached
   per unit: int8 -> float as the whole model with that one unit float against uniform int8 (negative
   where float runs faster, e.g. x86 without VNNI); w4a8 -> int8 as the uniform int8 / uniform w4a8
   difference shared over the units (the same kernels on CPU);
3. greedy: the `candidates` units ranked best by (added noise / cost) are each raised one level and the
   whole model measured (unless that raise was measured at an earlier step); the raise with the best
   (metric gain / cost) is kept (ties and zero gains: the worst-output SQNR gain decides). Lazily: a best
   raise measured at an earlier state is re-measured against the current one first and kept only if it
   still beats the other measured raises, so every kept raise is a fresh whole-model measurement while a
   step costs about two evaluations instead of `candidates`. Until the budget holds, `time_budget_s` runs
   out, or every unit is float (then the budget is unreachable: QtoolError with the measured drop);
4. backward pass: with the budget met, each raise, the least useful first (SQNR gain per cost), is undone
   where the whole model, measured, still meets the budget (noisy gains on a small evaluation set raise
   more than needed);
5. the report (`ControlReport`): each unit's choice and why (its measured gains), the drop before and
   after, latency vs FP32 / uniform int8 / uniform `weight_bits` measured interleaved, and the per-unit
   latency table's prediction of the final latency against the measured one.

The metric ("auto" picks): top1 (labels): drop = FP32 top-1 - quantized top-1 on the evaluation
samples, in percentage points; agreement (no labels, class scores): drop = 100 x the share of samples
whose argmax differs from FP32's; sqnr: the worst output's SQNR vs FP32 (dB) must reach min_sqnr_db.
With `confidence` (top1 / agreement) the budget is checked against the drop's one-sided upper confidence
bound (`Metric.bound`): the greedy and the backward pass stop at the first state under budget, and on a
finite evaluation set that state's measured drop is optimistic (in one run on ResNet-20 W4A8: -0.32 pp on the
2500 control images, -1.00 pp on 2500 others; benchmarks/results/accuracy_control.md has the current one).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from statistics import NormalDist

import numpy as np
import onnx

import passes
from exporters.qdq import apply_plan
from qtool.control_config import TARGET_CHOICES
from qtool.errorreport import error_report
from qtool.errors import QtoolError
from qtool.evaluation import compare_outputs, run_feeds
from qtool.feeds import FeedSet, calibration_feeds, feeds_for, npz_feeds, model_inputs, resolve_data
from qtool.fusion import fuse, is_fused, untie_biases
from qtool.latency import median_latency_ms
from qtool.plan import QuantPlan
from qtool.progress import progress as progress_bar
from qtool.ptq import QuantConfig, build_plan, calibration_stats

log = logging.getLogger(__name__)

LATENCY_THREADS = 2
COST_FLOOR = 0.01  # of the uniform int8 latency: a raise never counts as free
PROXY_SAMPLES = 64  # calibration samples of the per-tensor error report (the cheap sensitivity)
FINAL_RUNS = 100  # timed runs per model of the final, interleaved latency comparison
TABLE_RUNS = 60  # timed runs per model of one per-unit latency measurement


# -- data ---------------------------------------------------------------------------------------------

def control_data(model: onnx.ModelProto, data, val_data, config: QuantConfig):
    """(calibration feed batches, evaluation FeedSet), disjoint where the data allows:

    - `val_data` given (a SPEC / Data, or a FeedSet): evaluation on it (an image SPEC's val split);
    - an image SPEC: calibration from the train split (`config.calib_size` images), evaluation on the val
      slice (qtool.data.load_dataset: never part of train);
    - an npz of named inputs or an images: folder: the first `calib_size` samples calibrate, the rest evaluate.
    `config.eval_size` keeps the first N evaluation samples."""
    from qtool.data import Data, parse_spec

    spec_like = data is None or isinstance(data, (str, Data))
    if val_data is None and not spec_like:
        raise QtoolError("the accuracy control evaluates on samples disjoint from calibration: with calibration "
                         "feeds as data, give val_data (a data SPEC or a qtool.feeds.FeedSet)")
    calib = calibration_feeds(model, data, config.calib_size) if spec_like else data
    if val_data is not None:
        ev = val_data if isinstance(val_data, FeedSet) else feeds_for(model, val_data, "val")
    else:
        d = resolve_data(model, data)
        kind, path = parse_spec(d.spec)
        named = kind == "images" or (kind == "npz" and npz_feeds(path, model_inputs(model)) is not None)
        if named:  # one pool of samples: calibration_feeds took its head
            every = feeds_for(model, d, "train")
            if len(every) <= config.calib_size:
                raise QtoolError(f"{d.spec} holds {len(every)} samples, all used for calibration (calib_size="
                                 f"{config.calib_size}): lower calib_size or give val_data for the evaluation")
            ev = every.subset(np.arange(config.calib_size, len(every)))
        else:
            ev = feeds_for(model, d, "val")
    return calib, ev.head(config.eval_size)


# -- measurements --------------------------------------------------------------------------------------

@dataclass
class Measure:
    top1: float | None  # against the labels (None: no labels)
    agreement: float | None  # argmax agreement with FP32 (None: outputs are not class scores)
    sqnr_db: float  # the worst output's, vs FP32
    # Standard errors of the top-1 drop vs FP32 (paired per sample: the FP32 and quantized model scored on the
    # same samples) and of the disagreement rate, as fractions; None where the metric does not apply.
    top1_drop_se: float | None = None
    disagreement_se: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Metric:
    """How a Measure is judged: `loss` (lower is better) and whether the budget holds."""
    name: str  # top1 | agreement | sqnr
    budget: float  # pp (top1 / agreement) or dB (sqnr: the minimum)
    fp32_top1: float | None = None
    confidence: float | None = None  # top1 / agreement: the budget holds for the one-sided upper bound at this level

    @property
    def unit(self) -> str:
        return "dB" if self.name == "sqnr" else "pp"

    def drop(self, m: Measure) -> float:
        """pp below FP32 (top1 / agreement), or for sqnr dB below the budget (negative: above)."""
        if self.name == "top1":
            return (self.fp32_top1 - m.top1) * 100
        if self.name == "agreement":
            return (1 - m.agreement) * 100
        return self.budget - m.sqnr_db

    def bound(self, m: Measure) -> float:
        """What the budget is checked against: the drop, or with `confidence` its one-sided upper confidence
        bound (normal approximation; the standard error from the per-sample differences)."""
        if self.confidence is None or self.name == "sqnr":
            return self.drop(m)
        se = m.top1_drop_se if self.name == "top1" else m.disagreement_se
        return self.drop(m) + NormalDist().inv_cdf(self.confidence) * se * 100

    def met(self, m: Measure) -> bool:
        return self.bound(m) <= (0.0 if self.name == "sqnr" else self.budget) + 1e-9

    def describe(self, m: Measure) -> str:
        if self.name == "sqnr":
            return f"worst-output SQNR {m.sqnr_db:.2f} dB (budget >= {self.budget:g} dB)"
        what = "top-1" if self.name == "top1" else "top-1 disagreement with FP32"
        ub = "" if self.confidence is None else f", {self.confidence:.0%} upper bound {self.bound(m):.2f}"
        return f"{what} drop {self.drop(m):.2f} pp{ub} (budget {self.budget:g} pp)"


def resolve_metric(config: QuantConfig, eval_set: FeedSet, ref: dict[str, np.ndarray]) -> Metric:
    first = next(iter(ref.values()))
    scores = first.ndim == 2 and first.shape[1] > 1
    name = config.metric
    if name == "auto":
        name = "sqnr" if config.min_sqnr_db is not None else (
            "top1" if eval_set.labels is not None and scores else "agreement")
    if name in ("top1", "agreement") and not scores:
        raise QtoolError(f"metric {name!r} needs class scores (N x classes) as the first output, got shape "
                         f"{first.shape}: use metric='sqnr' with min_sqnr_db")
    if name == "top1" and eval_set.labels is None:
        raise QtoolError("metric 'top1' needs labels in the evaluation data; metric 'agreement' compares with "
                         "FP32 instead, without labels")
    if name == "sqnr":
        return Metric("sqnr", config.min_sqnr_db)
    fp = float(np.mean(first.argmax(1) == eval_set.labels)) if eval_set.labels is not None else None
    return Metric(name, config.max_drop, fp, config.confidence)


def _se(x: np.ndarray, low: float) -> float:
    """Standard error of the mean of per-sample values, with one pseudo-sample at `low` and one at 1 (as
    Agresti-Caffo's interval adds pseudo-counts): a model that disagreed on none of the samples still gets a
    bound above its measured drop (about 1.8 / n at 90 %; the exact binomial one is 2.3 / n)."""
    x = np.concatenate([x, [low, 1.0]])
    return float(np.std(x, ddof=1) / np.sqrt(len(x)))


def measure(qmodel: onnx.ModelProto, eval_set: FeedSet, ref: dict[str, np.ndarray]) -> Measure:
    outs = run_feeds(qmodel, eval_set)
    metrics = [compare_outputs(ref[k], outs[k]) for k in ref]
    first, ref_first = next(iter(outs.values())), next(iter(ref.values()))
    top1 = top1_se = dis_se = None
    if first.ndim == 2 and first.shape[1] > 1:
        pred, ref_pred = first.argmax(1), ref_first.argmax(1)
        dis_se = _se((pred != ref_pred).astype(np.float64), 0.0)
        if eval_set.labels is not None:
            top1 = float(np.mean(pred == eval_set.labels))
            top1_se = _se((ref_pred == eval_set.labels).astype(np.float64) - (pred == eval_set.labels), -1.0)
    return Measure(top1, metrics[0].top1_agreement, float(min(m.sqnr_db for m in metrics)), top1_se, dis_se)


def added_noise(report, unit: passes.Unit) -> float:
    """Noise-to-signal ratio a unit adds: NSR of its quantized output minus NSR of its input (error report
    rows; a tensor without a row adds nothing). inf when its output has no row: measure it, do not guess."""
    sqnr = {r.tensor: r.sqnr_db for r in report.tensors}
    if unit.output not in sqnr:
        return float("inf")
    nsr = lambda t: 10 ** (-sqnr[t] / 10) if t in sqnr and np.isfinite(sqnr[t]) else (  # noqa: E731
        0.0 if t not in sqnr or sqnr[t] > 0 else float("inf"))
    return max(nsr(unit.output) - nsr(unit.input), 0.0)


# -- report --------------------------------------------------------------------------------------------

@dataclass
class Step:
    unit: str
    frm: str
    to: str
    gain: float  # metric loss removed (pp, or dB for sqnr)
    sqnr_gain_db: float
    cost: float  # latency added / uniform int8's + weight bytes added / uniform int8's (floored)
    latency_ms: float  # the latency part: measured ms added
    weight_bytes: float  # the size part: weight bytes added
    drop_after: float
    tried: int  # candidates measured at this step


@dataclass
class UnitChoice:
    unit: str  # anchor node name
    op: str
    choice: str
    added_noise_db: float | None  # at the start: -10 log10(added NSR) (None: no error-report row)
    raise_cost_ms: dict[str, float] = field(default_factory=dict)  # "int8->float": ms (measured table)
    measured: dict[str, float] = field(default_factory=dict)  # "w4a8->int8": metric gain when raised alone
    why: str = ""


@dataclass
class ControlReport:
    metric: str
    budget: float
    unit: str  # pp | dB
    fp32_top1: float | None
    calib_samples: int
    eval_samples: int
    initial: Measure
    final: Measure
    initial_drop: float
    final_drop: float
    met: bool
    stop: str  # "budget met" | "time budget" | ...
    units: list[UnitChoice]
    steps: list[Step]
    lowered: list[Step]  # raises undone by the backward pass (the budget held without them)
    latency_ms: dict[str, float]  # fp32, uniform int8, uniform <bits>, final, final_predicted
    evaluations: int
    wall_s: float
    confidence: float | None = None  # the level of final_bound (None: the budget was checked on the drop)
    final_bound: float | None = None  # the final drop's one-sided upper confidence bound

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for u in self.units:
            out[u.choice] = out.get(u.choice, 0) + 1
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        u = self.unit
        what = {"top1": "top-1 drop vs FP32", "agreement": "top-1 disagreement with FP32",
                "sqnr": "dB below the SQNR budget"}[self.metric]
        lat = self.latency_ms
        out = [f"accuracy control ({self.metric}, budget {self.budget:g} {u}; {self.calib_samples} calibration / "
               f"{self.eval_samples} evaluation samples, disjoint): {what} {self.initial_drop:.2f} -> "
               f"{self.final_drop:.2f} {u}"
               + (f" ({self.confidence:.0%} upper bound {self.final_bound:.2f} {u})" if self.confidence else "")
               + f" in {len(self.steps)} raises ({len(self.lowered)} undone), "
               f"{self.evaluations} evaluations, "
               f"{self.wall_s:.1f} s; {'budget met' if self.met else 'BUDGET NOT MET (' + self.stop + ')'}",
               "units: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.counts().items()))]
        if "final" in lat:
            rel = lambda k: f"{lat['final'] / lat[k]:.2f}x {k}" if lat.get(k) else ""  # noqa: E731
            out.append(f"latency (batch 1, {LATENCY_THREADS} threads, median): {lat['final']:.3f} ms = "
                       + ", ".join(r for r in (rel("fp32"), rel("uniform int8")) if r)
                       + (f"; per-unit table predicted {lat['final_predicted']:.3f} ms"
                          if "final_predicted" in lat else ""))
        for c in self.units:
            if c.why:
                out.append(f"  {c.unit} ({c.op}): {c.choice} - {c.why}")
        return out


# -- the control ---------------------------------------------------------------------------------------

class _Space:
    """Plans and QDQ models of per-unit choices, from one calibration."""

    def __init__(self, model: onnx.ModelProto, config: QuantConfig, calib: list, units: list[passes.Unit]):
        self.model, self.config, self.units = model, config, units
        # Every marked activation, not only the roots: a unit kept float can turn a shared tensor into a root.
        self.stats, self.base = calibration_stats(model, calib, config, all_activations=True)
        self.choices = TARGET_CHOICES[config.target]
        top = next(i for i, (_, b) in enumerate(self.choices) if b == config.weight_bits)
        self.choices = self.choices[:top + 1]
        self.weights = {b: build_plan(model, replace(config, weight_bits=b), self.stats, self.base).tensors
                        for _, b in self.choices if b is not None}
        self._qdq: dict[tuple, onnx.ModelProto] = {}
        self.search: set[int] = set()  # the units chosen for; the others stay as the plain plan has them

    def plan(self, state: tuple[int, ...]) -> QuantPlan:
        floats = set()
        for i, (u, lvl) in enumerate(zip(self.units, state)):
            if self.choices[lvl][1] is None and i in self.search:
                floats |= {u.anchor} | ({u.act} if u.act else set())
        base = self.base
        pred = (lambda n: (n.name in floats) or (base is not None and base(n))) if floats else base
        plan = build_plan(self.model, self.config, self.stats, pred)
        for u, lvl in zip(self.units, state):
            bits = self.choices[lvl][1]
            if bits is not None and u.weight in plan.tensors:
                plan.tensors[u.weight] = self.weights[bits][u.weight]
        return plan

    def qdq(self, state: tuple[int, ...]) -> onnx.ModelProto:
        if state not in self._qdq:
            self._qdq[state] = apply_plan(self.model, self.plan(state))
        return self._qdq[state]


def accuracy_control(model: onnx.ModelProto, calib_batches: Iterable[dict[str, np.ndarray]], eval_set: FeedSet,
                     config: QuantConfig, *, show_progress: bool = True
                     ) -> tuple[onnx.ModelProto, QuantPlan, ControlReport]:
    """The fused model, the chosen plan and the report; see the module docstring."""
    t0 = time.perf_counter()
    model = fuse(model)[0] if not is_fused(model) else untie_biases(model)
    calib = list(calib_batches)
    if not calib:
        raise QtoolError("the accuracy control got no calibration data")
    units = passes.read_units(dict((p.key, p.value) for p in model.metadata_props)) or []
    space = _Space(model, config, calib, units)
    # Searchable: units the plan quantizes (not excluded by config.exclude / non-finite tensors).
    full = space.plan(tuple(len(space.choices) - 1 for _ in units))
    inits = {t.name: t for t in model.graph.initializer}
    # A MatMul of two activations (attention) is a unit without a weight to narrow: it stays at int8.
    search = [i for i, u in enumerate(units) if u.weight in full.tensors and u.weight in inits]
    space.search = set(search)
    if not search:
        raise QtoolError("the accuracy control found no quantization unit to choose for (no Conv/Gemm/MatMul "
                         "with a constant weight is quantized)")
    top = len(space.choices) - 1
    names = [c for c, _ in space.choices]
    ref = run_feeds(model, eval_set)
    metric = resolve_metric(config, eval_set, ref)
    cache: dict[tuple, Measure] = {}

    def evaluate(state):
        if state not in cache:
            cache[state] = measure(space.qdq(state), eval_set, ref)
        return cache[state]

    def loss(m: Measure) -> float:
        return metric.drop(m)

    start = tuple(top if i in search else 0 for i in range(len(units)))  # the level of an unsearched unit is unused
    state = start
    cur = evaluate(state)
    initial = cur
    steps: list[Step] = []
    measured: dict[int, dict[str, float]] = {i: {} for i in search}
    lat_table: dict[int, float] = {}  # unit -> ms added by int8 -> float against uniform int8
    lat: dict[str, float] = {}
    stop = "budget met"
    feed1 = next(eval_set.batches(_fixed_batch(model) or 1))  # latency: batch 1 (or the model's fixed batch)
    int8 = next(i for i, (_, b) in enumerate(space.choices) if b == 8)
    uniform8 = tuple(int8 if i in search else 0 for i in range(len(units)))
    proxies: dict[int, float] = {}
    elems = {i: int(np.prod(inits[units[i].weight].dims)) for i in search}
    bytes8 = float(sum(elems.values()))
    known: dict[int, tuple] = {}  # unit -> (its level, state measured from, score, next state, Measure, cost)
    with progress_bar(disable=not show_progress) as bar:
        task = bar.add_task("accuracy control", total=len(search) * top, info=metric.describe(cur))
        if not metric.met(cur):
            bar.update(task, description="latency of uniform choices")
            base_models = {"fp32": model, "uniform int8": space.qdq(uniform8)}
            if top != int8:
                base_models[f"uniform {names[top]}"] = space.qdq(start)
            lat.update(median_latency_ms(base_models, feed1, threads=LATENCY_THREADS))
            ref8 = lat["uniform int8"]
            share = (ref8 - lat.get(f"uniform {names[top]}", ref8)) / len(search)

        def latency_cost(i: int, lvl: int) -> float:
            """ms a raise of unit i from level lvl adds (measured; negative where float runs faster)."""
            if space.choices[lvl - 1][1] is not None:  # a weight-bits raise: the same kernels on CPU
                return share
            if i not in lat_table:
                one = tuple(0 if j == i else s for j, s in enumerate(uniform8))
                t = median_latency_ms({"base": space.qdq(uniform8), "one": space.qdq(one)}, feed1,
                                      threads=LATENCY_THREADS, runs=TABLE_RUNS)
                lat_table[i] = t["one"] - t["base"]
            return lat_table[i]

        def size_cost(i: int, lvl: int) -> float:
            """Weight bytes a raise adds (4-bit weights counted packed, as INT4 export stores them; float 4 bytes)."""
            return elems[i] * ((space.choices[lvl - 1][1] or 32) - space.choices[lvl][1]) / 8

        def cost(i: int, lvl: int) -> float:
            """Relative cost: the latency added over uniform int8's plus the weight bytes added over uniform
            int8's, floored so that no raise is free."""
            return max(latency_cost(i, lvl) / ref8 + size_cost(i, lvl) / bytes8, COST_FLOOR)

        while not metric.met(cur):
            if config.time_budget_s is not None and time.perf_counter() - t0 > config.time_budget_s:
                stop = "time budget"
                break
            cands = [i for i in search if state[i] > 0]
            if not cands:
                raise QtoolError(f"the budget is not reachable: with every quantization unit float the "
                                 f"{metric.describe(cur)}; the ops still quantized outside the units (Add, pooling, "
                                 f"Concat) can be kept float with exclude")
            bar.update(task, description="sensitivity (error report)")
            rep = error_report(model, space.qdq(state), space.plan(state), _head(calib, PROXY_SAMPLES))
            noise = {i: added_noise(rep, units[i]) for i in cands}
            if not proxies:
                proxies = dict(noise)
            # Rank by noise per unit of cost; float raises get their latency measured only when their noise
            # alone would place them among the candidates.
            by_noise = sorted(cands, key=lambda i: -noise[i])
            for i in by_noise[:2 * config.candidates]:
                if space.choices[state[i] - 1][1] is None:
                    bar.update(task, description=f"latency of {units[i].anchor} in float")
                    cost(i, state[i])

            def cost_estimate(i: int) -> float:  # an unmeasured float raise: the dearest measured one's latency
                if space.choices[state[i] - 1][1] is not None or i in lat_table:
                    return cost(i, state[i])
                worst = max(lat_table.values(), default=ref8)
                return max(worst / ref8 + size_cost(i, state[i]) / bytes8, COST_FLOOR)
            est = {i: noise[i] / cost_estimate(i) for i in cands}
            ranked = sorted(cands, key=lambda i: -est[i])

            def try_raise(i: int):
                """Raise unit i alone from the current state, measured whole on the evaluation data."""
                nxt = tuple(s - 1 if j == i else s for j, s in enumerate(state))
                bar.update(task, description=f"raise {units[i].anchor} {names[state[i]]}->{names[state[i] - 1]}")
                m = evaluate(nxt)
                measured[i][f"{names[state[i]]}->{names[state[i] - 1]}"] = loss(cur) - loss(m)
                c = cost(i, state[i])
                # Metric gain per cost; where raises do not move the metric (a small evaluation set moves in
                # steps of 1/n), the worst-output SQNR gain per cost decides.
                known[i] = (state[i], state, (max(loss(cur) - loss(m), 0.0) / c, (m.sqnr_db - cur.sqnr_db) / c),
                            nxt, m, c)

            # Lazy greedy: the top `candidates` by noise per cost are measured unless a measurement of the same
            # raise exists (from an earlier state); the best is re-measured against the current state before it
            # is kept, and kept only if it still beats every other measured raise.
            tried = 0
            for i in ranked[:config.candidates]:
                if i not in known or known[i][0] != state[i]:
                    try_raise(i)
                    tried += 1
            while True:
                valid = {i: k for i, k in known.items() if state[i] == k[0] and state[i] > 0}
                i = max(valid, key=lambda j: valid[j][2])
                if valid[i][1] == state:
                    break
                try_raise(i)
                tried += 1
                others = [k[2] for j, k in valid.items() if j != i]
                if not others or known[i][2] >= max(others):
                    break
            _, _, _, nxt, m, c = known.pop(i)
            steps.append(Step(units[i].anchor, names[state[i]], names[state[i] - 1], loss(cur) - loss(m),
                              m.sqnr_db - cur.sqnr_db, c, latency_cost(i, state[i]), size_cost(i, state[i]), loss(m),
                              tried))
            state, cur = nxt, m
            bar.update(task, advance=1, info=metric.describe(cur))
        # Backward pass: noisy gains (a small evaluation set) can raise more than the budget needs. Each raised
        # unit, the least useful raise first (smallest SQNR gain per cost), is lowered one level again where
        # the whole model, measured, still meets the budget.
        lowered: list[Step] = []
        if metric.met(cur):
            for s_ in sorted(steps, key=lambda s_: s_.sqnr_gain_db / s_.cost):
                i = next(j for j in search if units[j].anchor == s_.unit)
                if state[i] >= top or (config.time_budget_s is not None
                                       and time.perf_counter() - t0 > config.time_budget_s):
                    continue
                back = tuple(s + 1 if j == i else s for j, s in enumerate(state))
                bar.update(task, description=f"lower {units[i].anchor} {names[state[i]]}->{names[state[i] + 1]}")
                m = evaluate(back)
                if metric.met(m):
                    lowered.append(Step(units[i].anchor, names[state[i]], names[state[i] + 1], loss(cur) - loss(m),
                                        m.sqnr_db - cur.sqnr_db, 0.0, 0.0, 0.0, loss(m), 1))
                    state, cur = back, m
        if steps or not metric.met(initial):
            bar.update(task, description="final latency")
            finals = {"fp32": model, "uniform int8": space.qdq(uniform8), "final": space.qdq(state)}
            if top != int8:
                finals[f"uniform {names[top]}"] = space.qdq(start)
            lat.update(median_latency_ms(finals, feed1, threads=LATENCY_THREADS, runs=FINAL_RUNS))
            floats = [i for i in search if space.choices[state[i]][1] is None]
            if all(i in lat_table for i in floats):
                low = sum(1 for i in search if state[i] == top and top != int8)  # units still below 8 bits
                lat["final_predicted"] = lat["uniform int8"] + sum(lat_table[i] for i in floats) - share * low
    plan = space.plan(state)
    rows = []
    for i, u in enumerate(units):
        if i not in search:
            rows.append(UnitChoice(u.anchor, u.op, "not searched", None,
                                   why="its weight is not quantized (exclude, non-finite tensors or no constant weight)"))
            continue
        p = proxies.get(i)
        db = None if p is None or not np.isfinite(p) else (float("inf") if p == 0 else float(-10 * np.log10(p)))
        row = UnitChoice(u.anchor, u.op, names[state[i]], db, {"int8->float": lat_table[i]} if i in lat_table else {},
                         measured[i])
        ups = [s for s in steps if s.unit == u.anchor]
        downs = [s for s in lowered if s.unit == u.anchor]
        if ups:
            row.why = "; ".join(f"raised {s.frm}->{s.to} ({s.gain:+.2f} {metric.unit}, {s.sqnr_gain_db:+.2f} dB SQNR, "
                                f"cost {s.cost:.3f}: {s.latency_ms:+.3f} ms, {s.weight_bytes / 1024:+.1f} KiB)" for s in ups)
            if downs:
                row.why += "; " + "; ".join(f"lowered back {s.frm}->{s.to}: the budget holds without it "
                                            f"(drop {-s.gain:+.2f} {metric.unit})" for s in downs)
        elif measured[i]:
            row.why = "kept: raised alone it measured " + ", ".join(f"{k} {v:+.2f} {metric.unit}"
                                                                   for k, v in measured[i].items())
        elif steps:
            row.why = "kept: never among the most sensitive by the error report"
        rows.append(row)
    report = ControlReport(metric.name, metric.budget, metric.unit, metric.fp32_top1, sum(len(next(iter(b.values())))
                           for b in calib), len(eval_set), initial, cur, loss(initial), loss(cur), metric.met(cur),
                           stop, rows, steps, lowered, lat, len(cache), time.perf_counter() - t0,
                           metric.confidence, metric.bound(cur) if metric.confidence is not None else None)
    plan.meta["accuracy_control"] = {"metric": metric.name, "budget": metric.budget, "final_drop": report.final_drop,
                                     "confidence": report.confidence, "final_bound": report.final_bound,
                                     "met": report.met, "choices": {r.unit: r.choice for r in rows}}
    return model, plan, report


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    fixed = [s.dims[0] for s in model_inputs(model) if s.dims and s.dims[0] is not None]
    return fixed[0] if fixed else None


def _head(batches: list[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    out, have = [], 0
    for b in batches:
        if have >= n:
            break
        out.append(b)
        have += len(next(iter(b.values())))
    return out
