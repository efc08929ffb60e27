"""How onnxruntime's integer kernels sum their products on this CPU: measured, once per process.

MLAS (onnxruntime's CPU math library) multiplies uint8 activation codes by int8 weight codes. On x86
CPUs without VNNI (AVX2; AVX-512 without VNNI) its U8S8 kernels use VPMADDUBSW: the products of two
adjacent elements along the reduction axis K are added into an int16 *with saturation*, and only
then summed in int32. With VNNI (VPDPBUSD) the sum is exact. So on the former

    acc = sum_j sat16(u[2j] w[2j] + u[2j+1] w[2j+1]) - z_u sum_k w[k] (+ bias),   sat16: clamp to int16

where u are the raw uint8 codes the kernel reads (padding = the zero point z_u; int8 activations
are shifted by +128 first, codes and zero point alike) and an odd K pairs its last element with 0.
A pair can only saturate when (|w[2j]| + |w[2j+1]|) max(u) > 32767, e.g. two int8 weights near
+-127 against codes near 255; 7-bit weights (|w| <= 63) never saturate. Which K order the pairs are
taken in is the kernel's: QLinearConv im2cols NHWC, K = (kh, kw, c) within a group; ConvInteger
im2cols NCHW, K = (c, kh, kw).

`accumulation(kernel, signed)` builds a tiny model for the kernel whose exact sum overflows int16 in
one pair only, runs it on the CPU execution provider and returns what it found. QLinearConv and QGemm
are probed as QDQ groups that ORT fuses, the way qtool's QDQ models run (`signed`: int8 activations,
which ORT on x86 converts to uint8 + 128 before fusing); ConvInteger / MatMulInteger as single nodes.

- EXACT: the exact integer sum.
- PAIRS (a GEMM: QGemm, MatMulInteger) / PAIRS_HWC / PAIRS_CHW (a convolution, by its K order):
  int16-saturated pairs as above.
- UNKNOWN: neither (or ORT did not run the integer kernel); logged once. qtool.ortexact and
  qtool.intsim keep exact sums there, which may then differ from onnxruntime.

Measured with onnxruntime 1.32 on an AMD EPYC with AVX2 and no AVX-512/VNNI:

| kernel | accumulation |
|---|---|
| QLinearConv (group 1 or grouped, any C, 1x1, strided; uint8 and int8 activations) | PAIRS_HWC |
| QLinearConv, depthwise (one input and one output channel per group) | EXACT |
| QGemm (QDQ Gemm), QLinearMatMul, MatMulInteger (uint8 x int8) | PAIRS |
| ConvInteger (uint8 x int8); uint8 x uint8 ConvInteger / MatMulInteger | EXACT |
| QLinearConv on int8 codes (a QOperator model; MLAS's S8S8 kernel, not probed) | EXACT |

The last row is why a QOperator model with int8 activations can differ from the QDQ model of the same
plan on such CPUs: ORT runs the latter's convolutions on uint8 codes + 128, which saturate.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qtool.errors import QtoolError
from qtool.ortgraph import optimized_graph

__all__ = ["KERNELS", "EXACT", "PAIRS", "PAIRS_HWC", "PAIRS_CHW", "UNKNOWN", "accumulation", "saturates",
           "measured", "pair_saturation", "pair_sums", "reachable_pair_sums", "saturable_pairs"]

log = logging.getLogger(__name__)

EXACT, PAIRS, PAIRS_HWC, PAIRS_CHW, UNKNOWN = ("exact", "int16 pairs", "int16 pairs, K = (kh, kw, c)",
                                               "int16 pairs, K = (c, kh, kw)", "unknown")
KERNELS = ("QLinearConv", "QLinearConv depthwise", "QGemm", "ConvInteger", "MatMulInteger")
INT16_MIN, INT16_MAX = -32768, 32767

# The probes: every input code is 255 (int8: 127, which the kernel reads as 255 with zero point 128)
# and each output channel has two weights of 127 in one pair: 2 * 255 * 127 = 64770 exactly, 32767
# when the pair saturates (minus 128 * 254 for int8 activations: 32258 / 255).
_W, _CODE_U8, _CODE_S8 = 127, 255.0, 127.0
_Y_SCALE = np.float32(1000.0)  # QDQ probes' output codes: 65 / 33 (int8: 32 / 0), no ties


def _sums(signed: bool) -> tuple[int, int]:
    """(exact, saturated) accumulator of one probe pair."""
    shift = 128 * 2 * _W if signed else 0
    return 2 * 255 * _W - shift, INT16_MAX - shift


# Conv probe (C = 4, 3x3 kernel, one output pixel), weights of output channel o at (c, kh, kw):
# 0: (0,0,0), (1,0,0)  adjacent in (kh, kw, c), 4 apart in (c, kh, kw)
# 1: (0,0,0), (0,0,1)  4 apart in (kh, kw, c), adjacent in (c, kh, kw)
# 2: (1,0,0), (2,0,0)  adjacent in (kh, kw, c) but not a pair (K indices 1, 2)
_CONV_TAPS = (((0, 0, 0), (1, 0, 0)), ((0, 0, 0), (0, 0, 1)), ((1, 0, 0), (2, 0, 0)))
_CONV_SIGNATURES = {(False, False, False): EXACT, (True, False, False): PAIRS_HWC, (False, True, False): PAIRS_CHW}
# GEMM probe (K = 4): column 0 pairs K 0 and 1, column 1 has K 1 and 2 (no pair).
_GEMM_TAPS = ((0, 1), (1, 2))
_GEMM_SIGNATURES = {(False, False): EXACT, (True, False): PAIRS}


def pair_saturation(p):
    """sat16(p) - p: what saturating an int16 pair sum adds to the exact sum (numpy or torch)."""
    return p.clip(INT16_MIN, INT16_MAX) - p


def saturable_pairs(w: np.ndarray, group: int, order: str, u_max: int) -> tuple[np.ndarray, ...]:
    """The (output channel, pair) combinations of integer weights that can saturate against raw codes
    up to `u_max`: (|w_a| + |w_b|) u_max > 32767. Typically a few percent of all pairs, so emulating
    the kernel is the exact sum plus `pair_saturation` of just these.

    `w` is a conv weight (M, C / group, *kernel) or a GEMM weight (N, K) (group 1); `order` PAIRS_HWC,
    PAIRS_CHW (a conv's K order) or PAIRS. Returns (out, row_a, row_b, w_a, w_b), one entry per pair:
    its output channel, the rows of its two elements in the flattened (C, *kernel) input patch (a GEMM:
    K indices) and their weights (an odd K pairs its last element with weight 0).
    """
    w = np.asarray(w, np.int64)
    cout, cg = w.shape[:2]
    kk = int(np.prod(w.shape[2:]))
    k = np.arange(cg * kk)
    if order == PAIRS_HWC:  # k = offset * cg + c
        wk = np.swapaxes(w.reshape(cout, cg, kk), 1, 2).reshape(cout, -1)
        c_local, off = k % cg, k // cg
    else:  # k = c * kk + offset
        wk = w.reshape(cout, -1)
        c_local, off = k // kk, k % kk
    first_channel = (np.arange(cout) // (cout // group) * cg)[:, None]
    rows = (first_channel + c_local[None, :]) * kk + off[None, :]
    if wk.shape[1] % 2:
        wk = np.concatenate([wk, np.zeros((cout, 1), np.int64)], 1)
        rows = np.concatenate([rows, rows[:, -1:]], 1)
    wp, rp = wk.reshape(cout, -1, 2), rows.reshape(cout, -1, 2)
    out, j = np.nonzero(np.abs(wp).sum(-1) * int(u_max) > INT16_MAX)
    return out, rp[out, j, 0], rp[out, j, 1], wp[out, j, 0], wp[out, j, 1]


def pair_sums(w: np.ndarray, order: str) -> np.ndarray:
    """Per output channel, the largest |w_a| + |w_b| over the K-adjacent pairs `order` sums together.

    `w` is a conv weight (M, C / group, *kernel) or a GEMM weight (N, K) with `order` PAIRS; float or
    integer. A kernel that saturates those pair sums in int16 is exact on a weight whose codes keep
    this below 32767 // u_max (`qtool.ptq.weight_quant`)."""
    w = np.abs(np.asarray(w, np.float64))
    cout, cg = w.shape[:2]
    kk = int(np.prod(w.shape[2:]))
    wk = np.swapaxes(w.reshape(cout, cg, kk), 1, 2).reshape(cout, -1) if order == PAIRS_HWC else w.reshape(cout, -1)
    if wk.shape[1] % 2:
        wk = np.concatenate([wk, np.zeros((cout, 1))], 1)
    return wk.reshape(cout, -1, 2).sum(-1).max(axis=1)


def reachable_pair_sums(w: np.ndarray, order: str, lo: np.ndarray, hi: np.ndarray, group: int = 1) -> np.ndarray:
    """`pair_sums` for activation codes known to stay in [lo[c], hi[c]] on input channel c (a conv's C
    axis, a GEMM's K): per output channel, the largest |u_a w_a + u_b w_b| / 255 over the K-adjacent
    pairs and all such codes u. With lo = 0, hi = 255 everywhere this is `pair_sums`; codes that stay
    near a zero point of ~128 (a LayerNorm's output) or below 255 (every channel but the one that set
    the tensor's max) let a pair of large weights sum far above 128 codes without saturating.

    `w` as in `pair_sums` (float or integer); `lo` / `hi` raw uint8 codes, one per input channel
    (C = group * w.shape[1] for a conv, K for a GEMM)."""
    w = np.asarray(w, np.float64)
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    cout, cg = w.shape[:2]
    kk = int(np.prod(w.shape[2:]))
    k = np.arange(cg * kk)
    if order == PAIRS_HWC:
        wk = np.swapaxes(w.reshape(cout, cg, kk), 1, 2).reshape(cout, -1)
        channel = (np.arange(cout) // (cout // group) * cg)[:, None] + (k % cg)[None, :]
    elif order == PAIRS_CHW:
        wk = w.reshape(cout, -1)
        channel = (np.arange(cout) // (cout // group) * cg)[:, None] + (k // kk)[None, :]
    else:
        wk, channel = w.reshape(cout, -1), np.broadcast_to(k[None, :], (cout, k.size))
    # The largest and the smallest u w of each element: u >= 0, so the bound a weight's sign picks.
    top = np.where(wk > 0, hi[channel], lo[channel]) * wk
    bottom = np.where(wk > 0, lo[channel], hi[channel]) * wk
    if wk.shape[1] % 2:  # the odd last element pairs with a zero weight
        top, bottom = (np.concatenate([a, np.zeros((cout, 1))], 1) for a in (top, bottom))
    top, bottom = top.reshape(cout, -1, 2).sum(-1), bottom.reshape(cout, -1, 2).sum(-1)
    return np.maximum(np.abs(top), np.abs(bottom)).max(axis=1) / 255.0


def _model(nodes, inits: dict, x_name: str, x_shape: list, x_type: int, y_type: int) -> bytes:
    g = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info(x_name, x_type, x_shape)],
                          [helper.make_tensor_value_info("y", y_type, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def _run(model: bytes, feeds: list[np.ndarray], fused_op: str) -> list[np.ndarray] | None:
    """Outputs for each feed, or None when ORT's optimized graph does not run `fused_op`."""
    providers = ("CPUExecutionProvider",)
    if fused_op not in {n.op_type for n in optimized_graph(model, providers).graph.node}:
        return None
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model, so, providers=list(providers))
    name = sess.get_inputs()[0].name
    return [sess.run(None, {name: f})[0] for f in feeds]


def _flags(outputs: list[np.ndarray] | None, n: int, scale: np.float32 | None = None,
           signed: bool = False) -> set[tuple] | None:
    """The saturated pattern of the first `n` outputs per run: True saturated, False exact, None neither."""
    if outputs is None:
        return None
    exact, sat = _sums(signed)
    if scale is not None:  # output codes of a QDQ probe (zero point 0)
        exact, sat = np.rint(exact / scale), np.rint(sat / scale)
    patterns = set()
    for out in outputs:
        v = out.reshape(out.shape[0], -1)[:, :n] if out.ndim > 1 else out[None, :n]
        v = v / scale if scale is not None else v
        for row in v.reshape(-1, v.shape[-1]):
            patterns.add(tuple(True if a == sat else False if a == exact else None for a in row))
    return patterns


def _classify(patterns: set[tuple] | None, signatures: dict) -> str:
    """The signature every probe run and row shows, or UNKNOWN."""
    if not patterns or len(patterns) != 1:
        return UNKNOWN
    return signatures.get(next(iter(patterns)), UNKNOWN)


def _qdq_nodes(op_node) -> list:
    return [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["x_q"]),
            helper.make_node("DequantizeLinear", ["x_q", "sx", "zx"], ["x_d"]),
            helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w_d"], axis=0), op_node,
            helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["c_q"]),
            helper.make_node("DequantizeLinear", ["c_q", "sy", "zy"], ["y"])]


def _qdq_inits(w: np.ndarray, signed: bool) -> dict:
    act, n = (np.int8 if signed else np.uint8), w.shape[0]
    return dict(sx=np.float32(1.0), zx=act(0), wq=w, sw=np.ones(n, np.float32), zw=np.zeros(n, np.int8),
                sy=_Y_SCALE, zy=act(0))


def _conv_weights(cout: int) -> np.ndarray:
    w = np.zeros((cout, 4, 3, 3), np.int8)
    for o, pair in enumerate(_CONV_TAPS):
        for c, i, j in pair:
            w[o, c, i, j] = _W
    return w


def _qlinearconv(cout: int, group: int, signed: bool) -> set[tuple] | None:
    """A QDQ Conv that ORT fuses into QLinearConv, on one output pixel of all-255 codes."""
    if group == 1:
        w, cin = _conv_weights(cout), 4
    else:  # depthwise: two adjacent taps of each channel's own 3x3 filter
        w, cin = np.zeros((cout, 1, 3, 3), np.int8), group
        w[:, 0, 0, :2] = _W
    x = np.full((1, cin, 3, 3), _CODE_S8 if signed else _CODE_U8, np.float32)
    model = _model(_qdq_nodes(helper.make_node("Conv", ["x_d", "w_d"], ["c"], group=group)), _qdq_inits(w, signed),
                   "x", [1, cin, 3, 3], TensorProto.FLOAT, TensorProto.FLOAT)
    return _flags(_run(model, [x], "QLinearConv"), len(_CONV_TAPS) if group == 1 else cout, _Y_SCALE, signed)


def _qgemm(signed: bool) -> set[tuple] | None:
    w = np.zeros((len(_GEMM_TAPS), 4), np.int8)
    for o, pair in enumerate(_GEMM_TAPS):
        w[o, list(pair)] = _W
    # one row and several: MLAS has a GEMV kernel for M = 1 besides the GEMM one
    feeds = [np.full((m, 4), _CODE_S8 if signed else _CODE_U8, np.float32) for m in (1, 5)]
    model = _model(_qdq_nodes(helper.make_node("Gemm", ["x_d", "w_d"], ["c"], transB=1)), _qdq_inits(w, signed),
                   "x", ["M", 4], TensorProto.FLOAT, TensorProto.FLOAT)
    return _flags(_run(model, feeds, "QGemm"), len(_GEMM_TAPS), _Y_SCALE, signed)


def _conv_integer() -> set[tuple] | None:
    node = helper.make_node("ConvInteger", ["x", "w", "zx"], ["y"])
    model = _model([node], dict(w=_conv_weights(len(_CONV_TAPS)), zx=np.uint8(0)), "x", [1, 4, 3, 3],
                   TensorProto.UINT8, TensorProto.INT32)
    return _flags(_run(model, [np.full((1, 4, 3, 3), 255, np.uint8)], "ConvInteger"), len(_CONV_TAPS))


def _matmul_integer() -> set[tuple] | None:
    b = np.zeros((4, len(_GEMM_TAPS)), np.int8)
    for o, pair in enumerate(_GEMM_TAPS):
        b[list(pair), o] = _W
    node = helper.make_node("MatMulInteger", ["a", "b", "za"], ["y"])
    model = _model([node], dict(b=b, za=np.uint8(0)), "a", ["M", 4], TensorProto.UINT8, TensorProto.INT32)
    return _flags(_run(model, [np.full((m, 4), 255, np.uint8) for m in (1, 5)], "MatMulInteger"), len(_GEMM_TAPS))


def _union(*patterns: set[tuple] | None) -> set[tuple] | None:
    return None if any(p is None for p in patterns) else set().union(*patterns)


def _probe(kernel: str, signed: bool) -> str:
    if kernel == "QLinearConv":
        # 16 output channels take MLAS's symmetric indirect-conv kernel, 3 its im2col + QGEMM one: both must agree
        return _classify(_union(_qlinearconv(16, 1, signed), _qlinearconv(3, 1, signed)), _CONV_SIGNATURES)
    if kernel == "QLinearConv depthwise":
        # 16 channels: the symmetric depthwise kernel; 2: the generic one. How a saturating one would pair is
        # not modelled: anything but exact is UNKNOWN.
        found = _union(_qlinearconv(16, 16, signed), _qlinearconv(2, 2, signed))
        return EXACT if found is not None and {v for p in found for v in p} == {False} else UNKNOWN
    if kernel == "QGemm":
        return _classify(_qgemm(signed), _GEMM_SIGNATURES)
    if signed:
        raise QtoolError(f"{kernel} is probed with uint8 activations only (qtool's integer export shifts int8 ones)")
    if kernel == "ConvInteger":
        return _classify(_conv_integer(), _CONV_SIGNATURES)
    return _classify(_matmul_integer(), _GEMM_SIGNATURES)


@functools.cache
def accumulation(kernel: str, signed: bool = False) -> str:
    """How onnxruntime's CPU `kernel` (one of KERNELS) sums on this machine, for uint8 (or int8,
    `signed`, in a QDQ model) activations: EXACT, PAIRS / PAIRS_HWC / PAIRS_CHW or UNKNOWN. Probed once
    per process."""
    if kernel not in KERNELS:
        raise QtoolError(f"unknown kernel {kernel!r} (one of: {', '.join(KERNELS)})")
    found = _probe(kernel, signed)
    if found == UNKNOWN:
        log.warning("onnxruntime's %s (%s activations) sums neither exactly nor in int16-saturated pairs on this "
                    "CPU: qtool emulates exact sums there, which may differ from onnxruntime", kernel,
                    "int8" if signed else "uint8")
    return found


def saturates(kernel: str, signed: bool = False) -> bool:
    """True when `kernel` sums int16-saturated pairs on this CPU (qtool emulates them)."""
    return accumulation(kernel, signed) in (PAIRS, PAIRS_HWC, PAIRS_CHW)


def measured() -> dict[str, str]:
    """Every kernel's accumulation on this CPU (uint8 activations, and int8 where ORT takes them)."""
    out = {k: accumulation(k) for k in KERNELS}
    for k in ("QLinearConv", "QLinearConv depthwise", "QGemm"):
        out[f"{k}, int8 activations"] = accumulation(k, True)
    return out
