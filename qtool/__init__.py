"""qtool: ONNX-centric quantization toolchain. `import qtool` is the Python API (docs/DESIGN.md):

    import qtool
    fused = qtool.fuse(model).model
    q = qtool.quantize(fused, "digits", qtool.QuantConfig(calib="mse"))

Names load on first use, so `import qtool` stays light (no torch, no click) until a stage runs.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "train": "qtool.api", "fuse": "qtool.api", "quantize": "qtool.api", "qat": "qtool.api",
    "export": "qtool.api", "evaluate": "qtool.api", "bench": "qtool.api", "search": "qtool.api",
    "dynamic": "qtool.api",
    "TrainConfig": "qtool.training", "FuseConfig": "qtool.fusion", "QuantConfig": "qtool.ptq",
    "QATConfig": "qtool.qat_config", "ExportConfig": "qtool.exporting", "EvalConfig": "qtool.evaluation",
    "BenchConfig": "qtool.latency", "SearchConfig": "qtool.bitsearch.config", "DynamicConfig": "qtool.dynbits.train",
    "QuantPlan": "qtool.plan", "TensorQuant": "qtool.plan", "QtoolError": "qtool.errors",
    "load_model": "qtool.io", "save_model": "qtool.io", "load_dataset": "qtool.data",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'qtool' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
