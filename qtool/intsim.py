"""NumPy reference executor for qtool's integer-only ONNX graphs (exporters.integer).

    sim = IntSim(model)            # the exported integer model
    logits, = sim({"input": x})

An independent interpreter of the ops the integer exporter emits, with the integer semantics
written out: ConvInteger / MatMulInteger accumulate the way onnxruntime's CPU kernels do on this
machine (qtool.ortkernels probes it once per process): exactly (the products are formed in float64
BLAS, exact because every partial sum is an integer below 2^53, asserted per call; stored int32), or,
where MLAS has no VNNI, in int16-saturated pairs of uint8 x int8 products along K (the exact sum plus
sat16(p) - p for the pairs that can saturate; uint8 x uint8 is exact). Zero padding is the input
zero point (what onnxruntime does: measured), int32/int64 Add/Mul wrap like C, Cast int64 <-> uint64
is two's complement, BitShift is the unsigned shift, Clip/ReduceSum keep the dtype. Everything
between the input QuantizeLinear and the output DequantizeLinear is integer, so the result must equal
onnxruntime's bit for bit; the float ops at the two ends are computed the way onnxruntime's CPU
kernels do (QuantizeLinear: float32 x / scale, round half to even, + zero point, saturate;
DequantizeLinear: float32 (q - zp) * scale), and so is the float input preprocessing the exporter may
keep before the input QuantizeLinear (Sub / Div / Mul / Add by constants, e.g. (x - mean) / std:
float32 IEEE elementwise ops, correctly rounded in NumPy as in onnxruntime). Tests and
benchmarks/export.py count disagreements with onnxruntime (expected: 0).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qtool.errors import QtoolError
from qtool.ortkernels import EXACT, PAIRS, PAIRS_CHW, PAIRS_HWC, accumulation, pair_saturation, saturable_pairs

_NP = {onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.INT32: np.int32,
       onnx.TensorProto.INT64: np.int64, onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.FLOAT: np.float32,
       onnx.TensorProto.UINT32: np.uint32, onnx.TensorProto.INT16: np.int16, onnx.TensorProto.UINT16: np.uint16}
_EXACT = 2.0**53
_GATHER_LIMIT = 2**22  # input codes gathered at once to emulate saturating pairs
_ORDERS = (EXACT, PAIRS, PAIRS_HWC, PAIRS_CHW)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _per_axis(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return v.reshape(shape)


def quantize_linear(x, s, z, axis=1):
    s = _per_axis(np.asarray(s, np.float32), x.ndim, axis)
    zz = _per_axis(np.asarray(z), x.ndim, axis)
    info = np.iinfo(np.asarray(z).dtype)
    q = np.rint(x.astype(np.float32) / s).astype(np.float64) + zz.astype(np.float64)
    return np.clip(q, info.min, info.max).astype(np.asarray(z).dtype)


def dequantize_linear(q, s, z=None, axis=1):
    s = _per_axis(np.asarray(s, np.float32), q.ndim, axis)
    zz = 0 if z is None else _per_axis(np.asarray(z), q.ndim, axis).astype(np.int32)
    return ((q.astype(np.int32) - zz).astype(np.float32) * s).astype(np.float32)


def _exact(acc: np.ndarray, what: str) -> np.ndarray:
    if acc.size and np.max(np.abs(acc)) >= _EXACT:
        raise QtoolError(f"intsim: {what} accumulator leaves the exact float64 range")
    return acc


def _add_pair_saturation(acc: np.ndarray, gather, out: np.ndarray, w_a: np.ndarray, w_b: np.ndarray,
                         per_pair: int) -> np.ndarray:
    """acc (..., M) + the saturation of the listed pairs; gather(sl) -> the (u_a, u_b) codes of pairs sl,
    each (pairs, ...) shaped like acc without its last axis."""
    onehot = np.zeros((out.size, acc.shape[-1]))
    onehot[np.arange(out.size), out] = 1.0
    step = max(1, _GATHER_LIMIT // max(per_pair, 1))
    for i in range(0, out.size, step):
        sl = slice(i, i + step)
        u_a, u_b = gather(sl)
        shape = (-1,) + (1,) * (u_a.ndim - 1)
        p = u_a * w_a[sl].reshape(shape).astype(np.float64) + u_b * w_b[sl].reshape(shape).astype(np.float64)
        acc = acc + np.tensordot(pair_saturation(p), onehot[sl], axes=([0], [0]))
    return acc


def _pairs_apply(order: str, x: np.ndarray, w: np.ndarray) -> bool:
    """Saturating pairs are MLAS's uint8 x int8 kernels; uint8 x uint8 sums exactly (measured)."""
    if order not in _ORDERS:
        raise QtoolError(f"intsim: unknown accumulation {order!r}")
    return order != EXACT and x.dtype == np.uint8 and w.dtype == np.int8


def conv_integer(x, w, x_zp=None, w_zp=None, *, pads=None, strides=None, dilations=None, group=1,
                 kernel_shape=None, auto_pad=b"NOTSET", accumulate=EXACT):
    """`accumulate`: EXACT, or int16 pairs in the K order PAIRS_HWC / PAIRS_CHW (qtool.ortkernels)."""
    if auto_pad not in (b"NOTSET", "NOTSET"):
        raise QtoolError("intsim: ConvInteger auto_pad is not supported (the exporter writes explicit pads)")
    if x.ndim != 4:
        raise QtoolError(f"intsim: ConvInteger on rank {x.ndim} (2-D convolutions only)")
    if accumulate == PAIRS:
        raise QtoolError("intsim: a convolution's int16 pairs need a K order (PAIRS_HWC or PAIRS_CHW)")
    z = 0.0 if x_zp is None else float(x_zp)
    xf = x.astype(np.float64) - z
    wf = w.astype(np.float64) - (0.0 if w_zp is None else _per_axis(np.asarray(w_zp), 4, 0).astype(np.float64))
    kh, kw = w.shape[2:]
    pads = pads or [0, 0, 0, 0]
    sh, sw = strides or [1, 1]
    dh, dw = dilations or [1, 1]
    # Padding with zero after subtracting the zero point == padding the codes with x_zp.
    xf = np.pad(xf, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    win = np.lib.stride_tricks.sliding_window_view(xf, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # N, C, OH, OW, kh, kw
    cg, og = w.shape[1], w.shape[0] // group
    outs = []
    for g in range(group):
        cols = win[:, g * cg:(g + 1) * cg]
        outs.append(np.tensordot(cols, wf[g * og:(g + 1) * og], axes=([1, 4, 5], [1, 2, 3])))  # N, OH, OW, O
    acc = np.concatenate(outs, axis=3)
    if _pairs_apply(accumulate, x, w):
        # the kernel's raw codes: x itself, padding = x_zp
        out, row_a, row_b, w_a, w_b = saturable_pairs(w, group, accumulate, max(int(x.max(initial=0)), int(z)))
        patch = (win.shape[1], kh, kw)  # rows of the flattened (C, kh, kw) input patch
        at_a, at_b = np.unravel_index(row_a, patch), np.unravel_index(row_b, patch)

        def gather(sl):
            return tuple(win[:, c[sl], :, :, i[sl], j[sl]] + z for c, i, j in (at_a, at_b))  # pairs, N, OH, OW

        acc = _add_pair_saturation(acc, gather, out, w_a, w_b, int(np.prod(acc.shape[:3])))
    return np.rint(_exact(acc.transpose(0, 3, 1, 2), "ConvInteger")).astype(np.int32)


def matmul_integer(a, b, a_zp=None, b_zp=None, *, accumulate=EXACT):
    """`accumulate`: EXACT, or PAIRS (int16-saturated pairs along K, qtool.ortkernels)."""
    af = a.astype(np.float64) - (0.0 if a_zp is None else np.asarray(a_zp).astype(np.float64))
    bf = b.astype(np.float64) - (0.0 if b_zp is None else np.asarray(b_zp).astype(np.float64))
    acc = af @ bf
    if _pairs_apply(accumulate, a, b):
        out, k_a, k_b, w_a, w_b = saturable_pairs(b.T, 1, PAIRS, int(a.max(initial=0)))
        codes = np.moveaxis(a.astype(np.float64), -1, 0)  # K, ..., M: the kernel's raw codes
        acc = _add_pair_saturation(acc, lambda sl: (codes[k_a[sl]], codes[k_b[sl]]), out, w_a, w_b,
                                   int(np.prod(a.shape[:-1])))
    return np.rint(_exact(acc, "MatMulInteger")).astype(np.int32)


def max_pool(x, *, kernel_shape, pads=None, strides=None, dilations=None, ceil_mode=0, auto_pad=b"NOTSET",
             storage_order=0):
    if auto_pad not in (b"NOTSET", "NOTSET") or ceil_mode or x.ndim != 4:
        raise QtoolError("intsim: MaxPool with auto_pad / ceil_mode / rank != 4 is not supported")
    kh, kw = kernel_shape
    pads = pads or [0, 0, 0, 0]
    sh, sw = strides or [1, 1]
    dh, dw = dilations or [1, 1]
    lo = np.iinfo(x.dtype).min if np.issubdtype(x.dtype, np.integer) else -np.inf
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=lo)
    win = np.lib.stride_tricks.sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw].max(axis=(4, 5))


def _slice(x, starts, ends, axes=None, steps=None):
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    idx = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        idx[int(a) % x.ndim] = slice(int(s), int(e), int(st))
    return x[tuple(idx)]


def _pad(x, pads, value=None, axes=None, mode=b"constant"):
    if mode not in (b"constant", "constant") or axes is not None:
        raise QtoolError("intsim: only constant Pad without axes is supported")
    n = x.ndim
    width = [(int(pads[i]), int(pads[i + n])) for i in range(n)]
    if any(a < 0 or b < 0 for a, b in width):
        raise QtoolError("intsim: negative pads are not supported")
    return np.pad(x, width, constant_values=0 if value is None else np.asarray(value).item())


def _reshape(x, shape, allowzero=0):
    shape = [int(d) for d in shape]
    if not allowzero:
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _flatten(x, axis=1):
    a = axis % x.ndim if x.ndim else 0
    return x.reshape(int(np.prod(x.shape[:a])), -1)


def _binary(op):
    def f(a, b):
        with np.errstate(over="ignore"):  # integer wrap-around is C's (and ORT's) behaviour
            out = op(a, b)
        return out.astype(np.result_type(a.dtype, b.dtype)) if a.dtype == b.dtype else out
    return f


def _run_node(node: onnx.NodeProto, ins: list, accumulate: dict[str, str]) -> list[np.ndarray]:
    op, at = node.op_type, _attrs(node)
    if op == "QuantizeLinear":
        return [quantize_linear(ins[0], ins[1], ins[2] if len(ins) > 2 and ins[2] is not None else np.uint8(0),
                                at.get("axis", 1))]
    if op == "DequantizeLinear":
        return [dequantize_linear(ins[0], ins[1], ins[2] if len(ins) > 2 else None, at.get("axis", 1))]
    if op == "ConvInteger":
        return [conv_integer(*ins, **at, accumulate=accumulate[op])]
    if op == "MatMulInteger":
        return [matmul_integer(*ins, accumulate=accumulate[op])]
    if op in ("Add", "Sub", "Mul", "Div"):
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
        a, b = ins
        if a.dtype != b.dtype:
            raise QtoolError(f"intsim: {op} of {a.dtype} and {b.dtype}")
        if op == "Div" and a.dtype != np.float32:  # the exporter divides only in the float preprocessing
            raise QtoolError(f"intsim: Div of {a.dtype} (only float32 input preprocessing divides)")
        return [_binary(fn)(a, b)]
    if op == "BitShift":
        x, s = ins
        if x.dtype.kind != "u":
            raise QtoolError("intsim: BitShift on a signed type (ONNX allows unsigned only)")
        return [(np.right_shift if at["direction"] in (b"RIGHT", "RIGHT") else np.left_shift)(x, s.astype(x.dtype))]
    if op == "Cast":
        return [ins[0].astype(_NP[at["to"]])]
    if op == "Gather":  # lookup tables of elementwise activations (exporters.lower)
        return [np.take(ins[0], ins[1].astype(np.int64), axis=at.get("axis", 0))]
    if op == "Clip":
        x = ins[0]
        lo = ins[1] if len(ins) > 1 and ins[1] is not None else None
        hi = ins[2] if len(ins) > 2 and ins[2] is not None else None
        return [np.clip(x, lo, hi).astype(x.dtype)]
    if op == "ReduceSum":
        axes = tuple(int(a) for a in ins[1]) if len(ins) > 1 and ins[1] is not None else None
        return [np.sum(ins[0], axis=axes, keepdims=bool(at.get("keepdims", 1))).astype(ins[0].dtype)]
    if op == "MaxPool":
        return [max_pool(ins[0], **at)]
    if op == "Slice":
        return [_slice(*ins)]
    if op == "Pad":
        return [_pad(*ins, mode=at.get("mode", b"constant"))]
    if op == "Reshape":
        return [_reshape(ins[0], ins[1], at.get("allowzero", 0))]
    if op == "Flatten":
        return [_flatten(ins[0], at.get("axis", 1))]
    if op == "Transpose":
        return [np.transpose(ins[0], at.get("perm"))]
    if op == "Squeeze":
        return [np.squeeze(ins[0], axis=None if len(ins) < 2 else tuple(int(a) for a in ins[1]))]
    if op == "Unsqueeze":
        return [np.expand_dims(ins[0], tuple(int(a) for a in ins[1]))]
    if op == "Identity":
        return [ins[0]]
    raise QtoolError(f"intsim: op {op} is not part of qtool's integer format (node {node.name!r})")


def _onnxruntime_accumulation(kernel: str) -> str:
    """What onnxruntime's `kernel` does on this CPU; a behaviour qtool does not model is summed exactly."""
    found = accumulation(kernel)
    return found if found in _ORDERS else EXACT


class IntSim:
    """Executes an integer-only model (exporters.integer) in NumPy; call with a feed dict.

    `accumulate` maps "ConvInteger" / "MatMulInteger" to how they sum (qtool.ortkernels: EXACT,
    PAIRS_HWC / PAIRS_CHW, PAIRS); by default what onnxruntime's kernels do on this CPU.
    """

    def __init__(self, model: onnx.ModelProto, accumulate: dict[str, str] | None = None):
        g = model.graph
        for n in g.node:
            if n.domain not in ("", "ai.onnx"):
                raise QtoolError(f"intsim: node {n.name!r} is in domain {n.domain!r}; integer graphs use standard ops")
        self.nodes = list(g.node)
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.inputs = [i.name for i in g.input if i.name not in self.consts]
        self.outputs = [o.name for o in g.output]
        self.accumulate = {k: _onnxruntime_accumulation(k) for k in ("ConvInteger", "MatMulInteger")
                           if accumulate is None or k not in accumulate} | dict(accumulate or {})

    def __call__(self, feeds: dict[str, np.ndarray], *, keep: bool = False) -> list[np.ndarray] | dict:
        env = dict(self.consts)
        missing = [i for i in self.inputs if i not in feeds]
        if missing:
            raise QtoolError(f"intsim: missing inputs {missing}")
        env.update({k: np.asarray(v) for k, v in feeds.items()})
        for node in self.nodes:
            outs = _run_node(node, [env[i] if i else None for i in node.input], self.accumulate)
            env.update(zip(node.output, outs))
        return env if keep else [env[o] for o in self.outputs]


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return IntSim(model)(feeds)
