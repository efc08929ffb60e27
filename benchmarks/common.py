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


def machine() -> dict:
    import onnxruntime
    import torch

    return {"python": platform.python_version(), "cpu_count": os.cpu_count(), "processor": platform.processor(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_result(name: str, payload: dict, table: str | None = None) -> Path:
    """results/NAME.json (the payload and the machine) and, given a benchmark kind of
    benchmarks.report.RENDER (`table`), its markdown table results/NAME.md."""
    from qtool.io import atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    text = json.dumps({"machine": machine(), **payload}, indent=2, default=float) + "\n"
    atomic_write_text(p, text)
    if table is not None:
        from benchmarks.report import write_table

        write_table(table, name, json.loads(text))
    return p
