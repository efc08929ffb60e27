"""SmoothQuant (Xiao et al. 2023): move activation outliers of a LayerNormalization's output into the
weights of the MatMul / Gemm that read it.

Math. LayerNormalization over the last axis computes y = n(x) * gamma + beta, so per channel j

    y_j / s_j = n(x)_j * (gamma_j / s_j) + beta_j / s_j,     (y / s) @ (diag(s) W) = y @ W,

i.e. dividing gamma and beta by s and multiplying row j (the input channel; column j of a transposed
Gemm B) of every reading weight by s_j leaves the FP32 function unchanged. With the per-channel
maximum |y_j| over the calibration data (`smooth_targets` names the tensors to measure) and the
largest |W_j| over all readers (Q / K / V share one LayerNorm output, so one s for all three),

    s_j = max|y_j|^alpha / max|W_j|^(1 - alpha),

which flattens the activation's outlier channels (per-tensor activation scales) at the cost of the
weights' rows (per-channel weight scales absorb it along the other axis only partly).

The readers may sit behind channel-preserving ops: a Reshape whose input and output both end in the
H channels (onnxsim's MatMul -> Reshape + Gemm), a Gather on another axis (a ViT's class token), and
Shape (reads no values). Refused, with the reason: another reader (a post-LN residual Add would see
y / s), a graph output, a LayerNormalization not over the last axis alone, gamma / beta that are not
constant initializers, weights not owned by their reader. A gamma / beta shared with other nodes
(onnxsim merges identical ones) is copied first; otherwise only initializer values change.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from passes.core import PassResult, QPass, check_owned_constant, const_array, new_initializer


@dataclass
class SmoothTarget:
    norm: ir.Node  # the LayerNormalization
    readers: list[tuple[ir.Node, int]] = field(default_factory=list)  # (MatMul / Gemm, axis of W holding y's channels)

    @property
    def tensor(self) -> str:
        return self.norm.outputs[0].name


class SmoothQuantPass(QPass):
    """LayerNormalization -> MatMul / Gemm with constant weights: y / s into gamma and beta, W * s."""

    def __init__(self, act_absmax: dict[str, np.ndarray], alpha: float) -> None:
        super().__init__()
        self.act_absmax = act_absmax  # per-channel max |y| by LayerNormalization output name
        self.alpha = alpha

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for t in smooth_targets(model.graph, self):
            amax = self.act_absmax.get(t.tensor)
            if amax is None:
                self.refuse(t.norm, f"no activation maxima measured for {t.tensor!r}")
                continue
            self._smooth(model.graph, t, np.asarray(amax, np.float64))
            modified = True
        return PassResult(model, modified)

    def _smooth(self, graph: ir.Graph, t: SmoothTarget, amax: np.ndarray) -> None:
        wmax = np.zeros_like(amax)
        for node, axis in t.readers:
            w = np.abs(const_array(node.inputs[1]))
            wmax = np.maximum(wmax, w.max(axis=1 - axis))
        ok = (amax > 0) & (wmax > 0)
        s = np.ones_like(amax)
        s[ok] = amax[ok] ** self.alpha / wmax[ok] ** (1.0 - self.alpha)
        for i in (1, 2):
            v = t.norm.inputs[i] if len(t.norm.inputs) > i else None
            if v is None:
                continue
            if len(v.uses()) > 1:  # untie a shared gamma / beta: only this LayerNorm's output is rescaled
                v = new_initializer(graph, const_array(v).copy(), f"{v.name}_{t.norm.name}")
                t.norm.replace_input_with(i, v)
            _set(v, const_array(v).astype(np.float64) / s)
        for node, axis in t.readers:
            w = node.inputs[1]
            _set(w, const_array(w).astype(np.float64) * (s.reshape(-1, 1) if axis == 0 else s.reshape(1, -1)))
        self.fire(f"{t.norm.name!r}: {len(t.readers)} readers smoothed (alpha {self.alpha:g}, "
                  f"activation max {amax.max():.3g} -> {(amax / s).max():.3g})")


def _set(v: ir.Value, a: np.ndarray) -> None:
    v.const_value = ir.tensor(a.astype(const_array(v).dtype), name=v.name)


def smooth_targets(graph: ir.Graph, refusals: QPass | None = None) -> list[SmoothTarget]:
    """The LayerNormalizations whose output can be smoothed, with their MatMul / Gemm readers; each one
    that cannot is refused on `refusals` (a QPass) with the reason."""
    out = []
    for node in graph:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        t = SmoothTarget(node)
        reason = _check_norm(node) or _collect(node.outputs[0], _channels(node), t)
        if reason:
            if refusals is not None:
                refusals.refuse(node, reason)
            continue
        if t.readers:
            out.append(t)
    return out


def _channels(norm: ir.Node) -> int:
    return int(const_array(norm.inputs[1]).shape[-1])


def _check_norm(norm: ir.Node) -> str | None:
    if any(o.uses() or o.is_graph_output() for o in norm.outputs[1:]):
        return "its mean / inverse std outputs are read"
    gamma = norm.inputs[1] if len(norm.inputs) > 1 else None
    beta = norm.inputs[2] if len(norm.inputs) > 2 else None
    for v, what in ((gamma, "scale"), (beta, "bias")):
        if v is None and what == "bias":
            continue
        # shared is fine (onnxsim merges the identical gamma / beta of a random-init model): copied before scaling
        if v is None or v.is_graph_input() or not v.is_initializer() or v.const_value is None:
            return f"{what} {getattr(v, 'name', None)!r} is not a constant initializer"
        if not np.issubdtype(const_array(v).dtype, np.floating):
            return f"{what} is not floating point"
    # one gamma per channel of the last axis: the maxima are measured, and s applied, per last-axis channel
    if const_array(gamma).ndim != 1 or (beta is not None and const_array(beta).shape != const_array(gamma).shape):
        return f"scale shape {const_array(gamma).shape} is not one value per last-axis channel"
    axis = norm.attributes.get("axis")
    rank = len(norm.inputs[0].shape) if norm.inputs[0].shape is not None else None
    a = axis.as_int() if axis is not None else -1
    if not (a == -1 or (rank is not None and a == rank - 1)):
        return f"normalizes from axis {a}, not the last axis alone"
    return None


def _collect(y: ir.Value, channels: int, t: SmoothTarget) -> str | None:
    """Add the MatMul / Gemm readers of `y` (through channel-preserving ops) to `t`; why not, if not."""
    if y.is_graph_output():
        return f"{y.name!r} is a graph output"
    for user, idx in y.uses():
        op = user.op_type if user.domain in ("", "ai.onnx") else f"{user.domain}:{user.op_type}"
        if op == "Shape":
            continue
        if op in ("MatMul", "Gemm") and idx == 0:
            reason = _check_reader(user, channels)
            if reason:
                return f"reader {user.name!r}: {reason}"
            t.readers.append((user, _input_axis(user)))
        elif op == "Reshape" and idx == 0 and _keeps_last(user, channels):
            reason = _collect(user.outputs[0], channels, t)
            if reason:
                return reason
        elif op == "Gather" and idx == 0 and _gathers_other_axis(user, y):
            reason = _collect(user.outputs[0], channels, t)
            if reason:
                return reason
        else:
            return (f"{y.name!r} is also read by {op} {user.name!r}, which would see the scaled channels "
                    "(only MatMul / Gemm readers can take the inverse scale)")
    return None


def _check_reader(node: ir.Node, channels: int) -> str | None:
    reason = check_owned_constant(node.inputs[1] if len(node.inputs) > 1 else None, (node,))
    if reason:
        return f"weight {reason}"
    w = const_array(node.inputs[1])
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        return f"weight is not a 2-D float matrix (shape {w.shape})"
    if node.op_type == "Gemm" and _int_attr(node, "transA", 0):
        return "Gemm with transA"
    if w.shape[_input_axis(node)] != channels:
        return f"weight has {w.shape[_input_axis(node)]} input channels, the LayerNorm {channels}"
    return None


def _input_axis(node: ir.Node) -> int:
    """The axis of the weight that multiplies the input's last axis (K)."""
    return 1 if node.op_type == "Gemm" and _int_attr(node, "transB", 0) else 0


def _keeps_last(reshape: ir.Node, channels: int) -> bool:
    """Input and output both end in the `channels` axis, so flat index % channels is the channel in both."""
    shape = const_array(reshape.inputs[1]) if len(reshape.inputs) > 1 else None
    out = reshape.outputs[0].shape
    if shape is not None and shape.size and int(shape[-1]) == channels:
        return True
    return out is not None and len(out) > 0 and isinstance(out[-1], int) and out[-1] == channels


def _gathers_other_axis(gather: ir.Node, y: ir.Value) -> bool:
    rank = len(y.shape) if y.shape is not None else None
    axis = _int_attr(gather, "axis", 0)
    return rank is not None and axis not in (-1, rank - 1)


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return a.as_int() if a is not None else default
