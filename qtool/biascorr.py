"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2, the empirical form):
quantization shifts the mean of a layer's output; adding the shift back to the bias removes it.

For each quantized Conv / Gemm in graph order, on the calibration samples: the per-channel mean of its
output (before the Relu / the output quantizer) in the quantized model (the layers before it already
corrected, weights and activations fake-quantized as the plan says) and in the FP32 model; the bias
gets `mean_fp32 - mean_quantized`. A layer without a bias gets a zero bias first (Conv input 2, Gemm C).
The correction is then quantized with the bias (int32, scale s_x s_w) by `exporters.qdq.apply_plan`.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from qtool.layerwise import capture, quantized_lift, stack_feeds, weight_layers
from qtool.lift import lift
from qtool.plan import QuantPlan
from qtool.progress import progress

__all__ = ["BiasCorrection", "BiasCorrectionReport", "bias_correct"]


@dataclass
class BiasCorrection:
    bias: str
    mean_abs_shift: float  # mean over channels of |mean_fp32 - mean_quantized| before the correction
    output_std: float  # the FP32 output's standard deviation, for scale


@dataclass
class BiasCorrectionReport:
    layers: list[BiasCorrection] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # time budget over
    samples: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rel = [c.mean_abs_shift / c.output_std for c in self.layers if c.output_std > 0]
        out = [f"bias correction: {len(self.layers)} layers on {self.samples} samples in {self.seconds:.1f} s"
               + (f", output mean shift removed: median {np.median(rel):.3f} std" if rel else "")]
        if self.skipped:
            out.append(f"bias correction: time budget over, {len(self.skipped)} layers left uncorrected")
        return out


def _with_biases(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """A copy where every planned Conv / Gemm without a bias has a zero one."""
    out = copy.deepcopy(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    taken = set(inits) | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) >= 3 or node.input[1] not in inits:
            continue
        tq = plan.tensors.get(node.input[1])
        if tq is None or tq.kind != "weight":
            continue
        w = inits[node.input[1]]
        if node.op_type == "Conv":
            n_out = w.dims[0]
        else:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
                continue
            n_out = w.dims[0] if attrs.get("transB", 0) else w.dims[1]
        name, i = f"{node.input[1]}_bias", 1
        while name in taken:
            name, i = f"{node.input[1]}_bias{i}", i + 1
        taken.add(name)
        g.initializer.append(numpy_helper.from_array(np.zeros(n_out, np.float32), name))
        node.input.append(name)
    return out


def _channel_sums(axis: int):
    """Per batch: the per-channel sum, the per-channel sum of squares, the values per channel."""
    def reduce(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        a = axis % y.dim()
        dims = [d for d in range(y.dim()) if d != a]
        y = y.double()
        return y.sum(dim=dims), (y * y).sum(dim=dims), y.numel() // y.shape[a]
    return reduce


def _mean_std(parts: list) -> tuple[torch.Tensor, float]:
    n = sum(p[2] for p in parts)
    mean = sum(p[0] for p in parts) / n
    var = float((sum(p[1] for p in parts) / n - mean ** 2).mean())
    return mean, max(var, 0.0) ** 0.5


@torch.no_grad()
def bias_correct(fp_model: onnx.ModelProto, model: onnx.ModelProto, plan: QuantPlan,
                 feeds: Iterable[dict[str, np.ndarray]], *, samples: int = 256, time_budget_s: float | None = None,
                 show_progress: bool = True) -> tuple[onnx.ModelProto, BiasCorrectionReport]:
    """A copy of `model` (the fused graph of `plan`, possibly with refined weights) with corrected biases;
    `fp_model` is the FP32 reference (the same graph with its original weights)."""
    t0 = time.perf_counter()
    deadline = None if time_budget_s is None else t0 + time_budget_s
    inputs = stack_feeds(feeds, samples)
    report = BiasCorrectionReport(samples=len(next(iter(inputs.values()))))
    out = _with_biases(model, plan)
    lq = quantized_lift(out, plan)
    lf = lift(fp_model).eval()
    layers = [la for la in weight_layers(lq, plan) if la.op in ("Conv", "Gemm") and la.b is not None]
    corrected: dict[str, np.ndarray] = {}
    with progress(disable=not show_progress) as bar:
        task = bar.add_task("bias correction", total=len(layers), info="")
        for layer in layers:
            if deadline is not None and time.perf_counter() >= deadline:
                report.skipped.append(layer.b)
                bar.advance(task)
                continue
            axis = 1 if layer.op == "Conv" else -1
            mean_f, std = _mean_std(capture(lf, layer.out, inputs, quantized=False, reduce=_channel_sums(axis)))
            mean_q, _ = _mean_std(capture(lq, layer.out, inputs, quantized=False, reduce=_channel_sums(axis)))
            shift = (mean_f - mean_q).float()
            b = lq.tensor(layer.b)
            b.add_(shift.reshape(b.shape))
            corrected[layer.b] = b.detach().numpy().astype(np.float32)
            report.layers.append(BiasCorrection(layer.b, float(shift.abs().mean()), std))
            bar.advance(task)
    report.seconds = time.perf_counter() - t0
    for t in out.graph.initializer:
        if t.name in corrected:
            t.CopyFrom(numpy_helper.from_array(corrected[t.name], t.name))
    return out, report
