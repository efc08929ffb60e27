"""Shared pieces of the exporters: a small graph builder, constants of the source graph, and the
fixed-point requantization arithmetic (Jacob et al. 2018, section 2.2).

Requantization multiplier. A real multiplier M > 0 (e.g. s_x * s_w / s_y) is written as
`M ~= m0 * 2^-n` with an integer `m0` in [2^30, 2^31) (31 significant bits, an int32) and a shift
`n` in [1, 62]. The integer graph computes `round_half_up(acc * m0 / 2^n)` in int64: |acc| < 2^31
and m0 < 2^31 keep |acc * m0| < 2^62, so nothing overflows. The relative error of M is < 2^-31,
far below one output step, so results differ from the float requantization of the QDQ model only
where `acc * M` lands within ~1e-9 of a rounding tie (and at exact ties, where the float path rounds
half to even and this one rounds half up): at most 1 LSB per layer.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qtool.errors import QtoolError
from qtool.plan import BIAS_CODE_LIMIT

MAX_SHIFT = 62


def fixed_point(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per element: (m0 int64 in [2^30, 2^31), n int64 in [1, 62]) with m ~= m0 * 2^-n."""
    m = np.asarray(m, np.float64)
    if np.any(~np.isfinite(m)) or np.any(m <= 0):
        raise QtoolError("requantization multiplier must be finite and > 0")
    frac, exp = np.frexp(m)  # m = frac * 2^exp, frac in [0.5, 1)
    m0 = np.rint(frac * 2.0**31).astype(np.int64)
    n = (31 - exp).astype(np.int64)
    carry = m0 == 2**31  # frac rounded up to 1.0
    m0 = np.where(carry, 2**30, m0)
    n = np.where(carry, n - 1, n)
    if np.any(n < 1):
        raise QtoolError(f"requantization multiplier {float(m.max()):.3g} >= 2^30: scales of the plan are inconsistent")
    # Tiny multipliers: keep the shift at 62 and give up leading bits of m0 (the product is ~0 anyway).
    big = n > MAX_SHIFT
    m0 = np.where(big, np.rint(np.where(big, m, 0.0) * 2.0**MAX_SHIFT).astype(np.int64), m0)
    n = np.where(big, MAX_SHIFT, n)
    return m0, n


def fixed_point_common(ms: list[float]) -> tuple[list[int], int]:
    """Several multipliers sharing one shift (residual Add): the largest gets 31 bits."""
    _, n = fixed_point(np.array(max(ms)))
    n = int(n)
    return [int(np.rint(m * 2.0**n)) for m in ms], n


def bias_int32(bias: np.ndarray, s_in: float, s_w) -> np.ndarray:
    """Exactly passes.qdq's int32 bias: round(b / float32(s_in * s_w)), saturated."""
    s = (np.float64(np.float32(s_in)) * np.asarray(s_w, np.float32).astype(np.float64)).astype(np.float32)
    return np.clip(np.rint(bias.astype(np.float64) / s.astype(np.float64)), -BIAS_CODE_LIMIT, BIAS_CODE_LIMIT).astype(np.int32)


def source_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs of the source graph, as arrays."""
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


class Builder:
    """Collects the nodes and initializers of an exported graph with unique names."""

    def __init__(self, src: onnx.GraphProto):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.taken: set[str] = {v.name for v in list(src.input) + list(src.output) + list(src.value_info)}
        self.taken |= {t.name for t in src.initializer}
        self.taken |= {o for n in src.node for o in n.output} | {n.name for n in src.node}

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def const(self, array: np.ndarray, base: str) -> str:
        name = self.fresh(base)
        self.inits[name] = numpy_helper.from_array(np.asarray(array), name)
        return name

    def add_init(self, tensor: onnx.TensorProto) -> None:
        self.inits[tensor.name] = tensor

    def node(self, op: str, inputs: list[str], base: str, *, domain: str = "", out: str | None = None,
             **attrs) -> str:
        y = out if out is not None else self.fresh(base)
        self.nodes.append(helper.make_node(op, inputs, [y], name=self.fresh(f"{base}_{op}"), domain=domain or None,
                                           **attrs))
        return y

    def copy(self, node: onnx.NodeProto, inputs: list[str], outputs: list[str]) -> None:
        n = onnx.NodeProto()
        n.CopyFrom(node)
        del n.input[:]
        n.input.extend(inputs)
        del n.output[:]
        n.output.extend(outputs)
        n.name = self.fresh(node.name or node.op_type)
        self.nodes.append(n)
