"""What a user would pick instead of qtool: onnxruntime's own quantize_static on the same model
and the same calibration images (QDQ, per-channel int8 weights, uint8 activations = U8S8)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process


class _Reader(CalibrationDataReader):
    def __init__(self, batches: Iterable[dict[str, np.ndarray]]):
        self._it = iter(list(batches))

    def get_next(self):
        return next(self._it, None)


def ort_quantize_static(model: onnx.ModelProto, calib_batches: Iterable[dict[str, np.ndarray]],
                        activation_type: QuantType = QuantType.QUInt8, fmt: QuantFormat = QuantFormat.QDQ,
                        method: CalibrationMethod = CalibrationMethod.MinMax) -> onnx.ModelProto:
    """ORT's recommended recipe: quant_pre_process (shape inference + ORT optimizations that fold
    BN), then quantize_static with per-channel weights."""
    with tempfile.TemporaryDirectory() as d:
        src, pre, dst = Path(d) / "in.onnx", Path(d) / "pre.onnx", Path(d) / "out.onnx"
        onnx.save(model, src)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        quantize_static(str(pre), str(dst), _Reader(calib_batches), quant_format=fmt, per_channel=True,
                        activation_type=activation_type, weight_type=QuantType.QInt8, calibrate_method=method)
        return onnx.load(str(dst))
