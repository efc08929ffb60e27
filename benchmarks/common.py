"""Shared bits of the benchmark scripts: where things live and how results are written."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
MODELS = ROOT / "models"
SHARED_CIFAR = ROOT.parent.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"


def cifar_spec() -> str | None:
    p = Path(os.environ.get("QTOOL_CIFAR", SHARED_CIFAR))
    return f"cifar10:{p}" if p.exists() else None


def resnet20_cifar(spec: str, threads: int):
    """(ResNet-20 ONNX model, its preprocessing, CIFAR-10 train split, val split), torch on `threads`."""
    import torch

    from qtool.data import load_dataset
    from qtool.io import load_model
    from qtool.preprocess import resolve_preprocess

    torch.set_num_threads(threads)
    model = load_model(MODELS / "resnet20_cifar10.onnx")
    return model, resolve_preprocess(model), load_dataset(spec, "train"), load_dataset(spec, "val")


def machine() -> dict:
    import onnxruntime
    import torch

    return {"python": platform.python_version(), "cpu_count": os.cpu_count(), "processor": platform.processor(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_result(name: str, payload: dict) -> Path:
    from qtool.io import atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    atomic_write_text(p, json.dumps({"machine": machine(), **payload}, indent=2, default=float) + "\n")
    return p
