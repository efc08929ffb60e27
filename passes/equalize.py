"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", section 4.1) of Conv pairs.

Math. For Conv1 -> f -> Conv2 where f is positive-homogeneous per channel (f(x / s) = f(x) / s for
s > 0: nothing, Relu, LeakyRelu, PRelu, max / average pooling), scaling output channel i of Conv1 (its weight row W1[i] and
bias b1[i]) by 1 / s_i and input channel i of Conv2 (every weight entry that reads channel i) by s_i
leaves the FP32 function unchanged:

    Conv2(f(W1 x + b1)) = Conv2'(f((W1 x + b1) / s)),   Conv2' = Conv2 with W2[:, i] * s_i.

With r1_i = max |W1[i]| and r2_i = max |W2[:, i]|, s_i = sqrt(r1_i * r2_i) / r2_i gives both the same
range sqrt(r1_i * r2_i), which is what per-tensor quantization (of weights, and of the activation
between them, whose channels scale with W1's rows) wants. A Conv in two pairs (the second of one, the
first of the next) is pulled both ways, so the pairs are equalized in rounds until the scales stop
changing. Grouped / depthwise Conv2: input channel c of a Conv with g groups is column c % (C/g) of
the output channels of group c // (C/g); for depthwise (g = C) that is its own row.

Refused, with the reason: Clip / Relu6 / HardSigmoid / HardSwish and the like between the convs (ONNX
Clip bounds are scalars; clip(x / s, 0, 6) = clip(x, 0, 6 s) / s would need per-channel bounds), an
intermediate tensor with other readers or that is a graph output (a branch would see the scaled
channels), weights or biases that are not constant initializers owned by the pair. Only the values of
initializers change, never the graph's structure or names, so quantization units and plans still fit.
Computed in float64, stored in the weights' dtype.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.core import PassResult, QPass, check_owned_constant, const_array, sole_consumer

# f(x / s) = f(x) / s for every s > 0, per channel (pooling: per-channel max / mean)
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
MAX_ROUNDS = 20
TOLERANCE = 1e-4  # stop when every scale of a round is within this of 1


class CrossLayerEqualizationPass(QPass):
    """Conv -> (Relu | LeakyRelu | PRelu)? -> Conv: per-channel weight ranges of the pair made equal."""

    def __init__(self, max_rounds: int = MAX_ROUNDS, tolerance: float = TOLERANCE) -> None:
        super().__init__()
        self.max_rounds = max_rounds
        self.tolerance = tolerance
        self.rounds = 0

    def call(self, model: ir.Model) -> PassResult:
        pairs = []
        for node in model.graph:
            if node.op_type == "Conv" and node.domain in ("", "ai.onnx"):
                pair = self._match(node)
                if pair is not None:
                    pairs.append(pair)
        if not pairs:
            return PassResult(model, False)
        weights: dict[str, np.ndarray] = {}  # float64 working copies, written back once
        for c1, c2 in pairs:
            for v in (c1.inputs[1], c2.inputs[1]) + ((c1.inputs[2],) if _bias(c1) else ()):
                weights.setdefault(v.name, const_array(v).astype(np.float64))
        self.rounds = 0
        for self.rounds in range(1, self.max_rounds + 1):
            worst = 0.0
            for c1, c2 in pairs:
                worst = max(worst, self._equalize(c1, c2, weights))
            if worst < self.tolerance:
                break
        values = {v.name: v for c1, c2 in pairs for v in (c1.inputs[1], c2.inputs[1], _bias(c1)) if v is not None}
        for name, w in weights.items():
            v = values[name]
            v.const_value = ir.tensor(w.astype(const_array(v).dtype), name=name)
        for c1, c2 in pairs:
            self.fire(f"{c1.name!r} -> {c2.name!r} equalized")
        return PassResult(model, True)

    # -- match / check -------------------------------------------------------------------------
    def _match(self, c2: ir.Node) -> tuple[ir.Node, ir.Node] | None:
        """(Conv1, Conv2) when Conv2's input comes from a Conv, directly or through one activation."""
        x = c2.inputs[0] if c2.inputs else None
        p = x.producer() if x is not None else None
        if p is None:
            return None
        if p.op_type == "Conv" and p.domain in ("", "ai.onnx"):
            c1, act = p, None
        else:
            src = p.inputs[0] if p.inputs else None
            c1 = src.producer() if src is not None else None
            if c1 is None or c1.op_type != "Conv" or c1.domain not in ("", "ai.onnx"):
                return None
            act = p
        reason = self._check(c1, act, c2)
        if reason:
            self.refuse(c2, f"not equalized with {c1.name or 'Conv'!r}: {reason}")
            return None
        return c1, c2

    def _check(self, c1: ir.Node, act: ir.Node | None, c2: ir.Node) -> str | None:
        if act is not None and (act.op_type not in HOMOGENEOUS or act.domain not in ("", "ai.onnx")):
            if act.op_type in ("Clip", "Relu6", "HardSigmoid", "HardSwish"):
                return (f"{act.op_type} {act.name!r} between them is not scale-equivariant (a per-channel scale "
                        "would need per-channel clip bounds, which ONNX Clip cannot hold)")
            return f"{act.op_type} {act.name!r} between them is not positive-homogeneous (f(x/s) != f(x)/s)"
        for y, reader in ((c1.outputs[0], act or c2), *(((act.outputs[0], c2),) if act else ())):
            if sole_consumer(y) is not reader:
                why = "is a graph output" if y.is_graph_output() else f"has {len(y.uses())} readers"
                return f"intermediate tensor {y.name!r} {why}: a branch would see the scaled channels"
        if act is not None and act.op_type == "PRelu":
            slope = act.inputs[1] if len(act.inputs) > 1 else None
            if slope is None or slope.const_value is None:
                return f"PRelu {act.name!r} slope is not constant"
        for node, what in ((c1, "first"), (c2, "second")):
            reason = check_owned_constant(node.inputs[1] if len(node.inputs) > 1 else None, (node,))
            if reason:
                return f"{what} conv's weight: {reason}"
            if not np.issubdtype(const_array(node.inputs[1]).dtype, np.floating):
                return f"{what} conv's weight is not floating point"
        if _bias(c1) is not None:
            reason = check_owned_constant(_bias(c1), (c1,))
            if reason:
                return f"first conv's bias: {reason}"
        w1, w2 = const_array(c1.inputs[1]), const_array(c2.inputs[1])
        g = _group(c2)
        if w1.ndim < 3 or w2.ndim < 3 or w2.shape[0] % g or w1.shape[0] != w2.shape[1] * g:
            return f"channel mismatch: first conv has {w1.shape[0]} outputs, second reads {w2.shape[1] * g}"
        return None

    # -- rewrite -------------------------------------------------------------------------------
    @staticmethod
    def _equalize(c1: ir.Node, c2: ir.Node, weights: dict[str, np.ndarray]) -> float:
        """One equalization step of the pair on `weights`; the largest |s - 1| it applied."""
        w1, w2 = weights[c1.inputs[1].name], weights[c2.inputs[1].name]
        channels, g = w1.shape[0], _group(c2)
        cpg, mpg = w2.shape[1], w2.shape[0] // g  # input channels / output channels per group
        r1 = np.abs(w1).reshape(channels, -1).max(axis=1)
        # input channel c = group * cpg + j reads w2[group * mpg:(group + 1) * mpg, j]
        grouped = np.abs(w2).reshape((g, mpg, cpg, -1))
        r2 = grouped.transpose(0, 2, 1, 3).reshape(channels, -1).max(axis=1)
        ok = (r1 > 0) & (r2 > 0)
        s = np.ones(channels)
        s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
        w1 /= s.reshape((-1,) + (1,) * (w1.ndim - 1))
        bias = _bias(c1)
        if bias is not None:
            b = weights[bias.name]
            b /= s.reshape(b.shape)
        w2 *= s.reshape((g, 1, cpg) + (1,) * (w2.ndim - 2)).repeat(mpg, axis=1).reshape((-1, cpg) + (1,) * (w2.ndim - 2))
        return float(np.max(np.abs(s - 1.0)))


def _bias(node: ir.Node) -> ir.Value | None:
    return node.inputs[2] if len(node.inputs) > 2 else None


def _group(node: ir.Node) -> int:
    a = node.attributes.get("group")
    return a.as_int() if a is not None else 1
