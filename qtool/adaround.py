"""AdaRound: learned up/down rounding of weights (Nagel et al. 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization"), layer by layer, from unlabeled calibration data.

For each quantized Conv / Gemm / MatMul in graph order, with weight W, per-channel scale s and integer
range [n, p] of the plan:

    W~ = s * clamp(floor(W / s) + h(V), n, p),   h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)

with zeta = 1.1, gamma = -0.1 and V initialized so that W~ = W (h = the fractional part). V minimizes

    || f(W~ x_q) - f(W x) ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

where x_q is the layer's input in the quantized model (the layers before it already hard-rounded,
activations fake-quantized as the plan says), x its input in the FP32 model, f the Relu / Clip right after
the layer (if any), the first term summed over channels and averaged over samples and positions, lambda =
0.01, beta annealed from 20 to 2 (cosine) after a warm start of 20 % of the iterations without the
regularizer; Adam, batches of 32 samples. The result is hard rounding: h(V) >= 1/2 rounds up.

`drop` > 0 is QDrop (Wei et al. 2022, "QDrop: Randomly Dropping Quantization for Extremely Low-bit
Post-Training Quantization"): in each step every element of x_q is replaced by x's with probability `drop`,
so the rounding is fitted to a mix of the quantized and the FP32 input, which generalizes better than
fitting the calibration samples' exact quantization noise (at 0.5, ResNet-20: +0.26 pp top-1 at W4A8, +0.92
pp at W4A4; but MobileNetV2 x0.5 W4A8: -0.36 pp; benchmarks/results/lowbit*.md), hence opt-in. It costs a
random draw per input element per step.

The learned codes are written back as weights `code * s` (float32) with the plan's scales unchanged:
`exporters.qdq.apply_plan` quantizes `code * s` back to exactly `code` (round((code s) / s) = code), so the
QDQ model's dequantized weights are the learned codes times the scale, and the result is a plain QDQ
model. A layer whose learned rounding reconstructs worse than nearest rounding on the samples keeps
nearest rounding (reported). `time_budget_s` bounds the run: the layer being optimized when it runs out
is finished with the rounding learned so far, the layers after it keep nearest rounding (reported).
Deterministic for a seed (batch sampling) unless the time budget cuts it short.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from qtool.layerwise import (Layer, capture, channel_view, quantized_lift, stack_feeds, weight_layers,
                             with_initializers)
from qtool.lift import lift
from qtool.lift_ops import run_op
from qtool.plan import QuantPlan
from qtool.progress import progress

__all__ = ["AdaRoundLayer", "AdaRoundReport", "Rounding", "adaround", "beta_at", "mix_inputs", "recon_error"]

ZETA, GAMMA = 1.1, -0.1
REG_WEIGHT = 0.01
BETA_START, BETA_END = 20.0, 2.0
WARM_START = 0.2
LR = 1e-2  # Adam on V; measured on ResNet-20: at a few hundred iterations 1e-3 leaves most V undecided
BATCH = 32


@dataclass
class AdaRoundLayer:
    weight: str
    mse_nearest: float  # reconstruction error of f(layer output) on the samples, nearest rounding
    mse_learned: float  # the same with the learned rounding
    iterations: int
    kept: str  # "learned" | "nearest"
    changed: float  # fraction of weights rounded differently from nearest


@dataclass
class AdaRoundReport:
    layers: list[AdaRoundLayer] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # weights left at nearest rounding: time budget over
    samples: int = 0
    seconds: float = 0.0
    drop: float = 0.0

    def lines(self) -> list[str]:
        learned = [r for r in self.layers if r.kept == "learned"]
        ratio = [r.mse_learned / r.mse_nearest for r in learned if r.mse_nearest > 0]
        qdrop = f" (QDrop {self.drop:g})" if self.drop else ""
        out = [f"adaround: {len(learned)}/{len(self.layers) + len(self.skipped)} layers learned on {self.samples} "
               f"samples{qdrop} in {self.seconds:.1f} s"
               + (f", reconstruction error x{np.median(ratio):.2f} (median vs nearest)" if ratio else "")]
        worse = [r.weight for r in self.layers if r.kept == "nearest"]
        if worse:
            out.append(f"adaround: kept nearest rounding (learned was worse) for {', '.join(worse)}")
        if self.skipped:
            out.append(f"adaround: time budget over, {len(self.skipped)} layers keep nearest rounding: "
                       + ", ".join(self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else ""))
        return out


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _init_v(frac: torch.Tensor) -> torch.Tensor:
    """V with h(V) = frac (frac in [0, 1))."""
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def beta_at(it: int, iters: int) -> float:
    """The regularizer's exponent at step `it` (cosine from BETA_START to BETA_END after the warm start)."""
    warm = WARM_START * iters
    rel = (it - warm) / max(iters - warm, 1)
    return BETA_END + 0.5 * (BETA_START - BETA_END) * (1 + math.cos(rel * math.pi))


class Rounding:
    """The soft / hard rounded weight of one layer."""

    def __init__(self, w: torch.Tensor, scale: torch.Tensor, axis: int | None, qmin: int, qmax: int):
        self.s = channel_view(scale, w.dim(), axis)
        self.floor = torch.floor(w / self.s)
        self.nearest = torch.round(w / self.s).clamp(qmin, qmax)  # what apply_plan does (half to even)
        self.qmin, self.qmax = qmin, qmax
        self.v = _init_v(w / self.s - self.floor).requires_grad_(True)

    def soft(self) -> torch.Tensor:
        return self.s * torch.clamp(self.floor + _h(self.v), self.qmin, self.qmax)

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2 h(V) - 1|^beta): pushes every h(V) to 0 or 1."""
        return (1 - (2 * _h(self.v) - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        return torch.clamp(self.floor + (self.v >= 0).to(self.floor.dtype), self.qmin, self.qmax)


def mix_inputs(xq: torch.Tensor, xf: torch.Tensor, drop: float, gen: torch.Generator) -> torch.Tensor:
    """QDrop: each element of the quantized model's input `xq` replaced by the FP32 model's `xf` with
    probability `drop` (the quantization noise of the layers before is kept on the other elements)."""
    if drop <= 0:
        return xq
    return torch.where(torch.rand(xq.shape, generator=gen) < drop, xf, xq)


def _layer_out(layer: Layer, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return layer.activation(run_op(layer.op, layer.attrs, False, *layer.inputs(x, w, b)))


def recon_error(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (axis 1, or the last axis of a Gemm / MatMul output), mean elsewhere."""
    d = (y - target) ** 2
    return d.sum(1).mean() if y.dim() > 2 else d.sum(-1).mean()


@torch.no_grad()
def _mse(layer: Layer, xs: list, ts: list, w: torch.Tensor, b: torch.Tensor | None) -> float:
    total = sum(float(recon_error(_layer_out(layer, x, w, b), t)) * len(x) for x, t in zip(xs, ts))
    return total / sum(len(x) for x in xs)


def adaround(model: onnx.ModelProto, plan: QuantPlan, feeds: Iterable[dict[str, np.ndarray]], *, iters: int = 500,
             samples: int = 256, drop: float = 0.0, time_budget_s: float | None = None, seed: int = 0,
             show_progress: bool = True) -> tuple[onnx.ModelProto, AdaRoundReport]:
    """A copy of the fused `model` whose planned weights are `learned code * scale` (see the module doc)."""
    t0 = time.perf_counter()
    deadline = None if time_budget_s is None else t0 + time_budget_s
    inputs = stack_feeds(feeds, samples)
    report = AdaRoundReport(samples=len(next(iter(inputs.values()))), drop=drop)
    gen = torch.Generator().manual_seed(seed)
    lq = quantized_lift(model, plan)
    lf = lift(model).eval()
    layers = weight_layers(lq, plan)
    learned: dict[str, np.ndarray] = {}
    with progress(disable=not show_progress) as bar:
        task = bar.add_task("adaround", total=len(layers), info="")
        for layer in layers:
            if deadline is not None and time.perf_counter() >= deadline:
                report.skipped.append(layer.w)
                bar.advance(task)
                continue
            bar.update(task, info=layer.w)
            res, codes = _round_layer(layer, lq, lf, plan, inputs, iters, drop, gen, deadline)
            report.layers.append(res)
            if res.kept == "learned":
                param = lq.tensor(layer.w)
                w = (codes * channel_view(torch.tensor(plan.tensors[layer.w].scale, dtype=torch.float32),
                                          codes.dim(), _axis(plan, layer.w)))
                with torch.no_grad():
                    param.copy_(w)  # the weight fake-quant maps code * s to itself
                learned[layer.w] = w.numpy().astype(np.float32)
            bar.update(task, advance=1, info=f"{layer.w}: x{res.mse_learned / max(res.mse_nearest, 1e-30):.2f}")
    report.seconds = time.perf_counter() - t0
    return with_initializers(model, learned), report


def _axis(plan: QuantPlan, name: str) -> int | None:
    tq = plan.tensors[name]
    return tq.axis if tq.granularity == "per_channel" else None


def _round_layer(layer: Layer, lq, lf, plan: QuantPlan, inputs: dict, iters: int, drop: float,
                 gen: torch.Generator, deadline: float | None) -> tuple[AdaRoundLayer, torch.Tensor]:
    tq = plan.tensors[layer.w]
    qmin, qmax = tq.qrange
    xs = capture(lq, layer.x, inputs)  # the quantized model's input to this layer (fake-quantized)
    ts = capture(lf, layer.y, inputs, quantized=False)  # the FP32 model's output
    x_all, t_all = torch.cat(xs), torch.cat(ts)
    xf_all = torch.cat(capture(lf, layer.x, inputs, quantized=False)) if drop > 0 else x_all
    w = lq.tensor(layer.w).detach().clone().float()
    b = lq.tensor(layer.b).detach() if layer.b is not None else None
    r = Rounding(w, torch.tensor(tq.scale, dtype=torch.float32), _axis(plan, layer.w), qmin, qmax)
    opt = torch.optim.Adam([r.v], lr=LR)
    n = len(x_all)
    done = 0
    for it in range(iters):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        idx = torch.randint(n, (min(BATCH, n),), generator=gen)
        y = _layer_out(layer, mix_inputs(x_all[idx], xf_all[idx], drop, gen), r.soft(), b)
        loss = recon_error(y, t_all[idx])
        if it >= WARM_START * iters:
            loss = loss + REG_WEIGHT * r.regularizer(beta_at(it, iters))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
    codes = r.hard_codes()
    s = r.s
    mse_near = _mse(layer, xs, ts, r.nearest * s, b)
    mse_learn = _mse(layer, xs, ts, codes * s, b)
    kept = "learned" if mse_learn < mse_near else "nearest"
    changed = float((codes != r.nearest).float().mean())
    return AdaRoundLayer(layer.w, mse_near, mse_learn, done, kept, changed), codes
