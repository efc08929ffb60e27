"""The op registry of the ONNX -> torch lift: one torch implementation per ONNX op.

`run_op(op_type, attrs, training, *inputs)` runs one op the way `qtool.lift.LiftedModule` runs it
(attrs as `LiftedModule.node_attrs` returns them); `supported_ops()` lists them. Each entry is
(run(attrs, training, *inputs) -> Tensor | tuple, parse(attrs, node) -> attrs | None): `parse`
runs once at lift time and raises `Unsupported` (turned into a QtoolError naming the node) for
attribute combinations the torch implementation does not reproduce. The run functions are module
level (or partials of module-level functions) so a lifted module pickles and deep-copies.

Kept apart from the module (qtool.lift) so the op semantics are one place to read and extend, and
so that code which runs single ops (qtool.ortexact, the QAT Conv->BN fold, the dynamic layers)
does not depend on the graph container.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from qtool.errors import QtoolError

__all__ = ["supported_ops", "run_op", "op_entry", "call_module", "constant_value", "Unsupported", "conv_window"]

_TORCH_DTYPE = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}

# ---------------------------------------------------------------------------------------------
# Op registry: name -> (run(attrs, training, *inputs) -> Tensor | tuple, parse(attrs, node) -> attrs)
# run functions are module level so a LiftedModule pickles and deep-copies.
# ---------------------------------------------------------------------------------------------
_OPS: dict[str, tuple[Callable, Callable | None]] = {}


def _op(*names: str, parse: Callable | None = None):
    def deco(fn):
        for n in names:
            _OPS[n] = (fn, parse)
        return fn
    return deco


def supported_ops() -> list[str]:
    return sorted(_OPS)


def op_entry(op_type: str) -> tuple[Callable, Callable | None] | None:
    """(run, parse) of an op, None when it is not supported."""
    return _OPS.get(op_type)


def run_op(op_type: str, attrs: dict, training: bool, *inputs):
    """Run one op the way the lifted graph does (attrs as returned by `LiftedModule.node_attrs`)."""
    return _OPS[op_type][0](attrs, training, *inputs)


def call_module(a, training, *xs):
    """The step of a group of nodes replaced by a module (`LiftedModule.replace_nodes`)."""
    return a["module"](*xs)


class Unsupported(Exception):
    """Raised by a parse function (or `constant_value`); the lift turns it into a QtoolError naming the node."""


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _torch_pad_list(pads_begin: list[int], pads_end: list[int]) -> list[int]:
    """ONNX (b0, b1, .., e0, e1, ..) over trailing dims -> torch F.pad order (last dim first)."""
    out: list[int] = []
    for b, e in zip(reversed(pads_begin), reversed(pads_end)):
        out += [b, e]
    return out


def _same_pads(x: torch.Tensor, kernel, strides, dilations, upper: bool) -> list[int]:
    begins, ends = [], []
    for i, (k, s, d) in enumerate(zip(kernel, strides, dilations)):
        n = x.shape[2 + i]
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small = total // 2
        begins.append(small if upper else total - small)
        ends.append(total - small if upper else small)
    return begins + ends


def _spatial_pads(a: dict, x: torch.Tensor, kernel) -> list[int]:
    nd = len(kernel)
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(x, kernel, a["strides"], a["dilations"], auto == "SAME_UPPER")
    if auto == "VALID":
        return [0] * (2 * nd)
    return list(a.get("pads") or [0] * (2 * nd))


def _parse_window(a: dict, node: onnx.NodeProto) -> dict:
    a = dict(a)
    if isinstance(a.get("auto_pad"), bytes):
        a["auto_pad"] = a["auto_pad"].decode()
    return a


def _fill_window(a: dict, nd: int) -> dict:
    a.setdefault("strides", [1] * nd)
    a.setdefault("dilations", [1] * nd)
    return a


def conv_window(attrs: dict, x: torch.Tensor, kernel) -> tuple[list[int], list[int], list[int]]:
    """(F.pad list, strides, dilations) of a Conv with `attrs` on `x`, as `run_op("Conv", ...)` applies
    them (auto_pad resolved); qtool.ortexact pads with the zero point the way onnxruntime does."""
    nd = len(kernel)
    a = _fill_window(dict(attrs), nd)
    pads = _spatial_pads(a, x, kernel)
    return _torch_pad_list(pads[:nd], pads[nd:]), list(a["strides"]), list(a["dilations"])


@_op("Conv", parse=_parse_window)
def _conv(a, training, x, w, b=None):
    nd = w.dim() - 2
    a = _fill_window(dict(a), nd)
    pads = _spatial_pads(a, x, w.shape[2:])
    if pads[:nd] != pads[nd:]:
        x = F.pad(x, _torch_pad_list(pads[:nd], pads[nd:]))
        padding = 0
    else:
        padding = pads[:nd]
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return fn(x, w, b, a["strides"], padding, a["dilations"], a.get("group", 1))


def _parse_conv_transpose(a, node):
    a = _parse_window(a, node)
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or "output_shape" in a:
        raise Unsupported("auto_pad SAME_* / output_shape")
    return a


@_op("ConvTranspose", parse=_parse_conv_transpose)
def _conv_transpose(a, training, x, w, b=None):
    nd = w.dim() - 2
    a = _fill_window(dict(a), nd)
    pads = list(a.get("pads") or [0] * (2 * nd)) if a.get("auto_pad", "NOTSET") == "NOTSET" else [0] * (2 * nd)
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    y = fn(x, w, b, a["strides"], 0, a.get("output_padding", [0] * nd), a.get("group", 1), a["dilations"])
    if any(pads):  # ONNX pads crop the full transposed output (begin/end may differ)
        y = y[(slice(None), slice(None)) + tuple(slice(pb, y.shape[2 + i] - pe)
                                                  for i, (pb, pe) in enumerate(zip(pads[:nd], pads[nd:])))]
    return y


@_op("Gemm")
def _gemm(a, training, A, B, C=None):
    if a.get("transA", 0):
        A = A.transpose(0, 1)
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if a.get("transB", 0) and alpha == 1.0 and beta == 1.0 and (C is None or C.dim() == 1):
        return F.linear(A, B, C)
    if a.get("transB", 0):
        B = B.transpose(0, 1)
    y = A @ B
    if alpha != 1.0:
        y = y * alpha
    if C is not None:
        y = y + (C if beta == 1.0 else beta * C)
    return y


@_op("MatMul")
def _matmul(a, training, A, B):
    return torch.matmul(A, B)


def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


@_op("Add")
def _add(a, training, x, y):
    return x + y


@_op("Sub")
def _sub(a, training, x, y):
    return x - y


@_op("Mul")
def _mul(a, training, x, y):
    return x * y


@_op("Div")
def _div(a, training, x, y):
    return torch.div(x, y, rounding_mode="trunc") if _is_int(x) else x / y


@_op("Pow")
def _pow(a, training, x, y):
    return torch.pow(x, y).to(x.dtype)


@_op("Clip")
def _clip(a, training, x, lo=None, hi=None):
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


@_op("LeakyRelu")
def _leaky_relu(a, training, x):
    return F.leaky_relu(x, a.get("alpha", 0.01))


@_op("HardSigmoid")
def _hard_sigmoid(a, training, x):
    return torch.clamp(x * a.get("alpha", 0.2) + a.get("beta", 0.5), 0.0, 1.0)


@_op("HardSwish")
def _hard_swish(a, training, x):
    return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)  # ORT's formula (alpha 1/6, beta 1/2)


# Element-wise ops without attributes: one table instead of a function each.
_UNARY = {"Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Sqrt": torch.sqrt,
          "Neg": torch.neg, "Abs": torch.abs, "Exp": torch.exp, "Log": torch.log, "Reciprocal": torch.reciprocal,
          "Not": torch.logical_not, "Ceil": torch.ceil, "Floor": torch.floor, "Round": torch.round,  # half to even
          "Sign": torch.sign, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Atan": torch.atan,
          "Softplus": F.softplus, "Softsign": F.softsign, "Mish": F.mish, "IsNaN": torch.isnan}


def _unary(fn, a, training, x):
    return fn(x)


for _name, _fn in _UNARY.items():
    _op(_name)(functools.partial(_unary, _fn))  # a partial (not a lambda) keeps lifted modules picklable


@_op("Softmax")
def _softmax(a, training, x):
    return torch.softmax(x, a.get("axis", -1))


def _variadic(fn, a, training, *xs):
    return functools.reduce(fn, xs)


# Variadic element-wise ops fold their inputs pairwise, left to right (as the loops ORT runs).
for _name, _fn in {"Sum": torch.add, "Max": torch.maximum, "Min": torch.minimum}.items():
    _op(_name)(functools.partial(_variadic, _fn))


def _binary(fn, a, training, x, y):
    return fn(x, y)


# Comparisons and logic (bool results; broadcasting as numpy, like ONNX).
for _name, _fn in {"Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
                   "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
                   "Xor": torch.logical_xor}.items():
    _op(_name)(functools.partial(_binary, _fn))


@_op("Where")
def _where(a, training, c, x, y):
    return torch.where(c, x, y)


def _parse_bn(a, node):
    if any(o for o in node.output[1:]):
        raise Unsupported("training-mode outputs (running_mean/var) in use")
    return a


@_op("BatchNormalization", parse=_parse_bn)
def _batch_norm(a, training, x, scale, bias, mean, var):
    # ONNX: running = running * momentum + batch * (1 - momentum); torch's momentum is the latter.
    return F.batch_norm(x, mean, var, scale, bias, training, 1.0 - a.get("momentum", 0.9), a.get("epsilon", 1e-5))


@_op("Dropout")
def _dropout(a, training, x, ratio=None, training_mode=None):
    p = float(ratio) if ratio is not None else a.get("ratio", 0.5)
    return F.dropout(x, p, training)


def _parse_maxpool(a, node):
    a = _parse_window(a, node)
    if len(node.output) > 1 and node.output[1]:
        raise Unsupported("Indices output")
    if a.get("storage_order", 0):
        raise Unsupported("storage_order=1")
    return a


@_op("MaxPool", parse=_parse_maxpool)
def _max_pool(a, training, x):
    k = a["kernel_shape"]
    nd = len(k)
    a = _fill_window(dict(a), nd)
    pads = _spatial_pads(a, x, k)
    ceil = bool(a.get("ceil_mode", 0))
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    if pads[:nd] == pads[nd:] and all(p <= kk // 2 for p, kk in zip(pads[:nd], k)):
        return fn(x, k, a["strides"], pads[:nd], a["dilations"], ceil)
    x = F.pad(x, _torch_pad_list(pads[:nd], pads[nd:]), value=float("-inf"))
    return fn(x, k, a["strides"], 0, a["dilations"], ceil)


def _parse_avgpool(a, node):
    a = _parse_window(a, node)
    if any(d != 1 for d in a.get("dilations", [])):
        raise Unsupported("dilations")
    return a


@_op("AveragePool", parse=_parse_avgpool)
def _avg_pool(a, training, x):
    k = a["kernel_shape"]
    nd = len(k)
    a = _fill_window(dict(a), nd)
    pads = _spatial_pads(a, x, k)
    include = bool(a.get("count_include_pad", 0))
    ceil = bool(a.get("ceil_mode", 0))
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    if pads[:nd] == pads[nd:] and all(p <= kk // 2 for p, kk in zip(pads[:nd], k)):
        return fn(x, k, a["strides"], pads[:nd], ceil, include)
    if not include:
        raise QtoolError(f"AveragePool with asymmetric pads and count_include_pad=0 is not supported (pads {pads})")
    x = F.pad(x, _torch_pad_list(pads[:nd], pads[nd:]))
    return fn(x, k, a["strides"], 0, ceil, True)


@_op("GlobalAveragePool")
def _global_avg_pool(a, training, x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("GlobalMaxPool")
def _global_max_pool(a, training, x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("Flatten")
def _flatten(a, training, x):
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), -1)


@_op("Reshape")
def _reshape(a, training, x, shape):
    s = _ints(shape)
    if not a.get("allowzero", 0):
        s = [x.shape[i] if v == 0 else v for i, v in enumerate(s)]
    return x.reshape(s)


@_op("Transpose")
def _transpose(a, training, x):
    return x.permute(a.get("perm") or list(reversed(range(x.dim()))))


@_op("Concat")
def _concat(a, training, *xs):
    return torch.cat(xs, a["axis"])


@_op("Split")
def _split(a, training, x, split=None):
    axis = a.get("axis", 0)
    if split is None:
        split = a.get("split")  # opset < 13 attribute form
    if split is not None:
        return tuple(torch.split(x, _ints(split) if isinstance(split, torch.Tensor) else list(split), axis))
    n = a.get("num_outputs", a["_n_outputs"])
    return tuple(torch.split(x, math.ceil(x.shape[axis] / n), axis))


@_op("Slice")
def _slice(a, training, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    key: list[Any] = [slice(None)] * x.dim()
    reverse: list[tuple[int, range]] = []
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax %= x.dim()
        if st > 0:
            key[ax] = slice(s, e, st)  # Python's clamping equals ONNX's for positive steps
        else:
            reverse.append((ax, range(*slice(s, e, st).indices(x.shape[ax]))))
    y = x[tuple(key)]
    for ax, r in reverse:  # torch has no negative-step slicing
        y = torch.index_select(y, ax, torch.tensor(list(r), dtype=torch.long, device=y.device))
    return y


@_op("Pad")
def _pad(a, training, x, pads=None, value=None, axes=None):
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    p = _ints(pads) if pads is not None else list(a["pads"])
    rank = x.dim()
    ax = [v % rank for v in _ints(axes)] if axes is not None else list(range(rank))
    begin, end = [0] * rank, [0] * rank
    for i, d in enumerate(ax):
        begin[d], end[d] = p[i], p[i + len(ax)]
    first = next((d for d in range(rank) if begin[d] or end[d]), rank)
    tp = _torch_pad_list(begin[first:], end[first:])
    if not tp:
        return x
    if mode == "constant":
        v = 0.0 if value is None or value.numel() == 0 else value.reshape(-1)[0].item()
        return F.pad(x, tp, value=v)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    return F.pad(x, tp, mode=torch_mode)


_RESIZE_CTM = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
               "tf_half_pixel_for_nn", "tf_crop_and_resize")


def _parse_resize(a, node):
    a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in a.items()}
    mode = a.setdefault("mode", "nearest")
    ctm = a.setdefault("coordinate_transformation_mode", "half_pixel")
    a.setdefault("nearest_mode", "round_prefer_floor")
    a.setdefault("keep_aspect_ratio_policy", "stretch")
    if a.get("antialias", 0):
        raise Unsupported("antialias")
    if mode not in ("nearest", "linear", "cubic"):
        raise Unsupported(f"mode {mode}")
    if ctm not in _RESIZE_CTM:
        raise Unsupported(f"coordinate_transformation_mode={ctm}")
    if a["nearest_mode"] not in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
        raise Unsupported(f"nearest_mode={a['nearest_mode']}")
    if a["keep_aspect_ratio_policy"] not in ("stretch", "not_larger", "not_smaller"):
        raise Unsupported(f"keep_aspect_ratio_policy={a['keep_aspect_ratio_policy']}")
    # F.interpolate computes exactly these; everything else goes through the separable gather below.
    fast = None
    if a.get("axes") is None and a["keep_aspect_ratio_policy"] == "stretch":
        if mode == "nearest" and ctm == "asymmetric" and a["nearest_mode"] == "floor":
            fast = ("nearest", None)
        elif mode in ("linear", "cubic") and ctm in ("half_pixel", "align_corners") and not a.get("exclude_outside", 0) \
                and a.get("cubic_coeff_a", -0.75) == -0.75:
            fast = (mode, ctm == "align_corners")
    a["_torch"] = fast
    return a


def _resize_plan(a, x, scales, sizes) -> tuple[list[int], list[float]]:
    """Output sizes and per-axis scales as ONNX defines them (float32 arithmetic, as onnxruntime's)."""
    rank = x.dim()
    axes = [v % rank for v in a["axes"]] if a.get("axes") is not None else list(range(rank))
    in_dims = list(x.shape)
    out, sc = list(in_dims), [1.0] * rank
    if sizes is not None and sizes.numel():
        want = _ints(sizes)
        if a["keep_aspect_ratio_policy"] != "stretch":
            ratios = [np.float32(w) / np.float32(in_dims[ax]) for w, ax in zip(want, axes)]
            r = min(ratios) if a["keep_aspect_ratio_policy"] == "not_larger" else max(ratios)
            want = [int(math.floor(float(np.float32(r) * np.float32(in_dims[ax])) + 0.5)) for ax in axes]
            for ax in axes:
                sc[ax] = float(r)
        else:
            for w, ax in zip(want, axes):
                sc[ax] = float(np.float32(w) / np.float32(in_dims[ax]))
        for w, ax in zip(want, axes):
            out[ax] = w
    else:
        for s, ax in zip(scales.reshape(-1).tolist(), axes):
            sc[ax] = float(np.float32(s))
            out[ax] = int(np.float32(in_dims[ax]) * np.float32(s))
    return out, sc


def _resize_coords(a, n_in: int, n_out: int, scale: float, roi: tuple[float, float] | None, device) -> torch.Tensor:
    """Input coordinate of every output index along one axis (coordinate_transformation_mode)."""
    i = torch.arange(n_out, dtype=torch.float32, device=device)
    s = torch.tensor(scale, dtype=torch.float32, device=device)
    ctm = a["coordinate_transformation_mode"]
    if ctm == "half_pixel":
        return (i + 0.5) / s - 0.5
    if ctm == "half_pixel_symmetric":  # ORT's operation order: float32 offset, the sum in double
        f32 = np.float32
        adj = f32(n_out) / (f32(scale) * f32(n_in))
        offset = float(f32(n_in) / f32(2) * (f32(1) - adj))
        return (offset + (i.double() + 0.5) / float(f32(scale)) - 0.5).float()
    if ctm == "pytorch_half_pixel":
        return (i + 0.5) / s - 0.5 if n_out > 1 else torch.zeros_like(i)
    if ctm == "align_corners":
        return i * float(n_in - 1) / float(n_out - 1) if n_out > 1 else torch.zeros_like(i)
    if ctm == "asymmetric":
        return i / s
    if ctm == "tf_half_pixel_for_nn":
        return (i + 0.5) / s
    start, end = (torch.tensor(v, dtype=torch.float32, device=device) for v in roi)  # tf_crop_and_resize
    if n_out > 1:
        return start * (n_in - 1) + (i * (end - start) * (n_in - 1)) / (n_out - 1)
    return torch.full_like(i, float(0.5 * (float(start) + float(end)) * (n_in - 1)))


def _take(x: torch.Tensor, ax: int, idx: torch.Tensor) -> torch.Tensor:
    return torch.index_select(x, ax, idx.long())


def _along(w: torch.Tensor, x: torch.Tensor, ax: int) -> torch.Tensor:
    """A per-output-index vector shaped to broadcast along axis `ax` of `x`."""
    return w.reshape([-1 if d == ax else 1 for d in range(x.dim())]).to(x.dtype)


def _resize_axis(a, x: torch.Tensor, ax: int, n_out: int, scale: float, roi) -> torch.Tensor:
    n_in = x.shape[ax]
    c = _resize_coords(a, n_in, n_out, scale, roi, x.device)
    mode = a["mode"]
    if mode == "nearest":
        nm = a["nearest_mode"]
        if nm == "floor":
            r = torch.floor(c)
        elif nm == "ceil":
            r = torch.ceil(c)
        else:
            fl = torch.floor(c)
            half = c == fl + 0.5  # exact ties go the way nearest_mode says; the rest round to nearest
            r = torch.where(half, fl if nm == "round_prefer_floor" else fl + 1, torch.floor(c + 0.5))
        y = _take(x, ax, r.clamp(0, n_in - 1))
    elif mode == "linear":
        cc = c.clamp(0, n_in - 1)
        x0 = torch.floor(cc)
        w1 = cc - x0
        x1 = torch.clamp(x0 + 1, max=n_in - 1)
        y = _take(x, ax, x0) * _along(1 - w1, x, ax) + _take(x, ax, x1) * _along(w1, x, ax)
    else:  # cubic: four taps, Keys kernel with coefficient A; taps past the edge clamp (or drop)
        A = a.get("cubic_coeff_a", -0.75)
        x0 = torch.floor(c)
        t = c - x0
        ws = []
        for d in (-1, 0, 1, 2):
            u = (t - d).abs()
            ws.append(torch.where(u <= 1, ((A + 2) * u - (A + 3)) * u * u + 1,
                                  ((A * u - 5 * A) * u + 8 * A) * u - 4 * A))
        taps = [x0 + d for d in (-1, 0, 1, 2)]
        if a.get("exclude_outside", 0):
            ws = [torch.where((p >= 0) & (p <= n_in - 1), w, torch.zeros_like(w)) for p, w in zip(taps, ws)]
            tot = functools.reduce(torch.add, ws)
            ws = [w / tot for w in ws]
        y = functools.reduce(torch.add, [_take(x, ax, p.clamp(0, n_in - 1)) * _along(w, x, ax)
                                         for p, w in zip(taps, ws)])
    if a["coordinate_transformation_mode"] == "tf_crop_and_resize":
        outside = (c < 0) | (c > n_in - 1)
        y = torch.where(_along(outside, x, ax).bool(), torch.full_like(y, a.get("extrapolation_value", 0.0)), y)
    return y


@_op("Resize", parse=_parse_resize)
def _resize(a, training, x, roi=None, scales=None, sizes=None):
    out, sc = _resize_plan(a, x, scales, sizes)
    nd = x.dim() - 2
    fast = a["_torch"]
    if fast is not None and out[:2] == list(x.shape[:2]) and 1 <= nd <= 3 and (fast[0] != "cubic" or nd == 2):
        mode, align = fast
        if mode in ("linear", "cubic"):
            mode = {"linear": ("linear", "bilinear", "trilinear")[nd - 1], "cubic": "bicubic"}[mode]
        kw = {} if align is None else {"align_corners": align}
        if sizes is not None and sizes.numel():
            return F.interpolate(x, size=out[2:], mode=mode, **kw)
        return F.interpolate(x, scale_factor=sc[2:], mode=mode, recompute_scale_factor=False, **kw)
    rois = None
    if a["coordinate_transformation_mode"] == "tf_crop_and_resize":
        r = [float(v) for v in roi.reshape(-1).tolist()]
        axes = [v % x.dim() for v in a["axes"]] if a.get("axes") is not None else list(range(x.dim()))
        rois = {ax: (r[i], r[i + len(axes)]) for i, ax in enumerate(axes)}
    y = x
    for ax in range(x.dim()):  # separable: one axis at a time (what ORT does for linear/cubic too)
        if out[ax] != x.shape[ax] or sc[ax] != 1.0 or (rois and ax in rois):
            y = _resize_axis(a, y, ax, out[ax], sc[ax], rois.get(ax) if rois else None)
    return y


def _axes_arg(a, axes) -> list[int] | None:
    if axes is not None:
        return _ints(axes)
    return list(a["axes"]) if "axes" in a else None


@_op("Squeeze")
def _squeeze(a, training, x, axes=None):
    ax = _axes_arg(a, axes)
    if ax is None:
        return x.squeeze()
    return x.squeeze(tuple(v % x.dim() for v in ax)) if ax else x


@_op("Unsqueeze")
def _unsqueeze(a, training, x, axes=None):
    ax = _axes_arg(a, axes)
    rank = x.dim() + len(ax)
    for v in sorted(v % rank for v in ax):
        x = x.unsqueeze(v)
    return x


def _reduce(fn, a, x, axes):
    ax = _axes_arg(a, axes)
    keep = bool(a.get("keepdims", 1))
    if not ax:
        if a.get("noop_with_empty_axes", 0):
            return x
        ax = list(range(x.dim()))
    return fn(x, tuple(v % x.dim() for v in ax), keep)


@_op("ReduceMean")
def _reduce_mean(a, training, x, axes=None):
    return _reduce(lambda t, d, k: t.mean(dim=d, keepdim=k), a, x, axes)


@_op("ReduceSum")
def _reduce_sum(a, training, x, axes=None):
    return _reduce(lambda t, d, k: t.sum(dim=d, keepdim=k), a, x, axes)


@_op("ReduceMax")
def _reduce_max(a, training, x, axes=None):
    return _reduce(lambda t, d, k: t.amax(dim=d, keepdim=k), a, x, axes)


def _rmin(t, d, k):
    return t.amin(dim=d, keepdim=k)


def _rprod(t, d, k):
    for i in sorted(d, reverse=True):
        t = t.prod(i, keepdim=k)
    return t


def _rl1(t, d, k):
    return t.abs().sum(dim=d, keepdim=k)


def _rl2(t, d, k):
    return t.square().sum(dim=d, keepdim=k).sqrt()


def _rsumsq(t, d, k):
    return t.square().sum(dim=d, keepdim=k)


def _rlogsum(t, d, k):
    return t.sum(dim=d, keepdim=k).log()


def _rlogsumexp(t, d, k):
    return torch.logsumexp(t, dim=d, keepdim=k)


# The other reductions (module-level functions, so lifted modules pickle), same axes handling.
_REDUCTIONS = {"ReduceMin": _rmin, "ReduceProd": _rprod, "ReduceL1": _rl1, "ReduceL2": _rl2,
               "ReduceSumSquare": _rsumsq, "ReduceLogSum": _rlogsum, "ReduceLogSumExp": _rlogsumexp}


def _reduce_op(fn, a, training, x, axes=None):
    return _reduce(fn, a, x, axes)


for _name, _fn in _REDUCTIONS.items():
    _op(_name)(functools.partial(_reduce_op, _fn))


@_op("Identity")
def _identity(a, training, x):
    return x


@_op("Gather")
def _gather(a, training, x, idx):
    axis = a.get("axis", 0) % x.dim()
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    y = torch.index_select(x, axis, idx.reshape(-1))
    return y.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


@_op("Shape")
def _shape(a, training, x):
    dims = list(x.shape)[a.get("start", 0):a.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@_op("ConstantOfShape")
def _constant_of_shape(a, training, shape):
    v = a.get("value")
    val = torch.from_numpy(numpy_helper.to_array(v).copy()) if v is not None else torch.zeros(1)
    return val.reshape(()).to(shape.device).expand(_ints(shape)).clone()


@_op("Cast")
def _cast(a, training, x):
    try:
        return x.to(_TORCH_DTYPE[a["to"]])
    except KeyError:
        raise QtoolError(f"Cast to {onnx.TensorProto.DataType.Name(a['to'])} is not supported") from None


@_op("Range")
def _range(a, training, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


@_op("Expand")
def _expand(a, training, x, shape):
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape)))).clone()


# ---------------------------------------------------------------------------------------------
# Normalizations of transformer / audio / segmentation graphs.
# ---------------------------------------------------------------------------------------------
def _stashed(x: torch.Tensor, stash: int) -> torch.Tensor:
    """LayerNormalization / GroupNormalization compute in float32 when stash_type is 1 (the default)."""
    return x.float() if stash == 1 and x.dtype in (torch.float16, torch.bfloat16) else x


@_op("LayerNormalization")
def _layer_norm(a, training, x, scale, bias=None):
    axis = a.get("axis", -1) % x.dim()
    eps = a.get("epsilon", 1e-5)
    shape = tuple(x.shape[axis:])
    xs = _stashed(x, a.get("stash_type", 1))
    full = tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape)
    if a["_n_outputs"] == 1 and full and xs.dtype == x.dtype:
        return F.layer_norm(x, shape, scale, bias, eps)
    dims = tuple(range(axis, x.dim()))
    mean = xs.mean(dims, keepdim=True)
    inv = torch.rsqrt((xs - mean).square().mean(dims, keepdim=True) + eps)
    y = ((xs - mean) * inv).to(x.dtype) * scale  # scale / bias broadcast to the normalized shape
    if bias is not None:
        y = y + bias
    return (y, mean, inv)[:a["_n_outputs"]] if a["_n_outputs"] > 1 else y


@_op("InstanceNormalization")
def _instance_norm(a, training, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=a.get("epsilon", 1e-5))


@_op("GroupNormalization")
def _group_norm(a, training, x, scale, bias):
    g, c = a["num_groups"], x.shape[1]
    if scale.numel() != c:  # opset 18: one scale / bias per group (opset 21: per channel)
        scale, bias = scale.repeat_interleave(c // g), bias.repeat_interleave(c // g)
    xs = _stashed(x, a.get("stash_type", 1))
    return F.group_norm(xs, g, scale.to(xs.dtype), bias.to(xs.dtype), a.get("epsilon", 1e-5)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Activations with attributes.
# ---------------------------------------------------------------------------------------------
def _parse_str_attrs(a, node):
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in a.items()}


@_op("Gelu", parse=_parse_str_attrs)
def _gelu(a, training, x):
    return F.gelu(x, approximate=a.get("approximate", "none"))


@_op("Elu")
def _elu(a, training, x):
    return F.elu(x, a.get("alpha", 1.0))


@_op("Celu")
def _celu(a, training, x):
    return F.celu(x, a.get("alpha", 1.0))


@_op("Selu")
def _selu(a, training, x):
    alpha, gamma = a.get("alpha", 1.67326319217681884765625), a.get("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@_op("ThresholdedRelu")
def _thresholded_relu(a, training, x):
    return torch.where(x > a.get("alpha", 1.0), x, torch.zeros_like(x))


@_op("PRelu")
def _prelu(a, training, x, slope):
    return torch.where(x < 0, x * slope, x)


@_op("IsInf")
def _is_inf(a, training, x):
    pos, neg = a.get("detect_positive", 1), a.get("detect_negative", 1)
    return (torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))


@_op("Mod")
def _mod(a, training, x, y):
    # fmod=0 (integers only): the result takes the divisor's sign, as Python's %; fmod=1: C fmod.
    return torch.fmod(x, y) if a.get("fmod", 0) else torch.remainder(x, y)


@_op("Mean")
def _mean(a, training, *xs):
    return functools.reduce(torch.add, xs) / len(xs)


# ---------------------------------------------------------------------------------------------
# Indexing, tensor construction and layout.
# ---------------------------------------------------------------------------------------------
def _wrap(idx: torch.Tensor, n) -> torch.Tensor:
    idx = idx.long()
    return torch.where(idx < 0, idx + n, idx)


@_op("GatherElements")
def _gather_elements(a, training, x, idx):
    axis = a.get("axis", 0) % x.dim()
    return torch.gather(x, axis, _wrap(idx, x.shape[axis]))


@_op("GatherND")
def _gather_nd(a, training, x, idx):
    b = a.get("batch_dims", 0)
    idx = idx.long()
    k = idx.shape[-1]
    lead = x.shape[:b]
    xf = x.reshape((-1,) + tuple(x.shape[b:]))
    idf = idx.reshape(xf.shape[0], -1, k)
    batch = torch.arange(xf.shape[0], device=x.device).unsqueeze(1).expand(-1, idf.shape[1])
    cols = tuple(_wrap(idf[..., j], x.shape[b + j]) for j in range(k))
    y = xf[(batch,) + cols]
    return y.reshape(tuple(lead) + tuple(idx.shape[b:-1]) + tuple(x.shape[b + k:]))


def _parse_scatter(a, node):
    a = _parse_str_attrs(a, node)
    if node.op_type == "ScatterND" and a.get("reduction", "none") not in ("none", "add"):
        raise Unsupported(f"reduction={a['reduction']}")
    return a


@_op("ScatterElements", parse=_parse_scatter)
def _scatter_elements(a, training, x, idx, upd):
    axis = a.get("axis", 0) % x.dim()
    idx = _wrap(idx, x.shape[axis])
    red = a.get("reduction", "none")
    if red == "none":
        return torch.scatter(x, axis, idx, upd)
    return torch.scatter_reduce(x, axis, idx, upd, {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[red])


@_op("ScatterND", parse=_parse_scatter)
def _scatter_nd(a, training, x, idx, upd):
    idx = idx.long()
    cols = tuple(_wrap(idx[..., j], x.shape[j]) for j in range(idx.shape[-1]))
    return x.index_put(cols, upd, accumulate=a.get("reduction", "none") == "add")


@_op("Tile")
def _tile(a, training, x, repeats):
    return x.repeat(_ints(repeats))


@_op("CumSum")
def _cumsum(a, training, x, axis):
    ax = int(axis.reshape(-1)[0]) % x.dim()
    rev = bool(a.get("reverse", 0))
    y = torch.cumsum(x.flip(ax) if rev else x, ax, dtype=x.dtype)
    if a.get("exclusive", 0):  # shift by one instead of subtracting x (exact for floats too)
        y = torch.cat([torch.zeros_like(y.narrow(ax, 0, 1)), y.narrow(ax, 0, y.shape[ax] - 1)], ax)
    return y.flip(ax) if rev else y


@_op("Trilu")
def _trilu(a, training, x, k=None):
    kk = int(k.reshape(-1)[0]) if k is not None else 0
    return torch.triu(x, kk) if a.get("upper", 1) else torch.tril(x, kk)


@_op("Einsum", parse=_parse_str_attrs)
def _einsum(a, training, *xs):
    return torch.einsum(a["equation"].replace(" ", ""), *xs)


@_op("Size")
def _size(a, training, x):
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@_op("NonZero")
def _nonzero(a, training, x):
    return torch.nonzero(x).transpose(0, 1).contiguous()


@_op("OneHot")
def _one_hot(a, training, idx, depth, values):
    d = int(depth.reshape(-1)[0])
    hot = _wrap(idx, d).unsqueeze(-1) == torch.arange(d, device=idx.device)  # out-of-range ids: all off
    axis = a.get("axis", -1) % (idx.dim() + 1)
    v = values.reshape(-1)
    return torch.where(hot, v[1], v[0]).movedim(-1, axis)


@_op("DepthToSpace", parse=_parse_str_attrs)
def _depth_to_space(a, training, x):
    bs, (b, c, h, w) = a["blocksize"], x.shape
    if a.get("mode", "DCR") == "DCR":
        y = x.reshape(b, bs, bs, c // bs ** 2, h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(b, c // bs ** 2, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(b, c // bs ** 2, h * bs, w * bs)


@_op("SpaceToDepth")
def _space_to_depth(a, training, x):
    bs, (b, c, h, w) = a["blocksize"], x.shape
    y = x.reshape(b, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(b, c * bs * bs, h // bs, w // bs)


@_op("TopK")
def _topk(a, training, x, k):
    v, i = torch.topk(x, int(k.reshape(-1)[0]), a.get("axis", -1), bool(a.get("largest", 1)), bool(a.get("sorted", 1)))
    return v, i


def _arg(fn, a, training, x):
    axis = a.get("axis", 0) % x.dim()
    keep = bool(a.get("keepdims", 1))
    if a.get("select_last_index", 0):
        n = x.shape[axis]
        return n - 1 - fn(x.flip(axis), axis, keep)
    return fn(x, axis, keep)


_op("ArgMax")(functools.partial(_arg, torch.argmax))
_op("ArgMin")(functools.partial(_arg, torch.argmin))


def constant_value(node: onnx.NodeProto) -> np.ndarray:
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    v = onnx.helper.get_attribute_value(attr)
    kinds = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    if attr.name not in kinds:
        raise Unsupported(f"Constant attribute {attr.name}")
    return np.asarray(v, dtype=kinds[attr.name])
