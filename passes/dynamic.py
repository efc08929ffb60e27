"""Dynamic activation quantization: int8 weights, activations quantized at run time (no calibration).

`dynamic_weights(graph)` says which MatMul / Gemm weights a dynamic plan quantizes: a constant 2-D
weight B of a MatMul, or of a Gemm computing A B + C (alpha = beta = 1, no transA), per output column.
Two-activation MatMuls (Q K^T, attn V) stay float: both operands would need a run-time quantizer and
the uint8 x uint8 kernel, for small products (onnxruntime's quantize_dynamic leaves them float too).
Convolutions stay float: ConvInteger runs slower than the float Conv on x86 (measured on Wav2Vec2's
feature encoder).

`DynamicQuantPass(plan)` rewrites each planned node with standard ONNX ops,

    a_q, a_s, a_z = DynamicQuantizeLinear(A)            # uint8, per tensor, once per input tensor
    y = Cast(MatMulInteger(a_q, B_q, a_z), float) * (a_s * s_B) [+ C]

with B_q the weight's int8 codes laid out [K, N] and s_B its per-column scales (zero points 0, so
MatMulInteger needs no B zero point and the scale can be a vector on the output columns).
onnxruntime fuses the chain into com.microsoft MatMulIntegerToFloat / DynamicQuantizeMatMul; any
ONNX runtime can run it as is. The node's output keeps its name.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from passes.core import PassResult, QPass, names_in, new_initializer, unique_name
from passes.qdq import quantize_array


def _is_weight(v: ir.Value | None) -> bool:
    return (v is not None and v.const_value is not None and not v.is_graph_input()
            and np.issubdtype(v.const_value.numpy().dtype, np.floating) and v.const_value.numpy().ndim == 2)


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    return node.attributes[name].as_int() if name in node.attributes else default


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    return node.attributes[name].as_float() if name in node.attributes else default


def dynamic_target(node: ir.Node) -> tuple[ir.Value, int] | None:
    """(weight, its output-column axis) when the node runs as a dynamic int8 product, else None."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul" and len(node.inputs) == 2 and _is_weight(node.inputs[1]) \
            and not _is_weight(node.inputs[0]):
        return node.inputs[1], 1
    if node.op_type == "Gemm" and _is_weight(node.inputs[1]) and not _int_attr(node, "transA", 0) \
            and _float_attr(node, "alpha", 1.0) == 1.0 and _float_attr(node, "beta", 1.0) == 1.0:
        return node.inputs[1], 0 if _int_attr(node, "transB", 0) else 1
    return None


def dynamic_weights(graph: ir.Graph, exclude: Callable[[ir.Node], bool] | None = None) -> dict[str, int]:
    """{weight name: per-column axis} of the nodes a dynamic plan quantizes. A weight read by a node
    that is not a target (or is excluded) is left out: its float value must stay."""
    axes: dict[str, int] = {}
    bad: set[str] = set()
    for node in graph:
        t = dynamic_target(node)
        if t is None or (exclude is not None and exclude(node)):
            bad.update(v.name for v in node.inputs if v is not None and v.const_value is not None)
            continue
        w, axis = t
        if axes.get(w.name, axis) != axis:
            bad.add(w.name)
        axes[w.name] = axis
    return {k: a for k, a in axes.items() if k not in bad}


class DynamicQuantPass(QPass):
    """Rewrite the MatMul / Gemm nodes whose weights `plan` (a qtool.plan.QuantPlan of weights) holds."""

    def __init__(self, plan) -> None:
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> PassResult:
        g = model.graph
        self.taken = names_in(g)
        self.quantized: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}  # input name -> DQL outputs
        weights: dict[str, tuple[ir.Value, ir.Value]] = {}
        changed = False
        for node in list(g):
            t = dynamic_target(node)
            if t is None or t[0].name not in self.plan.tensors:
                continue
            w, axis = t
            if w.name not in weights:
                weights[w.name] = self._weight(g, w, axis)
            self._rewrite(g, node, *weights[w.name])
            changed = True
        for name in weights:  # the float weights nobody reads any more
            if not g.initializers[name].uses():
                g.initializers.pop(name)
        g.sort()
        return PassResult(model, changed)

    def _weight(self, g: ir.Graph, w: ir.Value, axis: int) -> tuple[ir.Value, ir.Value]:
        """int8 codes laid out [K, N] and the per-column (or scalar) float scale."""
        tq = self.plan.tensors[w.name]
        if tq.kind != "weight" or not tq.signed or any(np.atleast_1d(tq.zero_point)):
            raise ValueError(f"dynamic weight {w.name!r} must be a symmetric signed weight (zero point 0)")
        per_channel = tq.granularity == "per_channel"
        qmin, qmax = tq.qrange
        codes = quantize_array(w.const_value.numpy(), tq.scale, tq.zero_point, tq.axis if per_channel else None,
                               qmin, qmax, np.int8)
        if axis == 0:  # Gemm transB: W is [N, K]
            codes = codes.T
        scale = np.asarray(tq.scale, np.float32) if per_channel else np.float32(tq.scale)
        return (new_initializer(g, np.ascontiguousarray(codes), f"{w.name}_quantized", self.taken),
                new_initializer(g, np.asarray(scale, np.float32), f"{w.name}_scale", self.taken))

    def _input(self, g: ir.Graph, a: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
        """One DynamicQuantizeLinear per activation tensor, shared by every product reading it."""
        if a.name not in self.quantized:
            dql = ir.node("DynamicQuantizeLinear", [a], num_outputs=3, name=f"{a.name}_DynamicQuantizeLinear")
            for out, suffix in zip(dql.outputs, ("quantized", "scale", "zero_point")):
                out.name = unique_name(g, f"{a.name}_{suffix}", self.taken)
            producer = a.producer()
            if producer is None:
                g.insert_before(next(iter(g)), dql)
            else:
                g.insert_after(producer, dql)
            self.quantized[a.name] = tuple(dql.outputs)
        return self.quantized[a.name]

    def _rewrite(self, g: ir.Graph, node: ir.Node, codes: ir.Value, w_scale: ir.Value) -> None:
        a = node.inputs[0]
        a_q, a_s, a_z = self._input(g, a)
        base = node.name or node.outputs[0].name
        mm = ir.node("MatMulInteger", [a_q, codes, a_z], name=f"{base}_MatMulInteger")
        cast = ir.node("Cast", [mm.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{base}_Cast")
        scale = ir.node("Mul", [a_s, w_scale], name=f"{base}_scale")
        mul = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=f"{base}_Mul")
        new = [mm, cast, scale, mul]
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        if bias is not None:
            new.append(ir.node("Add", [mul.outputs[0], bias], name=f"{base}_bias"))
        for n in new:
            for out in n.outputs:
                out.name = unique_name(g, f"{base}_{n.op_type}_output", self.taken)
        y_old, y_new = node.outputs[0], new[-1].outputs[0]
        y_new.type, y_new.shape = y_old.type, y_old.shape
        g.insert_after(node, new)
        name = y_old.name
        was_output = y_old.is_graph_output()
        y_old.replace_all_uses_with(y_new, replace_graph_outputs=True)
        g.remove(node, safe=True)
        y_old.name = None
        y_new.name = name
        if was_output:
            self.taken.add(name)
        self.fire(f"{node.op_type} {base}: dynamic int8")
