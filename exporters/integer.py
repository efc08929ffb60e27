"""Integer-only format (Jacob et al. 2018): between the input QuantizeLinear and the output
DequantizeLinear every tensor is an integer, computed with standard ONNX ops only.

Per quantization unit (s = scale, z = zero point, codes q):

    acc   = ConvInteger(q_x, q_w, z_x)  (or MatMulInteger)      int32, zero padding = code z_x
    acc  += bias_int32                                           bias = round(b / (s_x s_w))
    q_y   = clip(z_y + round_half_up(acc * m0 / 2^n), lo, hi)    M = s_x s_w / s_y ~= m0 2^-n

Residual Add: `(q_a - z_a) m_a + (q_b - z_b) m_b` with one shared shift n (m_a, m_b ~= s_a/s_y 2^n,
s_b/s_y 2^n); GlobalAveragePool: int32 ReduceSum over H, W, then the same requantization with
M = s_x / (s_y H W); a pass-through tensor with new parameters: `(q - z_x) m0 >> n`. Relu / Clip
and sub-8-bit ranges are the clip bounds (lo, hi). Signed activations are carried as uint8 codes
shifted by +128 (zero point + 128): ConvInteger / MatMulInteger then always see uint8 x int8.

Rounding shift. ONNX BitShift takes unsigned types only, and a right shift of a negative number
floors. So the int64 product p (|p| < 2^61, checked per layer from the weights and code ranges) is
offset to a non-negative value first:

    u = uint64(p + 2^62 + 2^(n-1))      >= 0, < 2^63: the cast is exact
    r = int64(u >> n) - 2^(62-n)        = floor((p + 2^(n-1)) / 2^n) = round half up of p / 2^n

because 2^62 is a multiple of 2^n (n <= 62). No Div, no sign handling, one Mul + Add + BitShift +
two Casts + Add + Clip + Cast per requantization (Mul dropped when m0 = 1, i.e. `requant="pot"`,
power-of-two scale ratios only, where the result is exact).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporters.common import fixed_point, fixed_point_common
from exporters.lower import Backend, QTensor, Weight, lower
from qtool.errors import QtoolError
from qtool.plan import QuantPlan, TensorQuant

REQUANT_MODES = ("fixedpoint", "pot")
_LIMIT = 2**61


class IntegerBackend(Backend):
    name = "integer"
    allow_float = False

    def __init__(self, requant: str = "fixedpoint"):
        if requant not in REQUANT_MODES:
            raise QtoolError(f"requant must be one of {', '.join(REQUANT_MODES)}, got {requant!r}")
        self.requant_mode = requant

    def container(self, tq: TensorQuant) -> tuple[type, int]:
        return np.uint8, (128 if tq.signed else 0)

    # -- the requantization tail ---------------------------------------------------------------
    def _multiplier(self, m: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        if self.requant_mode == "fixedpoint":
            return fixed_point(m)
        n = _pot_any(m, what)
        n_eff = np.maximum(n, 0)
        return (2 ** (n_eff - n)).astype(np.int64), n_eff

    def _tail(self, b, p: str, n: np.ndarray, pre: np.ndarray, t: QTensor, base: str) -> str:
        """codes = clip(z + round_half_up((p + pre) / 2^n), lo, hi) as uint8; p is int64."""
        n = np.asarray(n, np.int64)
        half = np.where(n > 0, np.left_shift(np.int64(1), np.maximum(n - 1, 0)), 0)
        p = b.node("Add", [p, b.const((pre + 2**62 + half).astype(np.int64), f"{base}_round")], f"{base}_rounded")
        u = b.node("Cast", [p], f"{base}_u64", to=TensorProto.UINT64)
        if np.any(n > 0):
            u = b.node("BitShift", [u, b.const(n.astype(np.uint64), f"{base}_shift")], f"{base}_shifted",
                       direction="RIGHT")
        r = b.node("Cast", [u], f"{base}_i64", to=TensorProto.INT64)
        r = b.node("Add", [r, b.const((t.zp - np.left_shift(np.int64(1), 62 - n)).astype(np.int64), f"{base}_zp")],
                   f"{base}_offset")
        r = b.node("Clip", [r, b.const(np.int64(t.lo), f"{base}_lo"), b.const(np.int64(t.hi), f"{base}_hi")],
                   f"{base}_clipped")
        return b.node("Cast", [r], f"{base}_quantized", to=TensorProto.UINT8)

    def _requant(self, b, acc: str, m: np.ndarray, pre_per_m0: int, bound: np.ndarray, t: QTensor, base: str,
                 int32: bool = True) -> str:
        m0, n = self._multiplier(m, base)
        if np.any(np.abs(bound) * m0 + np.abs(pre_per_m0 * m0) >= _LIMIT):
            raise QtoolError(f"integer export: {base}: int64 requantization could overflow (accumulator bound "
                             f"{float(np.max(bound)):.3g})")
        p = b.node("Cast", [acc], f"{base}_acc64", to=TensorProto.INT64) if int32 else acc
        if np.any(m0 != 1):
            p = b.node("Mul", [p, b.const(m0.astype(np.int64), f"{base}_multiplier")], f"{base}_scaled")
        return self._tail(b, p, n, pre_per_m0 * m0, t, base)

    @staticmethod
    def _amax(x: QTensor) -> int:
        return max(x.hi - x.zp, x.zp - x.lo)

    # -- ops -------------------------------------------------------------------------------------
    def _integer_mm(self, b, op: str, x: QTensor, w: np.ndarray, base: str, **attrs) -> str:
        zx = b.const(np.uint8(x.zp), f"{base}_x_zero_point")
        return b.node(op, [x.codes, b.const(w, f"{base}_w_quantized"), zx], f"{base}_acc", **attrs)

    def _unit(self, b, acc: str, x: QTensor, w: Weight, wc: np.ndarray, bias, t: QTensor, shape: list[int], base):
        c = int(np.prod(shape)) if shape else 1
        red = tuple(i for i in range(wc.ndim) if i != (w.axis if w.axis is not None else -99))
        wsum = np.abs(wc.astype(np.int64)).sum(axis=red) if w.axis is not None else np.abs(wc.astype(np.int64)).sum()
        bound = wsum * self._amax(x) + (np.abs(bias.astype(np.int64)) if bias is not None else 0)
        if np.any(bound >= 2**31):
            raise QtoolError(f"integer export: {base}: the int32 accumulator could overflow")
        if bias is not None:
            acc = b.node("Add", [acc, b.const(bias.reshape(shape) if w.axis is not None or bias.size > 1 else bias,
                                              f"{base}_bias_quantized")], f"{base}_acc_bias")
        s_xw = (np.float32(x.scale) * w.scale.astype(np.float32)).astype(np.float32).astype(np.float64)
        m = s_xw / np.float64(t.scale)
        if m.ndim == 1:
            m, bound = m.reshape(shape), np.broadcast_to(bound, (c,)).reshape(shape)
        return self._requant(b, acc, m, 0, bound, t, base)

    def conv(self, b, node, x, w, bias, t, base):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        acc = self._integer_mm(b, "ConvInteger", x, w.codes, base, **attrs)
        shape = [w.codes.shape[0]] + [1] * (w.codes.ndim - 2)
        return self._unit(b, acc, x, w, w.codes, bias, t, shape, base)

    def gemm(self, b, node, x, w, bias, t, trans_b, base):
        wt = np.ascontiguousarray(w.codes.T) if trans_b else w.codes  # MatMulInteger wants K x N
        acc = self._integer_mm(b, "MatMulInteger", x, wt, base)
        ww = Weight(wt, w.scale, None if w.axis is None else 1)
        return self._unit(b, acc, x, ww, wt, bias, t, [wt.shape[1]], base)

    def add(self, b, a, c, t, base):
        ms, n = self._add_multipliers([a.scale / t.scale, c.scale / t.scale], base)
        terms = []
        for q, m, tag in ((a, ms[0], "a"), (c, ms[1], "b")):
            v = b.node("Cast", [q.codes], f"{base}_{tag}64", to=TensorProto.INT64)
            terms.append(b.node("Mul", [v, b.const(np.int64(m), f"{base}_{tag}_multiplier")], f"{base}_{tag}_scaled"))
        p = b.node("Add", terms, f"{base}_sum")
        pre = np.int64(-(a.zp * ms[0] + c.zp * ms[1]))
        if 255 * (ms[0] + ms[1]) + abs(int(pre)) >= _LIMIT:
            raise QtoolError(f"integer export: {base}: int64 requantization could overflow")
        return self._tail(b, p, np.int64(n), pre, t, base)

    def _add_multipliers(self, ms: list[float], what: str) -> tuple[list[int], int]:
        if self.requant_mode == "fixedpoint":
            return fixed_point_common(ms)
        n = [int(v) for v in _pot_any(np.array(ms), what)]
        n_eff = max(0, *n)
        return [2 ** (n_eff - k) for k in n], n_eff

    def global_avg_pool(self, b, x, t, shape, base):
        if not shape or len(shape) < 3 or not all(shape[2:]):
            raise QtoolError(f"integer export: {base}: GlobalAveragePool needs static spatial dims, got {shape}")
        hw = int(np.prod(shape[2:]))
        v = b.node("Cast", [x.codes], f"{base}_x32", to=TensorProto.INT32)
        axes = b.const(np.arange(2, len(shape), dtype=np.int64), f"{base}_axes")
        s = b.node("ReduceSum", [v, axes], f"{base}_sum", keepdims=1)
        m = np.float64(x.scale) / (np.float64(t.scale) * hw)
        return self._requant(b, s, np.asarray(m), -x.zp * hw, np.asarray(255 * hw), t, base)

    def requantize(self, b, x, t, base):
        v = b.node("Cast", [x.codes], f"{base}_x64", to=TensorProto.INT64)
        m = np.float64(x.scale) / np.float64(t.scale)
        return self._requant(b, v, np.asarray(m), -x.zp, np.asarray(255), t, base, int32=False)


def _pot_any(m: np.ndarray, what: str) -> np.ndarray:
    """Shifts (possibly <= 0) for exact power-of-two multipliers."""
    m = np.asarray(m, np.float64)
    n = -np.log2(m)
    if not np.allclose(n, np.rint(n), rtol=0, atol=1e-6):
        raise QtoolError(f"requant pot needs power-of-two scale ratios; {what} has a multiplier "
                         f"{float(m.ravel()[np.argmax(np.abs(n - np.rint(n)))]):.6g}")
    return np.rint(n).astype(np.int64)


def export_integer(model: onnx.ModelProto, plan: QuantPlan, requant: str = "fixedpoint") -> tuple[onnx.ModelProto, list[str]]:
    out, notes = lower(model, plan, IntegerBackend(requant))
    notes.append(f"integer-only: {requant} requantization (int64 multiply + rounding BitShift); "
                 "float ops only at the input QuantizeLinear and output DequantizeLinear")
    return out, notes
