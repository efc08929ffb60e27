"""Fold a per-channel Mul / Add / Sub / Div by a constant into the preceding Conv or Gemm.

Math. For y = W * a + b (Conv: output channels on axis 1, weight axis 0; Gemm: output columns,
weight axis 0 when transB else 1) and a constant c that is constant along every output axis except
the channel axis (shape broadcastable to (1, M, 1, ..., 1) / (1, N)):

    y * c = (c ⊙ W) * a + c ⊙ b        y / c = y * (1 / c)
    y + c = W * a + (b + c)            y - c = y + (-c)

Only `y` on the left of Sub/Div is folded (c - y is not affine in the same way). A constant that
varies along batch or spatial axes, or that would broadcast y to a larger shape, is refused because
the fold would no longer be exact. Repeated application folds whole Mul/Add chains (a lone BN turned
into Mul+Add by the BN pass included).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.core import PassResult, QPass, check_owned_constant, const_array, new_initializer, replace_value, sole_consumer

AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


class FoldAffinePass(QPass):
    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type not in ("Conv", "Gemm") or node.domain not in ("", "ai.onnx"):
                continue
            while (nxt := sole_consumer(node.outputs[0])) is not None and nxt.op_type in AFFINE_OPS:
                other = [v for v in nxt.inputs if v is not node.outputs[0]]
                if other and other[0] is not None and other[0].producer() is not None:
                    break  # y + z of two activations (a residual) is not a candidate at all
                reason, c = self._check(node, nxt)
                if reason:
                    self.refuse(nxt, f"not folded into {node.name or node.op_type}: {reason}")
                    break
                self._fold(model.graph, node, nxt, c)  # then try the next link of the chain
                modified = True
        return PassResult(model, modified)

    def _check(self, node: ir.Node, op: ir.Node) -> tuple[str | None, np.ndarray | None]:
        y = node.outputs[0]
        pos = 0 if op.inputs[0] is y else 1
        if pos == 1 and op.op_type in ("Sub", "Div"):
            return f"{op.op_type} with the tensor on the right is not affine in it", None
        cv = op.inputs[1 - pos]
        if cv is not None and cv.is_graph_input():
            return f"{cv.name!r} is a graph input", None
        if cv is None or cv.const_value is None:
            return "the other operand is not a constant", None
        for v, what in ((node.inputs[1], "weight"), (node.inputs[2] if len(node.inputs) > 2 else None, "bias")):
            if v is None:
                continue
            reason = check_owned_constant(v, [node])
            if reason:
                return f"{what} {reason}", None
        w = const_array(node.inputs[1])
        c = const_array(cv)
        if not np.issubdtype(c.dtype, np.floating) or c.dtype != w.dtype:
            return f"constant dtype {c.dtype} differs from weight dtype {w.dtype}", None
        out_rank = w.ndim if node.op_type == "Conv" else 2
        if node.op_type == "Gemm":
            if w.ndim != 2:
                return "Gemm weight is not rank 2", None
            channels = w.shape[0 if _int_attr(node, "transB", 0) else 1]
        else:
            channels = w.shape[0]
        if c.ndim > out_rank:
            return f"constant of rank {c.ndim} would broadcast the output", None
        full = c.reshape((1,) * (out_rank - c.ndim) + c.shape)
        for ax, d in enumerate(full.shape):
            if ax != 1 and d != 1:
                return f"constant varies along axis {ax}", None
        if full.shape[1] not in (1, channels):
            return f"constant has {full.shape[1]} channels, output has {channels}", None
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            b = const_array(node.inputs[2])
            if b.size not in (1, channels) or (b.ndim == 2 and b.shape[0] != 1):
                return f"Gemm bias shape {b.shape} is not per-channel", None
        vec = np.broadcast_to(full.reshape(-1), (channels,)).astype(np.float64)
        if op.op_type == "Div":
            if np.any(vec == 0):
                return "division by zero", None
            vec = 1.0 / vec
        elif op.op_type == "Sub":
            vec = -vec
        return None, vec

    def _fold(self, graph: ir.Graph, node: ir.Node, op: ir.Node, c: np.ndarray) -> None:
        w_val = node.inputs[1]
        w = const_array(w_val)
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        b = const_array(node.inputs[2]).astype(np.float64).reshape(-1) if has_bias else np.zeros(c.shape)
        if node.op_type == "Gemm":
            b = np.broadcast_to(b * (node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0), c.shape)
        if op.op_type in ("Mul", "Div"):
            if node.op_type == "Conv":
                shape = (-1,) + (1,) * (w.ndim - 1)
            else:
                shape = (-1, 1) if _int_attr(node, "transB", 0) else (1, -1)
            w_val.const_value = ir.tensor((w.astype(np.float64) * c.reshape(shape)).astype(w.dtype), name=w_val.name)
            b_new = b * c
        else:
            b_new = b + c
        b_new = b_new.astype(w.dtype)
        if has_bias:
            node.inputs[2].const_value = ir.tensor(b_new, name=node.inputs[2].name)
            node.inputs[2].shape = ir.Shape(b_new.shape)
        else:
            node.resize_inputs(3)
            node.replace_input_with(2, new_initializer(graph, b_new, f"{w_val.name}_bias"))
        if node.op_type == "Gemm" and "beta" in node.attributes:
            node.attributes.pop("beta")
        out = node.outputs[0]
        out.shape = op.outputs[0].shape or out.shape
        replace_value(op.outputs[0], out)
        graph.remove(op, safe=True)
        self.fire(f"{op.op_type} {op.name!r} folded into {node.op_type} {node.name!r}")


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return a.as_int() if a is not None else default


def fold_affine(model: ir.Model) -> PassResult:
    return FoldAffinePass()(model)
