"""`qtool quantize`: post-training quantization to a QDQ graph.

    qmodel, plan = quantize(model, calib_batches, QuantConfig(calib="entropy"))

`quantize` fuses first (unless the model carries `qtool.units`, i.e. is already fused), marks the
tensors to quantize (passes.qdq.mark_tensors), calibrates the activations, builds a QuantPlan and
inserts Q/DQ from it. The plan's tensor names are those of the fused graph; `exporters.qdq.apply_plan`
inserts Q/DQ from any calibrated plan (QAT / search produce those too).

Defaults follow what is fast on x86 with VNNI and what onnxruntime fuses: uint8 asymmetric
activations (U8S8; S8S8 QDQ measured 1.4-1.7x slower than fp32 here), int8 symmetric per-channel
weights with narrow range. Without VNNI, onnxruntime's U8S8 kernels add pairs of products in int16
with saturation; `weight_range="auto"` then widens each channel's scale just enough that no pair of
codes can saturate against the activation codes each input channel reached in calibration
(`kernel_pairs`), so the deployed model computes what the plan says.
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import onnx

import passes
from exporters.qdq import apply_dynamic_plan, apply_plan
from qtool.calibrate import DEFAULT_BINS, METHODS, TensorStats, collect_stats
from qtool.errors import QtoolError
from qtool.fusion import FuseSummary, fuse, is_fused, untie_biases
from qtool.ortkernels import PAIRS, PAIRS_HWC, pair_sums, reachable_pair_sums, saturates
from qtool.plan import QuantPlan, TensorQuant, range_quant, scale_of
from qtool.quant_points import first_last_tensors, from_marks, node_tensors
from qtool.control_config import check_control_config
from qtool.refine_config import LEARNED_ROUNDING, check_refine_config, needs_refine
from qtool.rescale import check_rescale_config, needs_rescale, rescale

log = logging.getLogger(__name__)

ACTIVATIONS = ("static", "dynamic", "none")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits accepts: a power of 2 >= 16
# Saturating U8S8 kernels add K-adjacent products in int16: with activation codes up to 255 a pair is exact
# while |q_a| + |q_b| <= 128. Scaling pairs to 127 leaves one code for rounding (|round a| + |round b| <= |a| + |b| + 1).
PAIR_CODE_MAX = 128
PAIR_SCALE_DIVISOR = PAIR_CODE_MAX - 1
WEIGHT_RANGES = ("auto", "full", "pair-safe")

# -- config --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantConfig:
    weight_bits: int | None = None  # None: 8, or 4 with activations="none"
    act_bits: int = 8
    # Bits of the first and last weighted layer (their weights and inputs; the last one's output too), the
    # policy of `qtool qat` (QATConfig.first_last_bits) and of the low-bit literature; None: uniform bits.
    first_last_bits: int | None = None
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
    # Per-tensor rows of the error report (two extra unoptimized runs per report sample); the outputs
    # are compared against FP32 either way.
    per_tensor_report: bool = False
    # "static": activations calibrated on data, Q/DQ in the graph. "dynamic": int8 MatMul/Gemm weights,
    # activations quantized at run time (DynamicQuantizeLinear + MatMulInteger), no calibration data.
    # "none": weight-only, MatMul/Gemm weights in blocks along K as onnxruntime's MatMulNBits (qtool.nbits;
    # weight_bits=4), activations float; data only for algo="gptq" and the FP32 comparison.
    activations: str = "static"
    block_size: int = 32  # activations="none": weights per scale along K
    # activations="none": asymmetric blocks (a uint4 zero point each; +0.4 to +2.4 dB output SQNR over symmetric
    # on the zoo's BERT / ViT, benchmarks/results/nbits.md, for 0.5% more bytes) or symmetric int4 (none)
    weight_symmetric: bool = False
    # Weight scales that keep int16-saturating kernels exact: auto (where this CPU's kernels saturate),
    # pair-safe (always: for a model deployed on x86 without VNNI), full (plain max scaling).
    weight_range: str = "auto"
    # Post-training refinements (qtool.adaround, qtool.biascorr), after calibration, on the calibration data.
    # none | adaround (learned weight rounding, layer by layer) | brecq (the same, block by block: qtool.brecq)
    # | gptq (weight-only: Hessian-based rounding, activations="none")
    algo: str = "none"
    adaround_iters: int = 500  # optimization steps per layer (adaround) / per block (brecq)
    adaround_samples: int = 256  # calibration samples the layers / blocks are reconstructed on
    tune_activations: bool = False  # brecq: learn the plan's activation scales with the rounding (LSQ gradient)
    # adaround / brecq (QDrop, Wei et al. 2022): each element of a layer's / block's input is the FP32 model's
    # instead of the quantized model's with this probability, redrawn every step (0: always the quantized input)
    qdrop: float = 0.0
    bias_correction: bool = False  # empirical: each quantized Conv/Gemm's output mean per channel = FP32's
    time_budget_s: float | None = None  # bound on the refinements' / the accuracy control's wall time (None: no bound)
    seed: int = 0
    # Equivalent FP32 rescalings before calibration (qtool.rescale): cross-layer equalization of Conv pairs,
    # SmoothQuant of LayerNorm -> MatMul/Gemm with this alpha (None: off).
    equalize: bool = False
    smoothquant: float | None = None
    # Accuracy control (qtool.accuracy_control): per quantization unit float / int8 / w4a8 (target "cpu"), raised
    # from weight_bits until the budget holds on evaluation data disjoint from the calibration samples.
    max_drop: float | None = None  # percentage points of top-1 (labels) or of top-1 agreement with FP32
    min_sqnr_db: float | None = None  # metric "sqnr": the worst output's SQNR vs FP32 must reach this
    # max_drop must hold for the drop's one-sided upper confidence bound at this level (e.g. 0.9), not only for the
    # drop measured: the greedy stops at the first state under budget, which on a finite evaluation set
    # is an optimistic pick (None: the measured drop, as NNCF's accuracy control).
    confidence: float | None = None
    metric: str = "auto"  # auto (top1 with labels, else agreement for class scores) | top1 | agreement | sqnr
    target: str = "cpu"  # where the model runs: decides the per-unit choices and whose latency is measured
    eval_size: int | None = None  # evaluation samples (None: the whole val split / every non-calibration sample)
    candidates: int = 4  # units measured on onnxruntime per greedy step (the cheapest-ranked most sensitive)

    def __post_init__(self):
        if self.weight_bits is None:
            object.__setattr__(self, "weight_bits", 4 if self.activations == "none" else 8)
        for k in ("weight_bits", "act_bits", "first_last_bits"):
            v = getattr(self, k)
            optional = k == "first_last_bits"
            if (v is not None or not optional) and (not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 8):
                raise QtoolError(f"{k} must be an integer in 2..8{' or None' if optional else ''}, got {v!r}")
        if self.first_last_bits is not None:
            if self.activations != "static":
                raise QtoolError("first_last_bits sets the bits of static quantization; "
                                 f"activations={self.activations!r} has its own fixed bits")
            if self.max_drop is not None or self.min_sqnr_db is not None:
                raise QtoolError("first_last_bits does not combine with the accuracy control (max_drop / "
                                 "min_sqnr_db), which chooses every unit's bits itself")
        if self.calib not in METHODS:
            raise QtoolError(f"calib must be one of {', '.join(METHODS)}, got {self.calib!r}")
        for k in ("per_channel", "act_signed", "act_symmetric", "check_collapse", "per_tensor_report",
                  "weight_symmetric"):
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
        if self.weight_range not in WEIGHT_RANGES:
            raise QtoolError(f"weight_range must be one of {', '.join(WEIGHT_RANGES)}, got {self.weight_range!r}")
        if self.activations not in ACTIVATIONS:
            raise QtoolError(f"activations must be static, dynamic or none, got {self.activations!r}")
        if isinstance(self.block_size, bool) or self.block_size not in BLOCK_SIZES:
            raise QtoolError(f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size!r}")
        if self.activations == "none":
            if self.weight_bits != 4:
                raise QtoolError("activations='none' (weight-only MatMulNBits) quantizes weights to 4 bits, "
                                 f"got weight_bits={self.weight_bits}")
            if self.format != "qdq":
                raise QtoolError("activations='none' writes MatMulNBits nodes; format must stay qdq")
            if self.algo in LEARNED_ROUNDING or self.bias_correction:
                raise QtoolError(f"{self.algo if self.algo != 'none' else 'bias_correction'} refines static "
                                 "quantization; with activations='none' "
                                 "use algo='gptq' (or 'none': round to nearest)")
        elif self.algo == "gptq":
            raise QtoolError(f"algo='gptq' is weight-only: it needs activations='none', got {self.activations!r}")
        if self.activations == "dynamic":
            if self.weight_bits != 8 or self.act_bits != 8:
                raise QtoolError("activations='dynamic' quantizes to 8 bits (weight_bits=8, act_bits=8), "
                                 f"got weight_bits={self.weight_bits}, act_bits={self.act_bits}")
            if self.format != "qdq":
                raise QtoolError("activations='dynamic' writes its own integer graph; format must stay qdq")
            if self.algo != "none" or self.bias_correction:
                raise QtoolError("algo / bias_correction refine calibrated static quantization; "
                                 "activations='dynamic' has no calibration to refine")
        if self.max_batches is not None and (not isinstance(self.max_batches, int) or self.max_batches < 1):
            raise QtoolError(f"max_batches must be a positive integer or None, got {self.max_batches!r}")
        check_refine_config(self)
        check_rescale_config(self)
        check_control_config(self)


# -- plan ----------------------------------------------------------------------------------------

def weight_quant(w: np.ndarray, bits: int, axis: int | None, pairs: np.ndarray | None = None) -> TensorQuant:
    """Symmetric, narrow range ([-(2^(b-1)-1), 2^(b-1)-1]), zero point 0.

    `pairs`: per output channel (on `axis`, or one value) the largest |w_a| + |w_b| a saturating kernel
    sums in int16 (`kernel_pairs`); the scale then also keeps every pair of codes at or below
    PAIR_CODE_MAX, so that kernel computes exactly (module docstring of qtool.ortkernels)."""
    qmax = 2 ** (bits - 1) - 1
    if axis is None:
        amax = float(np.max(np.abs(w))) if w.size else 0.0
        if pairs is not None:
            amax = max(amax, float(np.max(pairs)) * qmax / PAIR_SCALE_DIVISOR)
        return TensorQuant("weight", bits, True, "per_tensor", None, scale_of(amax / qmax) if amax > 0 else 1.0, 0, True)
    amax = np.max(np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)), axis=1)
    if pairs is not None:
        amax = np.maximum(amax, np.asarray(pairs, np.float64) * qmax / PAIR_SCALE_DIVISOR)
    # An all-zero channel quantizes to 0 with any scale; 1.0 keeps the plan valid.
    scales = tuple(scale_of(a / qmax) if a > 0 else 1.0 for a in amax)
    return TensorQuant("weight", bits, True, "per_channel", axis, scales, (0,) * len(scales), True)


def _pair_reader(node, w: np.ndarray):
    """(kernel, K order, weight as (out, K...), its activation input, that input's channel axis) of a
    weight's reader with a saturable integer kernel, or None."""
    if node.op_type == "Conv":
        depthwise = w.ndim > 1 and w.shape[1] == 1
        return ("QLinearConv depthwise" if depthwise else "QLinearConv"), PAIRS_HWC, w, node.inputs[0], 1
    if node.op_type == "Gemm":
        trans_b = "transB" in node.attributes and node.attributes["transB"].as_int()
        return "QGemm", PAIRS, (w if trans_b else w.T), node.inputs[0], -1
    if node.op_type == "MatMul" and w.ndim == 2:
        return "QGemm", PAIRS, w.T, node.inputs[0], -1
    return None


def pair_inputs(graph, weights, weight_range: str, signed: bool) -> dict[str, int]:
    """The activations (name -> channel axis) whose per-channel calibrated range `kernel_pairs` uses
    for `weights`: the inputs of every reader whose kernel the bound applies to."""
    found: dict[str, int] = {}
    if weight_range == "full":
        return found
    for name in weights:
        w = graph.initializers[name].const_value
        for node, _ in graph.initializers[name].uses():
            r = _pair_reader(node, np.empty(w.shape, np.float32))
            if r is None or (weight_range == "auto" and not saturates(r[0], signed)) or r[3] is None:
                continue
            found.setdefault(r[3].name, r[4])
    return found


def reachable_codes(stats: TensorStats | None, tq: TensorQuant | None, padded: bool):
    """(lo, hi) per channel: the raw uint8 codes (int8 ones + 128, as onnxruntime's x86 kernels read them)
    the activation reached in calibration, from its per-channel min / max and its quantization; None
    when unknown. `padded`: a conv pads with the zero point, which is then reachable too."""
    if stats is None or stats.channel_min is None or tq is None or not tq.calibrated or tq.granularity != "per_tensor":
        return None
    qmin, qmax = tq.qrange
    shift = 128 if tq.signed else 0
    lo, hi = (np.clip(np.rint(v / tq.scale) + tq.zero_point, qmin, qmax) + shift
              for v in (stats.channel_min, stats.channel_max))
    if padded:
        lo, hi = np.minimum(lo, tq.zero_point + shift), np.maximum(hi, tq.zero_point + shift)
    return lo, hi


def kernel_pairs(graph, name: str, w: np.ndarray, weight_range: str, signed: bool,
                 codes=None) -> np.ndarray | None:
    """The pair sums `weight_quant` must bound for weight `name` (None: plain max scaling).

    "pair-safe" bounds them for every saturating-kernel reader (Conv, Gemm, MatMul); "auto" only where
    onnxruntime's kernel saturates on this CPU (x86 without VNNI, measured by qtool.ortkernels); "full"
    never. Measured on a random-weight ResNet here: output SQNR 14.6 dB per-channel with "full" (many
    saturated sums), 21.8 dB pair-safe, onnxruntime's per-tensor quantize_static 21.5 dB.

    `codes(input name, padded)`: the (lo, hi) raw codes per input channel the reader's activation
    reached in calibration (`reachable_codes`), or None. Where known, the bound is on what those codes
    can sum to (`ortkernels.reachable_pair_sums`: signs and per-channel ranges), not on 255 (|w_a| + |w_b|).
    A pair of large weights only saturates against two high codes, and in most channels the codes stay
    far below 255 (a LayerNorm's output sits around its zero point; one outlier channel sets the tensor's
    max). Measured on the zoo (docs/FINDINGS.md): up to +2.3 dB (DETR), Swin 26.95 -> 27.73 dB; RegNet -0.08."""
    if weight_range == "full":
        return None
    found = None
    for node, _ in graph.initializers[name].uses():
        r = _pair_reader(node, w)
        if r is None:
            continue
        kernel, order, k, x, _ = r
        if weight_range == "auto" and not saturates(kernel, signed):
            continue
        reach = codes(x.name, node.op_type == "Conv") if codes is not None and x is not None else None
        if reach is not None and len(reach[0]) == (k.shape[1] * _group(node) if order == PAIRS_HWC else k.shape[1]):
            p = reachable_pair_sums(k, order, *reach, group=_group(node))
        else:
            p = pair_sums(k, order)
        found = p if found is None else np.maximum(found, p)
    return found


def _group(node) -> int:
    return node.attributes["group"].as_int() if "group" in node.attributes else 1


def dynamic_weight_quant(w: np.ndarray, axis: int, per_channel: bool) -> TensorQuant:
    """An int8 weight of a dynamic MatMul / Gemm (`axis`: its output columns; K is the other axis),
    symmetric, zero point 0, pair-safe like `weight_quant` on every CPU: no two codes adjacent along K
    sum above PAIR_CODE_MAX in magnitude.

    onnxruntime's uint8 x int8 GEMM without VNNI adds the products of K-adjacent pairs in int16 with
    saturation (qtool.ortkernels), and run-time activation codes reach 255. The bound only widens the
    scale of columns where two large weights meet (measured output SQNR on BERT / Wav2Vec2: 46.4 / 37.6
    dB per column with it, 42.7 / 32.8 dB with plain max scaling, 44.3 / 36.4 dB with 7-bit weights)."""
    pairs = pair_sums(w.T if axis == 1 else w, PAIRS)  # per output column
    return weight_quant(w, 8, axis if per_channel else None, pairs)


def activation_quant(rmin: float, rmax: float, config: QuantConfig, bits: int | None = None) -> TensorQuant:
    """`bits`: other than config.act_bits (the first/last layer's)."""
    return range_quant(rmin, rmax, bits or config.act_bits, config.act_signed, config.act_symmetric)


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
               stats: dict[str, TensorStats] | None = None, exclude=None) -> QuantPlan:
    """Plan for a fused model: weights from their values, activations from `stats` (None: uncalibrated).
    `exclude`: the node predicate (default: `excluder` of `config.exclude`)."""
    m = passes.to_ir(model)
    marks = passes.mark_tensors(m.graph, exclude or excluder(model, config.exclude))
    plan = QuantPlan(meta={"producer": "qtool.quantize", "config": asdict(config)})
    edge = set()  # tensors (weights, activation roots) at first_last_bits
    if config.first_last_bits is not None:
        edge = {marks.root(t) if marks.tensors[t].kind == "activation" else t
                for t in first_last_tensors(node_tensors(m.graph, from_marks(marks)))}
    acts: dict[str, TensorQuant] = {}
    for name in marks.activations():
        root = marks.root(name)
        bits = config.first_last_bits if root in edge else config.act_bits
        if stats is None:
            acts[name] = TensorQuant("activation", bits, config.act_signed)
        elif root in stats:
            rmin, rmax = stats[root].range(config.calib, signed=config.act_signed, bits=bits,
                                           percentile=config.percentile)
            acts[name] = activation_quant(rmin, rmax, config, bits)

    def codes(x: str, padded: bool):
        tq = acts.get(marks.root(x)) if x in marks.tensors else None
        return reachable_codes(stats.get(x) if stats is not None else None, tq, padded)

    for name, role in marks.tensors.items():
        if role.kind == "weight":
            w = m.graph.initializers[name].const_value.numpy()
            if not np.isfinite(w).all():
                raise QtoolError(f"weight {name!r} has NaN/Inf values; it cannot be quantized")
            axis = role.axis if config.per_channel else None
            pairs = kernel_pairs(m.graph, name, w, config.weight_range, config.act_signed, codes)
            bits = config.first_last_bits if name in edge else config.weight_bits
            plan.tensors[name] = weight_quant(w, bits, axis, pairs)
    plan.tensors.update(acts)
    # Pass-through outputs reuse their source's parameters (needed for onnxruntime to drop their QDQ).
    for name in marks.activations():
        root = marks.root(name)
        if root != name and root in plan.tensors:
            plan.tensors[name] = plan.tensors[root]
    # Keep the graph's order so the JSON reads top to bottom.
    return plan


def quantize(model: onnx.ModelProto, calib_batches: Iterable[dict[str, np.ndarray]],
             config: QuantConfig = QuantConfig(), on_outputs=None) -> tuple[onnx.ModelProto, QuantPlan]:
    """`on_outputs(feed, outputs)`: see calibrate.collect_stats."""
    tuned, plan = quantize_plan(model, calib_batches, config, on_outputs)
    return apply_plan(tuned, plan), plan


def quantize_plan(model: onnx.ModelProto, calib_batches: Iterable[dict[str, np.ndarray]],
                  config: QuantConfig = QuantConfig(), on_outputs=None,
                  on_rescaled=None) -> tuple[onnx.ModelProto, QuantPlan]:
    """The fused model (with the rescaled / refined weights of config.equalize, smoothquant, algo,
    bias_correction) and its plan. `on_rescaled(model)`: the FP32 model after equalize / smoothquant."""
    if not isinstance(config, QuantConfig):
        raise QtoolError(f"config must be a QuantConfig, got {type(config).__name__}")
    model = fuse(model)[0] if not is_fused(model) else untie_biases(model)
    rescale_notes = None
    if needs_rescale(config):
        calib_batches = list(calib_batches)  # read again by calibration
        model, rescale_notes = rescale(model, calib_batches, config)
        if on_rescaled is not None:
            on_rescaled(model)
    if needs_refine(config):
        calib_batches = list(calib_batches)  # read again by the refinement
    stats, exclude = calibration_stats(model, calib_batches, config, on_outputs=on_outputs)
    plan = build_plan(model, config, stats, exclude)
    if rescale_notes is not None:
        plan.meta["rescale"] = rescale_notes
    if needs_refine(config):
        from qtool.refine import refine  # torch: imported only when asked for

        model = refine(model, plan, calib_batches, config)
    return model, plan


def calibration_stats(model: onnx.ModelProto, calib_batches: Iterable[dict[str, np.ndarray]], config: QuantConfig,
                      *, all_activations: bool = False, on_outputs=None):
    """What `build_plan` needs of a fused model's calibration: (activation stats, node exclude predicate:
    config.exclude plus the nodes of tensors that held inf / NaN). Stats of the activation roots, or with
    `all_activations` of every marked activation (for callers that keep more nodes float later: a node
    left float can turn a shared tensor into a root)."""
    exclude = excluder(model, config.exclude)
    g = passes.to_ir(model).graph
    marks = passes.mark_tensors(g, exclude)
    if not marks.tensors:
        raise QtoolError("nothing to quantize: the model has no Conv/Gemm/MatMul with constant weights and no "
                         "other quantizable op (Add, Concat, pooling)")
    acts = marks.activations() if all_activations else list(dict.fromkeys(marks.root(a) for a in marks.activations()))
    # minmax needs no histogram: skipping it makes calibration about one inference pass over the data
    weights = [k for k, r in marks.tensors.items() if r.kind == "weight"]
    stats = collect_stats(model, calib_batches, acts, bins=config.bins, max_batches=config.max_batches,
                          histograms=config.calib != "minmax", on_outputs=on_outputs,
                          channel_axes=pair_inputs(g, weights, config.weight_range, config.act_signed))
    return stats, nonfinite_excluder(stats, exclude)


def quantize_dynamic(model: onnx.ModelProto, config: QuantConfig) -> tuple[onnx.ModelProto, QuantPlan]:
    """`activations="dynamic"`: the plan holds MatMul / Gemm weights only (passes.dynamic_weights),
    int8 symmetric per output column (or per tensor, `dynamic_weight_quant`); nothing is calibrated."""
    model = fuse(model, use_onnxsim=False)[0] if not is_fused(model) else model
    g = passes.to_ir(model).graph
    axes = passes.dynamic_weights(g, excluder(model, config.exclude))
    if not axes:
        raise QtoolError("nothing to quantize dynamically: the model has no MatMul/Gemm with a constant 2-D weight")
    plan = QuantPlan(meta={"producer": "qtool.quantize", "config": asdict(config)})
    for name, axis in axes.items():
        w = g.initializers[name].const_value.numpy()
        if not np.isfinite(w).all():
            raise QtoolError(f"weight {name!r} has NaN/Inf values; it cannot be quantized")
        plan.tensors[name] = dynamic_weight_quant(w, axis, config.per_channel)
    return apply_dynamic_plan(model, plan), plan


def nonfinite_excluder(stats: dict[str, TensorStats], exclude=None):
    """`exclude` extended to every node that reads or writes a tensor which held inf / NaN in calibration.

    An attention mask is typically Where(mask, 0, -inf) added to the scores: its finite values are all
    0, so a Q of it maps -inf to code 0 and the mask vanishes without a trace (measured on a transformers
    BERT export). Such a node runs in float on its neighbours' DQ outputs instead."""
    bad = {t for t, s in stats.items() if not s.finite}
    if not bad:
        return exclude
    for t in sorted(bad):
        log.info("tensor %s holds inf/NaN in calibration (%d values): its nodes stay float", t, stats[t].nonfinite)

    def hit(node) -> bool:
        names = {v.name for v in (*node.inputs, *node.outputs) if v is not None}
        return bool(names & bad) or (exclude is not None and exclude(node))
    return hit


@dataclass
class QuantizeSummary:
    config: QuantConfig
    tensors: dict[str, int]  # plan counts by kind/bits/granularity
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    fuse: FuseSummary | None = None

    def lines(self) -> list[str]:
        granularity = "per-channel" if self.config.per_channel else "per-tensor"
        c = self.config
        if c.activations == "none":
            out = [f"weight-only: MatMul/Gemm weights {c.weight_bits}-bit in blocks of {c.block_size} along K "
                   f"({'symmetric' if c.weight_symmetric else 'with zero points'}), "
                   f"{'GPTQ' if c.algo == 'gptq' else 'round-to-nearest, MSE block scales'}; activations float"]
        elif self.config.activations == "dynamic":
            out = [f"dynamic activations (uint8, quantized at run time), MatMul/Gemm weights 8-bit {granularity}"]
        else:
            out = [f"calibration: {self.config.calib}, weights {self.config.weight_bits}-bit {granularity}, "
                   f"activations {'int' if self.config.act_signed else 'uint'}{self.config.act_bits}"
                   + (f"; first and last layer {c.first_last_bits}-bit" if c.first_last_bits is not None else "")]
        out.append("quantized tensors: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.tensors.items())))
        q_op = {"dynamic": "DynamicQuantizeLinear", "none": "MatMulNBits"}.get(c.activations, "QuantizeLinear")
        out.append(f"nodes: {sum(self.ops_before.values())} -> {sum(self.ops_after.values())} "
                   f"({self.ops_after.get(q_op, 0)} {q_op})")
        if self.fuse is not None:
            out += ["fuse: " + line for line in self.fuse.lines()]
        return out
