"""Layer-by-layer access to a fused model lifted to torch with a QuantPlan's fake-quant installed.

Shared by the post-training refinements of `qtool quantize` (qtool.adaround, qtool.biascorr), which
work one quantized Conv / Gemm / MatMul at a time in graph order:

- `quantized_lift(model, plan)`: the lifted module with one fixed fake-quant per planned tensor
  (`PlanQuant`, the plan's scale and zero point: the same Q/DQ pairs `exporters.qdq.apply_plan`
  writes, computed as onnxruntime does in float);
- `weight_layers(lifted, plan)`: the quantized layers in graph order, each with its input, weight,
  bias, output tensor and the Relu / Clip that directly follows it (part of the reconstructed output);
- `capture(lifted, tensor, inputs)`: the value of one tensor on the inputs, batch by batch; the forward
  pass stops where the tensor is produced, so capturing the input of layer k costs the first k layers.

Bias quantization (int32, scale s_x s_w) is not simulated here: its error is below s_x s_w / 2.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper
import torch
import torch.nn as nn

from qtool.errors import QtoolError
from qtool.fakequant import FakeQuant
from qtool.lift import LiftedModule, lift
from qtool.plan import QuantPlan, TensorQuant

__all__ = ["PlanQuant", "Layer", "quantized_lift", "weight_layers", "stack_feeds", "capture", "channel_view",
           "with_initializers"]

CAPTURE_BATCH = 64
_LAYER_OPS = ("Conv", "Gemm", "MatMul")


class PlanQuant(FakeQuant):
    """A fake-quant with the fixed scale / zero point of one plan entry."""

    def __init__(self, tq: TensorQuant):
        super().__init__(tq.bits, tq.signed, tq.axis if tq.granularity == "per_channel" else None, tq.narrow)
        if (self.qmin, self.qmax) != tq.qrange:
            raise QtoolError(f"plan entry range {tq.qrange} is not the {tq.bits}-bit range {(self.qmin, self.qmax)}")
        self.register_buffer("scale", torch.tensor(tq.scale, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(tq.zero_point, dtype=torch.float32))

    def _scale_zp(self):
        return self.scale, self.zero_point


def quantized_lift(model: onnx.ModelProto, plan: QuantPlan) -> LiftedModule:
    """`model` lifted, in eval mode, with a PlanQuant on every tensor of `plan` (weights and activations)."""
    lifted = lift(model).eval()
    for name, tq in plan.tensors.items():
        if not tq.calibrated:
            raise QtoolError(f"plan tensor {name!r} has no scale yet (calibrate first)")
        lifted.set_quantizer(name, PlanQuant(tq))
    return lifted


@dataclass(frozen=True)
class Layer:
    """One quantized Conv / Gemm / MatMul step of a lifted module."""

    index: int  # position in the step table (graph order)
    op: str
    attrs: dict
    x: str  # activation input
    w: str  # weight initializer (a plan entry of kind weight)
    w_pos: int  # position of the weight among the op's inputs
    b: str | None  # bias initializer (Conv input 2, Gemm C), None without one
    out: str  # the op's output
    act: str | None  # "Relu" / "Clip" read only by this layer: reconstructed with it
    act_bounds: tuple[float | None, float | None] = (None, None)  # Clip bounds
    y: str = ""  # the tensor reconstructed: the activation's output, else `out`

    def inputs(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> list:
        ins = [None, None, b] if self.b is not None else [None, None]
        ins[self.w_pos], ins[1 - self.w_pos] = w, x
        return ins

    def activation(self, y: torch.Tensor) -> torch.Tensor:
        if self.act == "Relu":
            return torch.relu(y)
        if self.act == "Clip":
            lo, hi = self.act_bounds
            return torch.clamp(y, min=lo, max=hi)
        return y


def weight_layers(lifted: LiftedModule, plan: QuantPlan) -> list[Layer]:
    """The steps of `lifted` with a planned weight, in graph order."""
    steps = lifted.step_table()
    readers: dict[str, list[int]] = {}
    for i, (_, _, ins, _) in enumerate(steps):
        for t in ins:
            readers.setdefault(t, []).append(i)
    layers = []
    for i, (op, attrs, ins, outs) in enumerate(steps):
        if op not in _LAYER_OPS or len(ins) < 2:
            continue
        w_pos = next((k for k in (1, 0) if plan.tensors.get(ins[k]) is not None
                      and plan.tensors[ins[k]].kind == "weight"), None)
        if w_pos is None or (op != "MatMul" and w_pos != 1):
            continue
        b = ins[2] if op != "MatMul" and len(ins) > 2 and ins[2] and lifted.constant(ins[2]) is not None else None
        act, bounds, y = None, (None, None), outs[0]
        r = readers.get(outs[0], [])
        if len(r) == 1 and outs[0] not in lifted.output_names and outs[0] not in plan.tensors:
            r_op, _, r_ins, r_outs = steps[r[0]]
            if r_op == "Relu":
                act, y = "Relu", r_outs[0]
            elif r_op == "Clip" and r_ins[0] == outs[0]:
                consts = [lifted.constant(t) if t else None for t in (list(r_ins[1:]) + ["", ""])[:2]]
                if all(c is not None for c, t in zip(consts, r_ins[1:3]) if t):
                    act, y = "Clip", r_outs[0]
                    bounds = tuple(None if c is None else float(c.reshape(-1)[0]) for c in consts)
        layers.append(Layer(i, op, dict(attrs), ins[1 - w_pos], ins[w_pos], w_pos, b, outs[0], act, bounds, y))
    return layers


def stack_feeds(feeds: Iterable[dict[str, np.ndarray]], n: int) -> dict[str, torch.Tensor]:
    """The first `n` samples of a stream of feed batches, one tensor per input."""
    parts: dict[str, list[np.ndarray]] = {}
    got = 0
    for batch in feeds:
        for k, v in batch.items():
            parts.setdefault(k, []).append(np.asarray(v))
        got += len(next(iter(batch.values())))
        if got >= n:
            break
    if not parts:
        raise QtoolError("no calibration data: the refinement needs at least one batch of samples")
    return {k: torch.from_numpy(np.ascontiguousarray(np.concatenate(v)[:n])) for k, v in parts.items()}


class _Stop(Exception):
    """Ends a capture forward pass once the tensor is produced."""


class _Capture(nn.Module):
    def __init__(self, inner: nn.Module | None):
        super().__init__()
        self.inner = inner
        self.value = None

    def forward(self, x):
        self.value = x if self.inner is None else self.inner(x)
        raise _Stop


@torch.no_grad()
def capture(lifted: LiftedModule, tensor: str, inputs: dict[str, torch.Tensor], *, quantized: bool = True,
            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, batch: int = CAPTURE_BATCH) -> list:
    """`tensor`'s value on `inputs`, one entry per batch of `batch` samples (`reduce` applied to each).

    `quantized`: the value after the tensor's fake-quant (what its readers see), else before it.
    """
    inner = lifted.quantizer(tensor)
    hook = _Capture(inner if quantized else None)
    lifted.set_quantizer(tensor, hook)
    out = []
    n = len(next(iter(inputs.values())))
    try:
        for lo in range(0, n, batch):
            hook.value = None
            try:
                lifted(**{k: v[lo:lo + batch] for k, v in inputs.items()})
            except _Stop:
                pass
            if hook.value is None:
                raise QtoolError(f"tensor {tensor!r} was not computed by the forward pass")
            out.append(hook.value if reduce is None else reduce(hook.value))
    finally:
        lifted.set_quantizer(tensor, inner)
    return out


def channel_view(t: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along `axis` of an ndim tensor (a scalar as is)."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def with_initializers(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `arrays` hold those values (a refinement's result)."""
    out = copy.deepcopy(model)
    for t in out.graph.initializer:
        if t.name in arrays:
            t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    return out
