"""qtool: ONNX-centric quantization toolchain. `import qtool` is the Python API (qtool.api, docs/DESIGN.md):

    import qtool
    fused = qtool.fuse("model.onnx").model
    q = qtool.quantize(fused, "digits", qtool.QuantConfig(calib="mse"))

Names load on first use, so `import qtool` stays light (no torch, no click) until a stage runs.
"""
from __future__ import annotations

from qtool.lazy import lazy_getattr

__version__ = "0.1.0"

__all__ = ["train", "fuse", "quantize", "qat", "export", "evaluate", "bench", "search", "dynamic",
           "TrainConfig", "FuseConfig", "QuantConfig", "QATConfig", "ExportConfig", "EvalConfig", "BenchConfig",
           "SearchConfig", "DynamicConfig", "Data", "QuantPlan", "TensorQuant", "QtoolError", "FuseResult",
           "QuantizeResult", "load_model", "save_model", "load_dataset", "__version__"]

__getattr__ = lazy_getattr(__name__, {n: "qtool.api" for n in __all__ if n != "__version__"}, globals())


def __dir__() -> list[str]:
    return __all__
