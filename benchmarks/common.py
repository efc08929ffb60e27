"""Shared bits of the benchmark scripts: where things live and how results are written."""
from __future__ import annotations

import json
import os
import platform
import subprocess
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


def timed(f):
    """(f(), its wall seconds)."""
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def run_driver(cmd: list[str]) -> tuple[dict | None, list[str], float]:
    """Run a peer tool's driver (benchmarks/*_driver.py) by its environment's interpreter: (the JSON its
    last stdout line holds, or None when it failed; the last line of its error output; wall seconds)."""
    p, wall = timed(lambda: subprocess.run(cmd, capture_output=True, text=True))
    if p.returncode != 0:
        return None, (p.stderr or p.stdout).strip().splitlines()[-1:] or ["failed"], wall
    return json.loads(p.stdout.strip().splitlines()[-1]), [], wall


def add_latency(out: dict, models: dict, feed: dict, runs: int, more: dict | None = None) -> None:
    """Median batch-1 latency of every model, interleaved in one measurement (2 threads), into `out`: each
    row of out["rows"] gets its latency_ms, a model named in `more` (name -> dict) its dict, "FP32" (not a
    row) goes to out["fp32"]."""
    from qtool.latency import median_latency_ms

    lat = median_latency_ms(models, feed, threads=2, warmup=10, runs=runs)
    out["latency"] = {"runs": runs, "threads": 2, "batch": 1}
    for k, ms in lat.items():
        target = out["rows"].get(k) or (more or {}).get(k)
        (target if target is not None else out.setdefault("fp32", {}))["latency_ms"] = ms
