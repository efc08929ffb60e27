"""Exporters: fused graph + QuantPlan (+ tuned weights) -> deployable ONNX (QDQ today; see issue 5)."""
