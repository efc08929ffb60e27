"""Fold BatchNormalization (inference mode) into the preceding Conv / ConvTranspose / Gemm / MatMul.

Math. BatchNormalization computes, per channel c of axis 1,

    y = gamma_c * (x - mu_c) / sqrt(var_c + eps) + beta_c  =  s_c * x + t_c,
    s_c = gamma_c / sqrt(var_c + eps),   t_c = beta_c - mu_c * s_c.

When x = W * a + b is the output of a linear op whose output channel c is produced by one slice of W,

    y = (s ⊙ W) * a + (s ⊙ b + t),

so the weight is scaled along its output-channel axis and the bias becomes s ⊙ b + t:

- Conv: W is (M, C/g, k...), output channel axis 0.
- ConvTranspose: W is (C, M/g, k...); output channel m = g * (M/g) + j lives in group g, column j.
- Gemm: Y = alpha * A' B' + beta * C; output channel = column n of B' (axis 0 of B when transB,
  else axis 1). The fused bias is s ⊙ (beta * C) + t and beta becomes 1.
- MatMul with a rank-2 constant B (K, N) and a rank-2 input: column n scales; the result becomes
  Gemm(A, B', b') because MatMul has no bias input. Higher-rank MatMul outputs put N last while BN
  normalizes axis 1, so those are refused.

A BatchNormalization that cannot be folded (its producer is not one of the above, or the fold is
refused) becomes Mul(x, s) + Add(., t) with s, t shaped (C, 1, ..., 1), which the Mul/Add folding
and onnxruntime handle better than an inference BN. Computed in float64, stored in the weight dtype.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.core import PassResult, QPass, check_owned_constant, const_array, new_initializer, replace_value, sole_consumer

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class FoldBatchNormPass(QPass):
    """BatchNormalization -> folded into the producer's weights, or Mul+Add when it stands alone."""

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for bn in list(model.graph):
            if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
                continue
            reason = self._check_bn(bn)
            if reason:
                self.refuse(bn, reason)
                continue
            st = self._scale_shift(bn)
            producer = bn.inputs[0].producer()
            if producer is not None and producer.op_type in LINEAR_OPS and producer.domain in ("", "ai.onnx"):
                reason = self._check_linear(producer, bn, st[0].shape[0])
                if reason is None:
                    self._fold(model.graph, producer, bn, *st)
                    modified = True
                    continue
                self.refuse(bn, f"not folded into {producer.name or producer.op_type}: {reason}")
            if self._to_mul_add(model.graph, bn, *st):
                modified = True
        return PassResult(model, modified)

    # -- check ---------------------------------------------------------------------------------
    def _check_bn(self, bn: ir.Node) -> str | None:
        if len(bn.inputs) != 5:
            return "BatchNormalization needs 5 inputs"
        if any(o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
            return "training-mode outputs (running mean/var) are used"
        tm = bn.attributes.get("training_mode")
        if tm is not None and tm.as_int() != 0:
            return "training_mode=1"
        for v in bn.inputs[1:]:
            if v is None or v.const_value is None:
                return f"parameter {getattr(v, 'name', None)!r} is not constant"
            if v.is_graph_input():
                return f"parameter {v.name!r} is a graph input"
        return None

    def _check_linear(self, node: ir.Node, bn: ir.Node, channels: int) -> str | None:
        if sole_consumer(node.outputs[0]) is not bn:
            return "the producer's output has other readers"
        owned = [node]
        reason = check_owned_constant(node.inputs[1], owned)
        if reason:
            return f"weight {reason}"
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            reason = check_owned_constant(node.inputs[2], owned)
            if reason:
                return f"bias {reason}"
        w = const_array(node.inputs[1])
        if not np.issubdtype(w.dtype, np.floating):
            return "weight is not floating point"
        if node.op_type == "Conv" and w.shape[0] != channels:
            return "weight/BN channel mismatch"
        if node.op_type == "ConvTranspose":
            g = _int_attr(node, "group", 1)
            if w.shape[0] % g or w.shape[1] * g != channels:
                return "weight/BN channel mismatch"
        if node.op_type == "Gemm":
            if w.ndim != 2 or w.shape[0 if _int_attr(node, "transB", 0) else 1] != channels:
                return "weight/BN channel mismatch"
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                c = const_array(node.inputs[2])
                if c.size not in (1, channels) or (c.ndim == 2 and c.shape[0] != 1):
                    return f"bias shape {c.shape} is not per-channel"
        if node.op_type == "MatMul":
            a = node.inputs[0]
            if w.ndim != 2 or w.shape[1] != channels:
                return "weight is not a rank-2 (K, N) matrix matching the BN channels"
            if a.shape is None or len(a.shape) != 2:
                return "input rank is not known to be 2 (BN axis 1 would not be the MatMul columns)"
        return None

    # -- rewrite -------------------------------------------------------------------------------
    @staticmethod
    def _scale_shift(bn: ir.Node) -> tuple[np.ndarray, np.ndarray]:
        gamma, beta, mean, var = (const_array(v).astype(np.float64) for v in bn.inputs[1:])
        eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
        s = gamma / np.sqrt(var + eps)
        return s, beta - mean * s

    def _fold(self, graph: ir.Graph, node: ir.Node, bn: ir.Node, s: np.ndarray, t: np.ndarray) -> None:
        w_val = node.inputs[1]
        w = const_array(w_val)
        w64 = w.astype(np.float64)
        op = node.op_type
        if op == "Conv":
            w_new = w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
        elif op == "ConvTranspose":
            g = _int_attr(node, "group", 1)
            cin, mg = w.shape[0], w.shape[1]
            wg = w64.reshape((g, cin // g, mg) + w.shape[2:])
            w_new = (wg * s.reshape((g, 1, mg) + (1,) * (w.ndim - 2))).reshape(w.shape)
        elif op == "Gemm":
            axis = 0 if _int_attr(node, "transB", 0) else 1
            w_new = w64 * (s.reshape(-1, 1) if axis == 0 else s.reshape(1, -1))
        else:  # MatMul (K, N)
            w_new = w64 * s.reshape(1, -1)
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        b = const_array(node.inputs[2]).astype(np.float64).reshape(-1) if has_bias else np.zeros_like(s)
        if op == "Gemm":
            b = b * (node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0)
            b = np.broadcast_to(b, s.shape)
        b_new = (b * s + t).astype(w.dtype)
        w_val.const_value = ir.tensor(w_new.astype(w.dtype), name=w_val.name)
        if has_bias:
            node.inputs[2].const_value = ir.tensor(b_new, name=node.inputs[2].name)
            node.inputs[2].shape = ir.Shape(b_new.shape)
        else:
            b_v = new_initializer(graph, b_new, f"{w_val.name}_bias")
            if op == "MatMul":
                gemm = ir.Node("", "Gemm", [node.inputs[0], w_val, b_v], name=node.name,
                               outputs=[ir.Value(name=(node.outputs[0].name or "") + "_gemm")])
                graph.insert_before(node, gemm)
                replace_value(node.outputs[0], gemm.outputs[0])
                graph.remove(node, safe=True)
                node = gemm
            else:
                node.resize_inputs(3)
                node.replace_input_with(2, b_v)
        if op == "Gemm" and "beta" in node.attributes:
            node.attributes.pop("beta")
        out = node.outputs[0]
        y = bn.outputs[0]
        out.type = y.type or out.type
        out.shape = y.shape or out.shape
        replace_value(y, out)
        graph.remove(bn, safe=True)
        self.fire(f"BatchNormalization {bn.name!r} folded into {op} {node.name!r}")

    def _to_mul_add(self, graph: ir.Graph, bn: ir.Node, s: np.ndarray, t: np.ndarray) -> bool:
        x = bn.inputs[0]
        if x.shape is None:
            self.refuse(bn, "input rank unknown; left as BatchNormalization")
            return False
        rank = len(x.shape)
        dtype = const_array(bn.inputs[1]).dtype
        shape = (-1,) + (1,) * (rank - 2)
        s_v = new_initializer(graph, s.astype(dtype).reshape(shape), f"{bn.name or 'bn'}_scale_fold")
        t_v = new_initializer(graph, t.astype(dtype).reshape(shape), f"{bn.name or 'bn'}_shift_fold")
        mul = ir.Node("", "Mul", [x, s_v], name=f"{bn.name}_mul", outputs=[ir.Value(name=f"{bn.name}_mul_out")])
        add = ir.Node("", "Add", [mul.outputs[0], t_v], name=f"{bn.name}_add", outputs=[ir.Value(name=f"{bn.name}_add_out")])
        graph.insert_before(bn, [mul, add])
        add.outputs[0].type, add.outputs[0].shape = bn.outputs[0].type, bn.outputs[0].shape
        replace_value(bn.outputs[0], add.outputs[0])
        graph.remove(bn, safe=True)
        self.fire(f"lone BatchNormalization {bn.name!r} -> Mul+Add")
        return True


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return a.as_int() if a is not None else default


def fold_batchnorm(model: ir.Model) -> PassResult:
    return FoldBatchNormPass()(model)
