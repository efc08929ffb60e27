"""`qtool quantize`: post-training quantization to a QDQ graph.

    qmodel, plan = quantize(model, calib_batches, QuantConfig(calib="entropy"))

`quantize` fuses first (unless the model carries `qtool.units`, i.e. is already fused), marks the
tensors to quantize (passes.qdq.mark_tensors), calibrates the activations, builds a QuantPlan and
inserts Q/DQ from it. The plan's tensor names are those of the fused graph; `exporters.qdq.apply_plan`
inserts Q/DQ from any calibrated plan (QAT / search produce those too).

Defaults follow what is fast on x86 with VNNI and what onnxruntime fuses: uint8 asymmetric
activations (U8S8; S8S8 QDQ measured 1.4-1.7x slower than fp32 here), int8 symmetric per-channel
weights with narrow range.
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import onnx

import passes
from exporters.qdq import apply_plan
from qtool.calibrate import DEFAULT_BINS, METHODS, TensorStats, collect_stats
from qtool.errors import QtoolError
from qtool.fusion import FuseSummary, fuse, is_fused, untie_biases
from qtool.plan import QuantPlan, TensorQuant
from qtool.refine_config import check_refine_config, needs_refine

log = logging.getLogger(__name__)

# -- config --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantConfig:
    weight_bits: int = 8
    act_bits: int = 8
    calib: str = "mse"  # measured best-or-equal on ResNet-20 (benchmarks/results/suite.json)
    per_channel: bool = True
    act_signed: bool = False  # False: asymmetric uint8 (U8S8, fast with VNNI); True: int8
    act_symmetric: bool = False  # only with act_signed: zero point 0
    percentile: float = 99.99
    bins: int = DEFAULT_BINS
    max_batches: int | None = None
    calib_size: int = 512  # calibration images taken from a data SPEC's train split
    format: str = "qdq"  # qdq | qoperator (the same plan lowered by the exporter)
    # Outputs that collapse against FP32 on the calibration data (constant, NaN, SQNR < 1 dB) are an error.
    check_collapse: bool = True
    # Nodes kept in float: node-name glob patterns (fnmatch) or op types, e.g. ("/head/*", "Softmax").
    exclude: tuple[str, ...] = ()
    # Post-training refinements (qtool.adaround, qtool.biascorr), after calibration, on the calibration data.
    algo: str = "none"  # none | adaround (learned weight rounding)
    adaround_iters: int = 500  # optimization steps per layer
    adaround_samples: int = 256  # calibration samples the layers are reconstructed on
    bias_correction: bool = False  # empirical: each quantized Conv/Gemm's output mean per channel = FP32's
    time_budget_s: float | None = None  # bound on the refinements' wall time (None: no bound)
    seed: int = 0

    def __post_init__(self):
        for k in ("weight_bits", "act_bits"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 8:
                raise QtoolError(f"{k} must be an integer in 2..8, got {v!r}")
        if self.calib not in METHODS:
            raise QtoolError(f"calib must be one of {', '.join(METHODS)}, got {self.calib!r}")
        for k in ("per_channel", "act_signed", "act_symmetric", "check_collapse"):
            if not isinstance(getattr(self, k), bool):
                raise QtoolError(f"{k} must be true or false, got {getattr(self, k)!r}")
        if self.act_symmetric and not self.act_signed:
            raise QtoolError("act_symmetric needs act_signed (a symmetric uint8 range wastes half the codes)")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 50.0 < self.percentile <= 100.0:
            raise QtoolError(f"percentile must be in (50, 100], got {self.percentile!r}")
        if not isinstance(self.bins, int) or self.bins < 16 or self.bins % 4:
            raise QtoolError(f"bins must be a multiple of 4 and >= 16, got {self.bins!r}")
        if not isinstance(self.exclude, tuple) or not all(isinstance(p, str) and p for p in self.exclude):
            raise QtoolError(f"exclude must be a tuple of node-name patterns or op types, got {self.exclude!r}")
        if isinstance(self.calib_size, bool) or not isinstance(self.calib_size, int) or self.calib_size < 1:
            raise QtoolError(f"calib_size must be an integer >= 1, got {self.calib_size!r}")
        if self.format not in ("qdq", "qoperator"):
            raise QtoolError(f"format must be qdq or qoperator, got {self.format!r}")
        if self.max_batches is not None and (not isinstance(self.max_batches, int) or self.max_batches < 1):
            raise QtoolError(f"max_batches must be a positive integer or None, got {self.max_batches!r}")
        check_refine_config(self)


# -- plan ----------------------------------------------------------------------------------------

MIN_SCALE = float(np.finfo(np.float32).tiny)


def _scale(x: float) -> float:
    """A float32 scale; a range so small that range/levels underflows float32 gets the smallest
    normal float32, never 0 (ORT divides by the scale)."""
    return max(float(np.float32(x)), MIN_SCALE)


def weight_quant(w: np.ndarray, bits: int, axis: int | None) -> TensorQuant:
    """Symmetric, narrow range ([-(2^(b-1)-1), 2^(b-1)-1]), zero point 0."""
    qmax = 2 ** (bits - 1) - 1
    if axis is None:
        amax = float(np.max(np.abs(w))) if w.size else 0.0
        return TensorQuant("weight", bits, True, "per_tensor", None, _scale(amax / qmax) if amax > 0 else 1.0, 0, True)
    amax = np.max(np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)), axis=1)
    # An all-zero channel quantizes to 0 with any scale; 1.0 keeps the plan valid.
    scales = tuple(_scale(a / qmax) if a > 0 else 1.0 for a in amax)
    return TensorQuant("weight", bits, True, "per_channel", axis, scales, (0,) * len(scales), True)


def activation_quant(rmin: float, rmax: float, config: QuantConfig) -> TensorQuant:
    bits, signed = config.act_bits, config.act_signed
    proto = TensorQuant("activation", bits, signed)
    qmin, qmax = proto.qrange
    rmin, rmax = min(rmin, 0.0), max(rmax, 0.0)  # 0 must be exact (padding, Relu)
    if signed and config.act_symmetric:
        t = max(-rmin, rmax)
        s = _scale(t / qmax) if t > 0 else 1.0
        return TensorQuant("activation", bits, True, scale=s, zero_point=0)
    s = _scale((rmax - rmin) / (qmax - qmin)) if rmax > rmin else 1.0
    zp = int(np.clip(np.rint(qmin - rmin / s), qmin, qmax))
    return TensorQuant("activation", bits, signed, scale=s, zero_point=zp)


def excluder(model: onnx.ModelProto, patterns: tuple[str, ...]):
    """The node predicate of `QuantConfig.exclude` (None when empty); a pattern matching no node is an
    error, since it is almost always a typo that would silently quantize what was meant to stay float."""
    if not patterns:
        return None

    def hit(pattern: str, name: str, op_type: str) -> bool:
        return op_type == pattern or fnmatch.fnmatchcase(name, pattern)

    for p in patterns:
        if not any(hit(p, n.name, n.op_type) for n in model.graph.node):
            raise QtoolError(f"exclude pattern {p!r} matches no node (node-name globs or op types)")
    return lambda node: any(hit(p, node.name or "", node.op_type) for p in patterns)


def build_plan(model: onnx.ModelProto, config: QuantConfig,
               stats: dict[str, TensorStats] | None = None) -> QuantPlan:
    """Plan for a fused model: weights from their values, activations from `stats` (None: uncalibrated)."""
    m = passes.to_ir(model)
    marks = passes.mark_tensors(m.graph, excluder(model, config.exclude))
    plan = QuantPlan(meta={"producer": "qtool.quantize", "config": asdict(config)})
    for name, role in marks.tensors.items():
        if role.kind == "weight":
            w = m.graph.initializers[name].const_value.numpy()
            if not np.isfinite(w).all():
                raise QtoolError(f"weight {name!r} has NaN/Inf values; it cannot be quantized")
            plan.tensors[name] = weight_quant(w, config.weight_bits, role.axis if config.per_channel else None)
    for name in marks.activations():
        root = marks.root(name)
        if stats is None:
            plan.tensors[name] = TensorQuant("activation", config.act_bits, config.act_signed)
        elif root in stats:
            rmin, rmax = stats[root].range(config.calib, signed=config.act_signed, bits=config.act_bits,
                                           percentile=config.percentile)
            plan.tensors[name] = activation_quant(rmin, rmax, config)
    # Pass-through outputs reuse their source's parameters (needed for onnxruntime to drop their QDQ).
    for name in marks.activations():
        root = marks.root(name)
        if root != name and root in plan.tensors:
            plan.tensors[name] = plan.tensors[root]
    # Keep the graph's order so the JSON reads top to bottom.
    return plan


def quantize(model: onnx.ModelProto, calib_batches: Iterable[dict[str, np.ndarray]],
             config: QuantConfig = QuantConfig()) -> tuple[onnx.ModelProto, QuantPlan]:
    tuned, plan = quantize_plan(model, calib_batches, config)
    return apply_plan(tuned, plan), plan


def quantize_plan(model: onnx.ModelProto, calib_batches: Iterable[dict[str, np.ndarray]],
                  config: QuantConfig = QuantConfig()) -> tuple[onnx.ModelProto, QuantPlan]:
    """The fused model (with the refined weights / biases of config.algo / bias_correction) and its plan."""
    if not isinstance(config, QuantConfig):
        raise QtoolError(f"config must be a QuantConfig, got {type(config).__name__}")
    model = fuse(model)[0] if not is_fused(model) else untie_biases(model)
    marks = passes.mark_tensors(passes.to_ir(model).graph, excluder(model, config.exclude))
    if not marks.tensors:
        raise QtoolError("nothing to quantize: the model has no Conv/Gemm/MatMul with constant weights and no "
                         "other quantizable op (Add, Concat, pooling)")
    roots = list(dict.fromkeys(marks.root(a) for a in marks.activations()))
    if needs_refine(config):
        calib_batches = list(calib_batches)  # read again by the refinement
    # minmax needs no histogram: skipping it makes calibration about one inference pass over the data
    stats = collect_stats(model, calib_batches, roots, bins=config.bins, max_batches=config.max_batches,
                          histograms=config.calib != "minmax")
    plan = build_plan(model, config, stats)
    if needs_refine(config):
        from qtool.refine import refine  # torch: imported only when asked for

        model = refine(model, plan, calib_batches, config)
    return model, plan


@dataclass
class QuantizeSummary:
    config: QuantConfig
    tensors: dict[str, int]  # plan counts by kind/bits/granularity
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    fuse: FuseSummary | None = None

    def lines(self) -> list[str]:
        out = [f"calibration: {self.config.calib}, weights {self.config.weight_bits}-bit "
               f"{'per-channel' if self.config.per_channel else 'per-tensor'}, activations "
               f"{'int' if self.config.act_signed else 'uint'}{self.config.act_bits}"]
        out.append("quantized tensors: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.tensors.items())))
        q = sum(self.ops_after.get(k, 0) for k in ("QuantizeLinear",))
        out.append(f"nodes: {sum(self.ops_before.values())} -> {sum(self.ops_after.values())} ({q} QuantizeLinear)")
        if self.fuse is not None:
            out += ["fuse: " + line for line in self.fuse.lines()]
        return out
