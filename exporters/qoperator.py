"""QOperator format: QLinearConv / QLinearMatMul / QGemm / QLinearAdd / QLinearGlobalAveragePool graph.

For runtimes without QDQ fusion: the input is quantized once, integer operators run throughout and
the output is dequantized. QGemm, QLinearAdd and QLinearGlobalAveragePool are onnxruntime contrib
ops (domain com.microsoft); QLinearConv / QLinearMatMul are standard ONNX. The requantization
inside these kernels is onnxruntime's own (float multiplier), so outputs equal the QDQ model's
as optimized by onnxruntime up to rounding ties (1 LSB per layer at most). Relu/Clip and sub-8-bit
ranges are a Clip on the codes (exact, see exporters.lower). A tensor whose plan parameters differ
from its producer's (e.g. after Pad) is requantized with DequantizeLinear -> QuantizeLinear, which is
what the QDQ model computes there too.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from exporters.lower import Backend, QTensor, Weight, lower
from qtool.plan import QuantPlan

MS = "com.microsoft"


class QOperatorBackend(Backend):
    name = "qoperator"

    def _params(self, b, t: QTensor, base: str) -> list[str]:
        return [b.const(np.float32(t.scale), f"{base}_scale"), b.const(t.dtype(t.zp), f"{base}_zero_point")]

    def _finish(self, b, codes: str, t: QTensor, base: str) -> str:
        return self.clip_codes(b, codes, t, base) if t.narrowed else codes

    def _weight(self, b, w: Weight, base: str, codes: np.ndarray | None = None) -> list[str]:
        codes = w.codes if codes is None else codes
        return [b.const(codes, f"{base}_w_quantized"), b.const(w.scale, f"{base}_w_scale"),
                b.const(np.zeros(w.scale.shape, np.int8), f"{base}_w_zero_point")]

    def conv(self, b, node, x, w, bias, t, base):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = [x.codes, *self._params(b, x, f"{base}_x"), *self._weight(b, w, base), *self._params(b, t, base)]
        if bias is not None:
            ins.append(b.const(bias, f"{base}_bias_quantized"))
        return self._finish(b, b.node("QLinearConv", ins, f"{base}_quantized", **attrs), t, base)

    def gemm(self, b, node, x, w, bias, t, trans_b, base):
        if node.op_type == "MatMul":
            ins = [x.codes, *self._params(b, x, f"{base}_x"), *self._weight(b, w, base), *self._params(b, t, base)]
            return self._finish(b, b.node("QLinearMatMul", ins, f"{base}_quantized"), t, base)
        c = b.const(bias, f"{base}_bias_quantized") if bias is not None else ""
        ins = [x.codes, *self._params(b, x, f"{base}_x"), *self._weight(b, w, base), c, *self._params(b, t, base)]
        return self._finish(b, b.node("QGemm", ins, f"{base}_quantized", domain=MS, transB=int(trans_b)), t, base)

    def add(self, b, a, c, t, base):
        ins = [a.codes, *self._params(b, a, f"{base}_a"), c.codes, *self._params(b, c, f"{base}_b"),
               *self._params(b, t, base)]
        return self._finish(b, b.node("QLinearAdd", ins, f"{base}_quantized", domain=MS), t, base)

    def global_avg_pool(self, b, x, t, shape, base):
        ins = [x.codes, *self._params(b, x, f"{base}_x"), *self._params(b, t, base)]
        y = b.node("QLinearGlobalAveragePool", ins, f"{base}_quantized", domain=MS, channels_last=0)
        return self._finish(b, y, t, base)

    def requantize(self, b, x, t, base):
        f = self.dequantize(b, x, f"{base}_requant")
        return self._finish(b, self.quantize_input(b, f, t, base), t, base)


def export_qoperator(model: onnx.ModelProto, plan: QuantPlan) -> tuple[onnx.ModelProto, list[str]]:
    out, notes = lower(model, plan, QOperatorBackend())
    if any(n.domain == MS for n in out.graph.node) and not any(o.domain == MS for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS, 1))
    return out, notes
