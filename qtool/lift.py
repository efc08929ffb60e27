"""Lift an ONNX graph into a trainable torch.nn.Module (the bridge QAT trains through).

`lift(model)` returns a `LiftedModule` that runs the graph's nodes in topological order with torch
ops: one precomputed list of steps, each a module-level function plus its parsed attributes, over
a dict of tensors by ONNX name. Nothing is renamed: weights stay keyed by initializer name, so
`export_weights()` / `write_back(model)` put fine-tuned values straight back into the same graph.

State:
- float initializers that are weights/biases of Conv, ConvTranspose, Gemm, MatMul and the
  scale/bias of BatchNormalization become nn.Parameters; BN running mean/var and everything else
  (reshape targets, Add/Mul constants, int tensors) become buffers. BN in train mode uses batch
  statistics and updates its running stats in place, like torch (momentum = 1 - ONNX momentum).
- `Identity(initializer)` outputs are untied into tensors of their own: torch.onnx.export
  deduplicates equal-valued initializers (a fresh model's BN weights and running vars all alias
  one tensor), and training them tied would be wrong. `write_back` gives an alias whose value
  diverged from its source a new initializer `<alias>.lifted` feeding the same Identity node.
- Constant nodes are evaluated once at lift time (non-persistent buffers, so `.to()` moves them).

Quantization hooks: `set_quantizer(tensor_name, fq)` applies `fq` where that tensor's value is
produced (graph input, node output or initializer); `set_weight_quantizer(init_name, fq)` does
the same for a weight, after reading the parameter. One hook per tensor = one QDQ pair per tensor,
which is how the exporter places them.

Limits (raise QtoolError naming op and node at lift time): ops outside `supported_ops()`,
BatchNormalization with training outputs in use, MaxPool's Indices output, ConvTranspose with
auto_pad/output_shape, Resize modes other than nearest(asymmetric/floor, half_pixel/
round_prefer_ceil), linear/cubic with half_pixel, pytorch_half_pixel or align_corners, antialias.
"""
from __future__ import annotations

import functools

import copy
import math
import re
from collections import defaultdict
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from qtool.errors import QtoolError
from qtool.io import MAX_OPSET, MIN_OPSET, default_opset

__all__ = ["lift", "LiftedModule", "supported_ops", "run_op", "conv_window"]

_PARAM_INPUTS = {  # op -> input indices whose float initializers are trainable
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
}
_BN_RUNNING_INPUTS = (3, 4)

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


def run_op(op_type: str, attrs: dict, training: bool, *inputs):
    """Run one op the way the lifted graph does (attrs as returned by `LiftedModule.node_attrs`)."""
    return _OPS[op_type][0](attrs, training, *inputs)


def _call_module(a, training, *xs):
    return a["module"](*xs)


class _Unsupported(Exception):
    """Raised by a parse function; turned into a QtoolError naming the node."""


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
        raise _Unsupported("auto_pad SAME_* / output_shape")
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
        raise _Unsupported("training-mode outputs (running_mean/var) in use")
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
        raise _Unsupported("Indices output")
    if a.get("storage_order", 0):
        raise _Unsupported("storage_order=1")
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
        raise _Unsupported("dilations")
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
        raise _Unsupported("antialias / axes / keep_aspect_ratio_policy")
    if mode == "nearest":
        nm = a.get("nearest_mode", "round_prefer_floor")
        if ctm == "asymmetric" and nm == "floor":
            a["_torch"] = ("nearest", None)
        elif ctm in ("half_pixel", "pytorch_half_pixel") and nm == "round_prefer_ceil":
            a["_torch"] = ("nearest-exact", None)
        else:
            raise _Unsupported(f"mode nearest with coordinate_transformation_mode={ctm}, nearest_mode={nm}")
    elif mode in ("linear", "cubic"):
        if ctm in ("half_pixel", "pytorch_half_pixel"):
            align = False
        elif ctm == "align_corners":
            align = True
        else:
            raise _Unsupported(f"mode {mode} with coordinate_transformation_mode={ctm}")
        if mode == "cubic" and (a.get("cubic_coeff_a", -0.75) != -0.75 or a.get("exclude_outside", 0)):
            raise _Unsupported("cubic_coeff_a != -0.75 or exclude_outside")
        a["_torch"] = (mode, align)
    else:
        raise _Unsupported(f"mode {mode}")
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


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    v = onnx.helper.get_attribute_value(attr)
    kinds = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    if attr.name not in kinds:
        raise _Unsupported(f"Constant attribute {attr.name}")
    return np.asarray(v, dtype=kinds[attr.name])


def _label(node: onnx.NodeProto) -> str:
    return repr(node.name) if node.name else f"(unnamed, output {node.output[0]!r})"


def _sanitize(name: str, taken: set[str], prefix: str) -> str:
    base = prefix + re.sub(r"\W", "_", name)
    key, i = base, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's algorithm keeping the file order among ready nodes (ONNX files are usually sorted)."""
    producers = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{producers[t] for t in n.input if t and t not in available and t in producers} for n in nodes]
    users = defaultdict(list)
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    pending = [len(d) for d in deps]
    ready = [i for i, p in enumerate(pending) if p == 0]
    order = []
    while ready:
        i = min(ready)
        ready.remove(i)
        order.append(nodes[i])
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        stuck = next(n for n, p in zip(nodes, pending) if p)
        raise QtoolError(f"graph has a cycle at node {stuck.name!r} ({stuck.op_type})")
    return order


class LiftedModule(nn.Module):
    """An ONNX graph as a torch module; see the module docstring. Build it with `lift(model)`."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        graph = model.graph
        opset = default_opset(model)
        if not MIN_OPSET <= opset <= MAX_OPSET:
            raise QtoolError(f"lift supports opsets {MIN_OPSET}..{MAX_OPSET}, model has {opset}")
        for imp in model.opset_import:
            if imp.domain not in ("", "ai.onnx"):
                used = [n for n in graph.node if n.domain == imp.domain]
                if used:
                    raise QtoolError(f"unsupported op {imp.domain}::{used[0].op_type} in node {_label(used[0])}")

        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self._init_dtypes = {t.name: t.data_type for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in inits]
        self.output_names = [o.name for o in graph.output]

        # Constants and Identity(initializer) aliases are resolved here, not at run time.
        consts: dict[str, np.ndarray] = {}
        self._alias_source: dict[str, str] = {}  # alias tensor -> initializer it was copied from
        compute: list[onnx.NodeProto] = []
        state_names = set(inits)
        for node in _topological(list(graph.node), set(inits) | set(self.input_names)):
            if node.domain not in ("", "ai.onnx"):
                raise QtoolError(f"unsupported op {node.domain}::{node.op_type} in node {_label(node)}")
            if node.op_type == "Constant":
                try:
                    consts[node.output[0]] = _constant_value(node)
                except _Unsupported as e:
                    raise QtoolError(f"unsupported Constant node {_label(node)}: {e}") from None
            elif node.op_type == "Identity" and node.input[0] in state_names:
                src = node.input[0]
                self._alias_source[node.output[0]] = self._alias_source.get(src, src)
                state_names.add(node.output[0])
                inits[node.output[0]] = inits[src]
            else:
                compute.append(node)

        # Role of each state tensor from its consumers.
        roles: dict[str, set[str]] = defaultdict(set)
        running_users: dict[str, list[str]] = defaultdict(list)
        for node in compute:
            for i, t in enumerate(node.input):
                if t not in state_names:
                    continue
                if i in _PARAM_INPUTS.get(node.op_type, ()):
                    roles[t].add("param")
                elif node.op_type == "BatchNormalization" and i in _BN_RUNNING_INPUTS:
                    roles[t].add("running")
                    running_users[t].append(node.name)
                else:
                    roles[t].add("buffer")
        for t, r in roles.items():
            if "param" in r and "running" in r:
                raise QtoolError(f"initializer {t!r} is both a trainable weight and a BatchNormalization running "
                                 "statistic; untie it (give each use its own initializer) before lifting")
            if len(running_users[t]) > 1:
                raise QtoolError(f"BatchNormalization running statistic {t!r} is shared by nodes "
                                 f"{running_users[t]}; untie it before lifting")

        self.params = nn.ParameterDict()
        self.state = nn.Module()  # buffers (persistent: they are written back)
        self.consts = nn.Module()  # evaluated Constant nodes (not written back)
        self.quantizers = nn.ModuleDict()
        self.replaced = nn.ModuleDict()  # modules standing in for groups of nodes (replace_nodes)
        taken: set[str] = set()
        self._state_key: dict[str, tuple[str, str]] = {}  # tensor name -> ("param"|"buffer", key)
        for name in sorted(state_names):
            arr = np.array(inits[name], copy=True)
            try:
                t = torch.from_numpy(arr)
            except TypeError:
                raise QtoolError(f"initializer {name!r} has dtype {arr.dtype}, which torch cannot hold") from None
            key = _sanitize(name, taken, "")
            if "param" in roles.get(name, ()) and t.is_floating_point():
                self.params[key] = nn.Parameter(t)
                self._state_key[name] = ("param", key)
            else:
                self.state.register_buffer(key, t)
                self._state_key[name] = ("buffer", key)
        self._const_key: dict[str, str] = {}
        for name, arr in consts.items():
            key = _sanitize(name, taken, "c_")
            self.consts.register_buffer(key, torch.from_numpy(np.array(arr, copy=True)), persistent=False)
            self._const_key[name] = key

        self._steps: list[tuple[Callable, dict, tuple[str, ...], tuple[str, ...]]] = []
        for node in compute:
            if node.op_type not in _OPS:
                raise QtoolError(f"unsupported op {node.op_type} in node {_label(node)}")
            run, parse = _OPS[node.op_type]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            attrs["_n_outputs"] = len(node.output)
            if parse is not None:
                try:
                    attrs = parse(attrs, node)
                except _Unsupported as e:
                    raise QtoolError(f"unsupported {node.op_type} in node {_label(node)}: {e}") from None
            ins = tuple(node.input)
            while ins and not ins[-1]:  # trailing optional inputs left out
                ins = ins[:-1]
            self._steps.append((run, attrs, ins, tuple(node.output)))
        self._node_names = [n.name for n in compute]
        self._op_types = [n.op_type for n in compute]
        self.eval_overrides = nn.ModuleDict()  # output tensor -> module run instead of the op in eval mode
        self._override_key: dict[str, str] = {}
        self._override_taken: set[str] = set()

        self._tensor_names = set(self.input_names) | state_names | set(consts) | {o for n in compute for o in n.output}
        for o in self.output_names:
            if o not in self._tensor_names:
                raise QtoolError(f"graph output {o!r} is produced by no node")
        self._quant_key: dict[str, str] = {}
        self._quant_taken: set[str] = set()

    # -- state -----------------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """The Parameter or buffer holding initializer (or Identity alias) `name`."""
        try:
            kind, key = self._state_key[name]
        except KeyError:
            raise QtoolError(f"no initializer named {name!r} in the lifted graph") from None
        return self.params[key] if kind == "param" else self.state._buffers[key]

    def trainable_initializers(self) -> dict[str, nn.Parameter]:
        """Initializer name -> Parameter (the parameter <-> initializer mapping)."""
        return {n: self.params[k] for n, (kind, k) in self._state_key.items() if kind == "param"}

    def initializer_for(self, param: torch.Tensor) -> str:
        for n, (kind, k) in self._state_key.items():
            if kind == "param" and self.params[k] is param:
                return n
        raise KeyError("tensor is not a lifted initializer parameter")

    def export_weights(self) -> dict[str, np.ndarray]:
        """Every initializer (params and buffers, incl. BN running stats), keyed by its ONNX name,
        in the initializer's dtype; untied Identity aliases appear under the Identity's output."""
        out = {}
        for name in self._state_key:
            arr = self.tensor(name).detach().cpu().numpy()
            dt = self._init_dtypes.get(self._alias_source.get(name, name))
            if dt is not None:
                arr = arr.astype(onnx.helper.tensor_dtype_to_np_dtype(dt), copy=False)
            out[name] = np.array(arr, copy=True)
        return out

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` with this module's weights in its initializers; node names unchanged."""
        weights = self.export_weights()
        out = copy.deepcopy(model)
        by_name = {t.name: t for t in out.graph.initializer}
        for name, arr in weights.items():
            if name in self._alias_source:
                continue
            t = by_name.get(name)
            if t is None:
                raise QtoolError(f"initializer {name!r} not found: write_back needs the graph that was lifted")
            if tuple(t.dims) != arr.shape:
                raise QtoolError(f"initializer {name!r} has shape {tuple(t.dims)} in the model, {arr.shape} here")
            t.CopyFrom(numpy_helper.from_array(arr, name))
        taken = {t.name for t in out.graph.initializer} | {o for n in out.graph.node for o in n.output}
        for alias, src in self._alias_source.items():
            if np.array_equal(weights[alias], weights[src]):
                continue
            node = next((n for n in out.graph.node if n.op_type == "Identity" and n.output[0] == alias), None)
            if node is None:
                raise QtoolError(f"Identity node producing {alias!r} not found: write_back needs the lifted graph")
            new_name = _unique(alias + ".lifted", taken)
            out.graph.initializer.append(numpy_helper.from_array(weights[alias], new_name))
            node.input[0] = new_name
        return out

    def node_attrs(self, node_name: str) -> dict:
        """Parsed attributes of a node still run as a step (for `run_op`)."""
        for name, (_, attrs, _, _) in zip(self._node_names, self._steps):
            if name == node_name:
                return dict(attrs)
        raise QtoolError(f"no node named {node_name!r} in the lifted graph")

    def replace_nodes(self, node_names: list[str], module: nn.Module, inputs: list[str], outputs: list[str]) -> None:
        """Run `module(*inputs) -> outputs` in place of the named nodes (QAT trains Conv+BN this way).

        The module runs where the last of the nodes ran; the other nodes' outputs must be read by
        nothing outside the group (the caller checks the pattern).
        """
        wanted = list(dict.fromkeys(node_names))
        idx = [i for i, n in enumerate(self._node_names) if n in wanted]
        if len(idx) != len(wanted):
            missing = [n for n in wanted if n not in self._node_names]
            raise QtoolError(f"replace_nodes: nodes {missing} are not steps of the lifted graph")
        for t in inputs:
            if t and t not in self._tensor_names:
                raise QtoolError(f"replace_nodes: no tensor named {t!r}")
        key = _sanitize(wanted[-1], set(self.replaced.keys()), "r_")
        self.replaced[key] = module
        step = (_call_module, {"module": module}, tuple(inputs), tuple(outputs))
        drop = set(idx[:-1])
        self._steps = [step if i == idx[-1] else s for i, s in enumerate(self._steps) if i not in drop]
        self._node_names = [key if i == idx[-1] else n for i, n in enumerate(self._node_names) if i not in drop]
        self._op_types = ["Replaced" if i == idx[-1] else n for i, n in enumerate(self._op_types) if i not in drop]
        self._tensor_names |= set(outputs)

    def step_table(self) -> list[tuple[str, dict, tuple[str, ...], tuple[str, ...]]]:
        """(op_type, attrs, inputs, outputs) per step in run order; "Replaced" for replace_nodes groups."""
        return [(op, attrs, ins, outs) for op, (_, attrs, ins, outs) in zip(self._op_types, self._steps)]

    def set_eval_override(self, output_name: str, module: nn.Module | None) -> None:
        """In eval mode, compute the step producing `output_name` as `module(*inputs)` (None removes it);
        qtool.ortexact uses this to run quantized ops the way onnxruntime's integer kernels do."""
        if not any(outs and outs[0] == output_name for _, _, _, outs in self._steps):
            raise QtoolError(f"no step produces {output_name!r} in the lifted graph")
        _set_keyed(self.eval_overrides, self._override_key, self._override_taken, output_name, module, "e_")

    # -- quantization hooks ----------------------------------------------------------------------
    def set_quantizer(self, tensor_name: str, module: nn.Module | None) -> None:
        """Apply `module` to tensor `tensor_name` where it is produced (None removes the hook)."""
        if tensor_name not in self._tensor_names:
            raise QtoolError(f"no tensor named {tensor_name!r} in the lifted graph")
        _set_keyed(self.quantizers, self._quant_key, self._quant_taken, tensor_name, module, "q_")

    def set_weight_quantizer(self, initializer_name: str, module: nn.Module | None) -> None:
        if initializer_name not in self._state_key:
            raise QtoolError(f"no initializer named {initializer_name!r} in the lifted graph")
        self.set_quantizer(initializer_name, module)

    def quantizer(self, tensor_name: str) -> nn.Module | None:
        key = self._quant_key.get(tensor_name)
        return None if key is None else self.quantizers[key]

    def quantized_tensors(self) -> dict[str, nn.Module]:
        return {n: self.quantizers[k] for n, k in self._quant_key.items()}

    # -- execution -------------------------------------------------------------------------------
    def forward(self, *args: torch.Tensor, **named: torch.Tensor):
        if len(args) > len(self.input_names):
            raise QtoolError(f"model takes {len(self.input_names)} inputs, got {len(args)}")
        feeds = dict(zip(self.input_names, args))
        feeds.update(named)
        missing = [n for n in self.input_names if n not in feeds]
        unknown = [n for n in named if n not in self.input_names]
        if missing or unknown:
            raise QtoolError(f"model inputs are {self.input_names}; missing {missing}, unknown {unknown}")
        qk, qmods = self._quant_key, self.quantizers
        env: dict[str, torch.Tensor] = {}
        for name, (kind, key) in self._state_key.items():
            env[name] = self.params[key] if kind == "param" else self.state._buffers[key]
        for name, key in self._const_key.items():
            env[name] = self.consts._buffers[key]
        env.update(feeds)
        for name, key in qk.items():
            if name in env:
                env[name] = qmods[key](env[name])
        training = self.training
        overrides = {} if training else self._override_key
        for run, attrs, ins, outs in self._steps:
            ov = overrides.get(outs[0]) if overrides else None
            if ov is not None:
                y = self.eval_overrides[ov](*[env[t] if t else None for t in ins])
            else:
                y = run(attrs, training, *[env[t] if t else None for t in ins])
            if isinstance(y, tuple):
                for o, v in zip(outs, y):
                    env[o] = v
            else:
                env[outs[0]] = y
            if qk:
                for o in outs:
                    key = qk.get(o)
                    if key is not None:
                        env[o] = qmods[key](env[o])
        result = tuple(env[o] for o in self.output_names)
        return result[0] if len(result) == 1 else result


def _set_keyed(store: nn.ModuleDict, keys: dict[str, str], taken: set[str], name: str, module: nn.Module | None,
               prefix: str) -> None:
    """Put `module` in `store` under tensor `name` (a sanitized key); None removes it."""
    key = keys.get(name)
    if module is None:
        if key is not None:
            del store[key]
            del keys[name]
        return
    if key is None:
        key = keys[name] = _sanitize(name, taken, prefix)
    store[key] = module


def _unique(name: str, taken: set[str]) -> str:
    new, i = name, 1
    while new in taken:
        new, i = f"{name}{i}", i + 1
    taken.add(new)
    return new


def lift(model: onnx.ModelProto) -> LiftedModule:
    """Lift an ONNX model (opset 13..22, default domain) into a trainable `LiftedModule`."""
    return LiftedModule(model)
