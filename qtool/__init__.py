"""qtool: ONNX-centric quantization toolchain. `import qtool` is the Python API (qtool.api, docs/DESIGN.md):

    import qtool
    fused = qtool.fuse("model.onnx").model
    q = qtool.quantize(fused, "digits", qtool.QuantConfig(calib="mse"))

Names load on first use, so `import qtool` stays light (no torch, no click) until a stage runs.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["train", "fuse", "quantize", "qat", "export", "evaluate", "bench", "search", "dynamic",
           "TrainConfig", "FuseConfig", "QuantConfig", "QATConfig", "ExportConfig", "EvalConfig", "BenchConfig",
           "SearchConfig", "DynamicConfig", "Data", "QuantPlan", "TensorQuant", "QtoolError", "FuseResult",
           "QuantizeResult", "load_model", "save_model", "load_dataset", "__version__"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'qtool' has no attribute {name!r}")
    from qtool import api

    value = getattr(api, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
