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
          "Not": torch.logical_not}


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


@_op("Equal")
def _equal(a, training, x, y):
    return torch.eq(x, y)


@_op("Less")
def _less(a, training, x, y):
    return torch.lt(x, y)


@_op("Greater")
def _greater(a, training, x, y):
    return torch.gt(x, y)


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


def _parse_resize(a, node):
    a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in a.items()}
    mode = a.get("mode", "nearest")
    ctm = a.get("coordinate_transformation_mode", "half_pixel")
    if a.get("antialias", 0) or a.get("axes") is not None or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise Unsupported("antialias / axes / keep_aspect_ratio_policy")
    if mode == "nearest":
        nm = a.get("nearest_mode", "round_prefer_floor")
        if ctm == "asymmetric" and nm == "floor":
            a["_torch"] = ("nearest", None)
        elif ctm in ("half_pixel", "pytorch_half_pixel") and nm == "round_prefer_ceil":
            a["_torch"] = ("nearest-exact", None)
        else:
            raise Unsupported(f"mode nearest with coordinate_transformation_mode={ctm}, nearest_mode={nm}")
    elif mode in ("linear", "cubic"):
        if ctm in ("half_pixel", "pytorch_half_pixel"):
            align = False
        elif ctm == "align_corners":
            align = True
        else:
            raise Unsupported(f"mode {mode} with coordinate_transformation_mode={ctm}")
        if mode == "cubic" and (a.get("cubic_coeff_a", -0.75) != -0.75 or a.get("exclude_outside", 0)):
            raise Unsupported("cubic_coeff_a != -0.75 or exclude_outside")
        a["_torch"] = (mode, align)
    else:
        raise Unsupported(f"mode {mode}")
    return a


@_op("Resize", parse=_parse_resize)
def _resize(a, training, x, roi=None, scales=None, sizes=None):
    mode, align = a["_torch"]
    nd = x.dim() - 2
    if mode in ("linear", "cubic"):
        mode = {("linear", 1): "linear", ("linear", 2): "bilinear", ("linear", 3): "trilinear",
                ("cubic", 2): "bicubic"}[(mode, nd)]
    kw = {} if align is None else {"align_corners": align}
    if sizes is not None and sizes.numel():
        s = _ints(sizes)
        if s[:2] != list(x.shape[:2]):
            raise QtoolError("Resize of batch/channel dims is not supported")
        return F.interpolate(x, size=s[2:], mode=mode, **kw)
    sc = [float(v) for v in scales.reshape(-1).tolist()]
    if sc[:2] != [1.0, 1.0]:
        raise QtoolError("Resize of batch/channel dims is not supported")
    return F.interpolate(x, scale_factor=sc[2:], mode=mode, recompute_scale_factor=False, **kw)


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


def constant_value(node: onnx.NodeProto) -> np.ndarray:
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    v = onnx.helper.get_attribute_value(attr)
    kinds = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    if attr.name not in kinds:
        raise Unsupported(f"Constant attribute {attr.name}")
    return np.asarray(v, dtype=kinds[attr.name])
