"""Block reconstruction (Li et al. 2021, "BRECQ: Pushing the Limit of Post-Training Quantization by Block
Reconstruction"): AdaRound's learned rounding (qtool.adaround) optimized one block of layers at a time, and
optionally the plan's activation scales with it.

Blocks come from the graph, not from names: the steps (graph order) up to and including a residual Add
(an Add of two computed tensors) and the Relu / Clip that alone reads it; a chain without residual Adds is
cut after every MAX_BLOCK_LAYERS quantized layers; steps after the last cut with no quantized layer join
the block before. A block's inputs are the computed tensors (or graph inputs) it reads from before it, its
outputs what it computes for later steps or the graph outputs. For each block in order, the rounding
variables V of all its weights (AdaRound's h(V), regularizer and beta schedule) minimize

    sum_outputs || Q(block(x_q; W~, s)) - block_fp32(x) ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

where x_q are the block's inputs in the quantized model (earlier blocks already hard-rounded and with their
learned scales), x the FP32 model's, Q the block's fake-quants as the plan says (its output fake-quants
included), and the squared error is summed over channels, averaged over samples and positions.

`tune_activations`: the scale s of every activation quantizer whose tensor the block computes (a graph
input: the first block reading it) is learned jointly, as s = s0 exp(u), u from 0 (s0: the calibrated
plan), with LSQ's gradient d Q / d s (Esser et al. 2020; qtool.fakequant), Adam at ACT_LR. The zero point
stays the plan's integer (the unsigned 4-bit codes keep their [0, 15] layout, only the step changes);
tensors sharing the root's parameters (pass-through outputs, qtool.quant_points) share the learned scale.
The learned scales (float32) are written into the plan's entries, in place.

`drop` > 0: QDrop on the block's inputs (qtool.adaround.mix_inputs: each element of x_q is x's with that
probability, redrawn every step).

Weights are written back as `code * scale` as in qtool.adaround, so the result is a plain QDQ model of the
(updated) plan. A block whose learned rounding and scales reconstruct its outputs worse than where it
started (nearest rounding, calibrated scales) on the samples keeps its start (reported). `time_budget_s`:
the block being optimized when it runs out keeps what it learned so far, later blocks stay as they were.
Deterministic for a seed unless the time budget cuts it short.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn as nn

from qtool.adaround import BATCH, LR, REG_WEIGHT, WARM_START, Rounding, beta_at, mix_inputs, recon_error
from qtool.layerwise import Layer, PlanQuant, quantized_lift, stack_feeds, weight_layers, with_initializers
from qtool.lift import LiftedModule, lift
from qtool.plan import QuantPlan, TensorQuant
from qtool.progress import progress
from qtool.quant_points import quant_points

__all__ = ["Block", "BrecqBlock", "BrecqReport", "blocks", "brecq"]

MAX_BLOCK_LAYERS = 4
ACT_LR = 1e-3  # Adam on u (s = s0 exp(u)). ResNet-20 W4A4 (2k val): 83.35 % at 1e-3 / 300 it, 83.75 % at 1e-2 / 200 it;
# the tiny test net's logits get worse at 1e-2: kept at 1e-3 until a longer comparison decides
PROPAGATE_BATCH = 64
_TRAILING = ("Relu", "Clip")


@dataclass(frozen=True)
class Block:
    start: int  # steps [start, stop) of the lifted module's step table
    stop: int
    layers: tuple[Layer, ...]  # the quantized layers in it
    inputs: tuple[str, ...]  # computed tensors / graph inputs it reads from before it
    outputs: tuple[str, ...]  # tensors it computes that later steps read, or graph outputs
    constants: tuple[str, ...]  # initializers / constants it reads
    graph_inputs: tuple[str, ...]  # graph inputs whose fake-quant this block applies (their first reader)
    act_roots: tuple[str, ...]  # activation plan entries (roots) computed here (or graph inputs above)


@dataclass
class BrecqBlock:
    weights: list[str]
    activations: list[str]  # activation entries whose scale was learned
    mse_start: float  # output reconstruction error on the samples: nearest rounding, calibrated scales
    mse_learned: float
    iterations: int
    kept: str  # "learned" | "start"
    changed: float  # fraction of weights rounded differently from nearest
    scale_ratio: list[float] = field(default_factory=list)  # learned / calibrated scale per activation entry


@dataclass
class BrecqReport:
    blocks: list[BrecqBlock] = field(default_factory=list)
    skipped: list[list[str]] = field(default_factory=list)  # weights of blocks not reached (time budget)
    samples: int = 0
    seconds: float = 0.0
    tune_activations: bool = False
    drop: float = 0.0

    def lines(self) -> list[str]:
        learned = [b for b in self.blocks if b.kept == "learned"]
        ratio = [b.mse_learned / b.mse_start for b in learned if b.mse_start > 0]
        what = "rounding + activation scales" if self.tune_activations else "rounding"
        qdrop = f" (QDrop {self.drop:g})" if self.drop else ""
        out = [f"brecq: {len(learned)}/{len(self.blocks) + len(self.skipped)} blocks learned ({what}) on "
               f"{self.samples} samples{qdrop} in {self.seconds:.1f} s" + (
                   f", block reconstruction error x{np.median(ratio):.2f} (median vs start)" if ratio else "")]
        worse = [b.weights[0] for b in self.blocks if b.kept == "start"]
        if worse:
            out.append(f"brecq: kept the start (learned was worse) for the blocks of {', '.join(worse)}")
        if self.skipped:
            out.append(f"brecq: time budget over, {len(self.skipped)} blocks keep nearest rounding and calibrated "
                       "scales: " + ", ".join(w[0] for w in self.skipped[:5]) + (" ..." if len(self.skipped) > 5
                                                                                 else ""))
        return out


class TunedQuant(PlanQuant):
    """A plan entry's fake-quant with a learned scale s0 exp(u) (LSQ gradient), zero point fixed."""

    def __init__(self, tq: TensorQuant):
        super().__init__(tq)
        self.u = nn.Parameter(torch.zeros_like(self.scale))

    def _scale_zp(self):
        return self.scale * torch.exp(self.u), self.zero_point

    @torch.no_grad()
    def learned(self, tq: TensorQuant) -> TensorQuant:
        s = (self.scale * torch.exp(self.u)).to(torch.float32).numpy()
        s = np.maximum(s, np.finfo(np.float32).tiny)
        scale = tuple(float(v) for v in s) if s.ndim else float(s)
        return dataclasses.replace(tq, scale=scale)


def blocks(lifted: LiftedModule, plan: QuantPlan, layers: list[Layer] | None = None,
           groups: dict[str, list[str]] | None = None) -> list[Block]:
    """The reconstruction blocks of `lifted` (see the module doc), in graph order."""
    layers = weight_layers(lifted, plan) if layers is None else layers
    steps = lifted.step_table()
    producer = {o: i for i, (_, _, _, outs) in enumerate(steps) for o in outs}
    readers: dict[str, list[int]] = {}
    for i, (_, _, ins, _) in enumerate(steps):
        for t in ins:
            if t:
                readers.setdefault(t, []).append(i)
    ends = {producer[la.y]: la for la in layers}
    ranges, start, count, i = [], 0, 0, 0
    while i < len(steps):
        op, _, ins, outs = steps[i]
        count += i in ends
        stop = None
        if op == "Add" and len(ins) == 2 and all(t and lifted.constant(t) is None for t in ins):
            stop = i + 1
            while (stop < len(steps) and steps[stop][0] in _TRAILING and steps[stop][2][0] == steps[stop - 1][3][0]
                   and readers.get(steps[stop - 1][3][0]) == [stop]
                   and steps[stop - 1][3][0] not in lifted.output_names):
                stop += 1
        elif count >= MAX_BLOCK_LAYERS and i in ends:
            stop = i + 1
        if stop is not None and count:
            ranges.append((start, stop))
            start, count, i = stop, 0, stop
            continue
        i += 1
    if start < len(steps):
        if count or not ranges:
            ranges.append((start, len(steps)))
        else:
            ranges[-1] = (ranges[-1][0], len(steps))
    groups = quant_points_groups(lifted, plan) if groups is None else groups
    graph_inputs = set(lifted.input_names)
    seen_inputs: set[str] = set()
    out = []
    for lo, hi in ranges:
        made = {o for _, _, _, outs in steps[lo:hi] for o in outs}
        read = list(dict.fromkeys(t for _, _, ins, _ in steps[lo:hi] for t in ins if t))
        consts = tuple(t for t in read if t not in made and lifted.constant(t) is not None)
        ins = tuple(t for t in read if t not in made and t not in consts)
        outs = tuple(o for o in dict.fromkeys(o for _, _, _, os in steps[lo:hi] for o in os)
                     if o in lifted.output_names or any(r >= hi for r in readers.get(o, [])))
        first = tuple(t for t in ins if t in graph_inputs and t not in seen_inputs)
        seen_inputs |= set(first)
        roots = tuple(r for r in groups if r in made or r in first)
        out.append(Block(lo, hi, tuple(la for la in layers if lo <= la.index < hi), ins, outs, consts, first, roots))
    return out


def quant_points_groups(lifted: LiftedModule, plan: QuantPlan, model: onnx.ModelProto | None = None
                        ) -> dict[str, list[str]]:
    """Activation root -> its plan entries sharing one set of parameters (root first)."""
    if model is None:
        return {t: [t] for t, tq in plan.tensors.items() if tq.kind == "activation"}
    out = {}
    for root, members in quant_points(model).groups().items():
        kept = [m for m in members if m in plan.tensors]
        if kept and kept[0] == root:
            out[root] = kept
        else:  # a root the plan does not hold: each member on its own
            out.update({m: [m] for m in kept})
    for t, tq in plan.tensors.items():  # entries quant_points does not know (none expected)
        if tq.kind == "activation" and not any(t in m for m in out.values()):
            out[t] = [t]
    return out


def _axis(tq: TensorQuant) -> int | None:
    return tq.axis if tq.granularity == "per_channel" else None


def _run(lifted: LiftedModule, blk: Block, xs: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict:
    """The block's outputs on inputs `xs` (graph inputs raw: their fake-quant is applied here)."""
    env = dict(xs)
    for t in blk.constants:
        if t in weights:
            env[t] = weights[t]
        else:
            q = lifted.quantizer(t)
            c = lifted.constant(t)
            env[t] = c if q is None else q(c)
    for t in blk.inputs:
        q = lifted.quantizer(t) if t in lifted.input_names else None
        if q is not None:
            env[t] = q(env[t])
    lifted.run_steps(env, blk.start, blk.stop)
    return {o: env[o] for o in blk.outputs}


@torch.no_grad()
def _propagate(lifted: LiftedModule, blk: Block, env: dict[str, torch.Tensor], weights=None) -> dict:
    """The block's outputs on all samples of `env`, batch by batch."""
    n = len(next(iter(env.values())))
    parts: dict[str, list] = {o: [] for o in blk.outputs}
    for lo in range(0, n, PROPAGATE_BATCH):
        y = _run(lifted, blk, {t: env[t][lo:lo + PROPAGATE_BATCH] for t in blk.inputs}, weights or {})
        for o in blk.outputs:
            parts[o].append(y[o])
    return {o: torch.cat(v) for o, v in parts.items()}


def _loss(y: dict, t: dict) -> torch.Tensor:
    return sum(recon_error(y[o], t[o]) for o in y)


@torch.no_grad()
def _mse(lifted, blk: Block, xs: dict, ts: dict, weights: dict) -> float:
    y = _propagate(lifted, blk, xs, weights)
    return float(sum(recon_error(y[o], ts[o]) for o in y))


def brecq(model: onnx.ModelProto, plan: QuantPlan, feeds: Iterable[dict[str, np.ndarray]], *, iters: int = 500,
          samples: int = 256, tune_activations: bool = False, drop: float = 0.0, time_budget_s: float | None = None,
          seed: int = 0, show_progress: bool = True) -> tuple[onnx.ModelProto, BrecqReport]:
    """A copy of the fused `model` whose planned weights are `learned code * scale`; with `tune_activations`
    the plan's activation entries take the learned scales (in place). See the module doc."""
    t0 = time.perf_counter()
    deadline = None if time_budget_s is None else t0 + time_budget_s
    inputs = stack_feeds(feeds, samples)
    report = BrecqReport(samples=len(next(iter(inputs.values()))), tune_activations=tune_activations, drop=drop)
    gen = torch.Generator().manual_seed(seed)
    lq = quantized_lift(model, plan)
    lf = lift(model).eval()
    groups = quant_points_groups(lq, plan, model)
    blks = blocks(lq, plan, weight_layers(lq, plan), groups)
    q_env = dict(inputs)  # live tensors of the quantized model on all samples (graph inputs raw)
    f_env = dict(inputs)  # the same of the FP32 model
    learned: dict[str, np.ndarray] = {}
    with progress(disable=not show_progress) as bar:
        task = bar.add_task("brecq", total=len(blks), info="")
        for k, blk in enumerate(blks):
            if deadline is not None and time.perf_counter() >= deadline:
                report.skipped += [[la.w for la in b.layers] or list(b.act_roots) for b in blks[k:]
                                   if b.layers or (tune_activations and b.act_roots)]
                break
            if blk.layers or (tune_activations and blk.act_roots):
                bar.update(task, info=blk.layers[0].w if blk.layers else blk.act_roots[0])
                res = _reconstruct(blk, lq, lf, plan, groups, q_env, f_env, iters, tune_activations, drop, gen,
                                   deadline, learned)
                report.blocks.append(res)
                bar.update(task, info=f"{res.weights[0] if res.weights else ''}: "
                                      f"x{res.mse_learned / max(res.mse_start, 1e-30):.2f}")
            bar.advance(task)
            # the next blocks read this block's outputs, computed as the model now is
            q_env.update(_propagate(lq, blk, q_env))
            f_env.update(_propagate(lf, blk, f_env))
            later = {t for b in blks[k + 1:] for t in b.inputs}
            for env in (q_env, f_env):
                for t in [t for t in env if t not in later]:
                    del env[t]
    report.seconds = time.perf_counter() - t0
    return with_initializers(model, learned), report


def _set_group(lq: LiftedModule, plan: QuantPlan, groups: dict, root: str, tq: TensorQuant | None,
               module: nn.Module | None = None) -> None:
    """Every entry of `root`'s group gets `tq` in the plan and `module` (else a PlanQuant of tq) in lq."""
    for m in groups[root]:
        if tq is not None:
            plan.tensors[m] = tq
        lq.set_quantizer(m, module if module is not None else PlanQuant(plan.tensors[m]))


def _reconstruct(blk: Block, lq, lf, plan: QuantPlan, groups: dict, q_env: dict, f_env: dict, iters: int,
                 tune: bool, drop: float, gen: torch.Generator, deadline: float | None, learned: dict) -> BrecqBlock:
    xs = {t: q_env[t] for t in blk.inputs}
    xfs = {t: f_env[t] for t in blk.inputs}
    ts = _propagate(lf, blk, f_env)
    rounding: dict[str, Rounding] = {}
    for la in blk.layers:
        tq = plan.tensors[la.w]
        w = lq.tensor(la.w).detach().clone().float()
        rounding[la.w] = Rounding(w, torch.tensor(tq.scale, dtype=torch.float32), _axis(tq), *tq.qrange)
    nearest = {w: r.nearest * r.s for w, r in rounding.items()}
    mse_start = _mse(lq, blk, xs, ts, nearest)
    roots = list(blk.act_roots) if tune else []
    start_tq = {r: plan.tensors[r] for r in roots}
    tuned = {r: TunedQuant(start_tq[r]) for r in roots}
    for r, m in tuned.items():
        _set_group(lq, plan, groups, r, None, m)
    params = [{"params": [r.v for r in rounding.values()], "lr": LR}]
    if tuned:
        params.append({"params": [m.u for m in tuned.values()], "lr": ACT_LR})
    opt = torch.optim.Adam(params)
    n = len(next(iter(xs.values())))
    done = 0
    for it in range(iters):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        idx = torch.randint(n, (min(BATCH, n),), generator=gen)
        y = _run(lq, blk, {t: mix_inputs(v[idx], xfs[t][idx], drop, gen) for t, v in xs.items()},
                 {w: r.soft() for w, r in rounding.items()})
        loss = _loss(y, {o: v[idx] for o, v in ts.items()})
        if rounding and it >= WARM_START * iters:
            beta = beta_at(it, iters)
            loss = loss + REG_WEIGHT * sum(r.regularizer(beta) for r in rounding.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
    codes = {w: r.hard_codes() for w, r in rounding.items()}
    hard = {w: codes[w] * rounding[w].s for w in rounding}
    for r, m in tuned.items():  # the plan's float32 scales from here on, exactly what the export holds
        _set_group(lq, plan, groups, r, m.learned(start_tq[r]))
    mse_learned = _mse(lq, blk, xs, ts, hard)
    kept = "learned" if mse_learned < mse_start else "start"
    if kept == "start":
        for r in roots:
            _set_group(lq, plan, groups, r, start_tq[r])
    else:
        for w, v in hard.items():
            with torch.no_grad():
                lq.tensor(w).copy_(v)  # the weight fake-quant maps code * s to itself
            learned[w] = v.numpy().astype(np.float32)
    changed = sum(int((codes[w] != r.nearest).sum()) for w, r in rounding.items()) / max(
        sum(r.nearest.numel() for r in rounding.values()), 1)
    ratios = [float(np.mean(np.asarray(plan.tensors[r].scale) / np.asarray(start_tq[r].scale))) for r in roots]
    return BrecqBlock([la.w for la in blk.layers], [m for r in roots for m in groups[r]], mse_start, mse_learned,
                      done, kept, changed if kept == "learned" else 0.0, ratios)


@torch.no_grad()
def block_errors(fp32: onnx.ModelProto, tuned: onnx.ModelProto, plan: QuantPlan,
                 feeds: Iterable[dict[str, np.ndarray]], samples: int = 256) -> list[float]:
    """Per block of `tuned` (fused, with `plan`): the reconstruction error of its outputs in the whole quantized
    model against the FP32 model `fp32` (the same graph), on the first `samples` samples of `feeds`."""
    inputs = stack_feeds(feeds, samples)
    lq, lf = quantized_lift(tuned, plan), lift(fp32).eval()
    q_env, f_env, out = dict(inputs), dict(inputs), []
    for blk in blocks(lq, plan, groups=quant_points_groups(lq, plan, tuned)):
        yq, yf = _propagate(lq, blk, q_env), _propagate(lf, blk, f_env)
        out.append(float(_loss(yq, yf)))
        q_env.update(yq)
        f_env.update(yf)
    return out
