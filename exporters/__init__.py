"""Exporters: fused graph + QuantPlan -> deployable ONNX (the API is qtool.exporting.export_model).

- exporters.qdq: QuantizeLinear/DequantizeLinear graph (exporters.qdq.apply_plan) + packed INT4 weights.
- exporters.qoperator: QLinearConv / QLinearMatMul / QGemm / QLinearAdd / QLinearGlobalAveragePool.
- exporters.integer: integer-only standard ONNX with fixed-point requantization (qtool.intsim runs it).
- exporters.lower: the shared walk that lowers a fused graph to integer ops; exporters.common: helpers.
"""
