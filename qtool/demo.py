"""`qtool demo`: the whole flow on the embedded digits data, offline, in a few minutes.

train (LeNet-5, FP32) -> fuse -> quantize (PTQ, W8A8 U8S8) -> eval each -> bench FP32 vs INT8.
Grows as stages land (qat, search, export).
"""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qtool.errors import QtoolError

DATA = "digits"


def run_demo(workdir: str | Path = "demo-out", epochs: int = 8, bench_runs: int = 200, quiet: bool = False) -> dict:
    from qtool.bench import bench
    from qtool.evaluate import evaluate_model
    from qtool.io import load_model
    from qtool.quantize import fuse_file, quantize_cli
    from qtool.train import TrainConfig, train

    console = Console(quiet=quiet)
    console.width = max(console.width, 120)
    wd = Path(workdir)
    if wd.exists() and not wd.is_dir():
        raise QtoolError(f"demo workdir is not a directory: {wd}")
    wd.mkdir(parents=True, exist_ok=True)
    fp32, fused, int8 = wd / "lenet5.onnx", wd / "lenet5.fused.onnx", wd / "lenet5.int8.onnx"
    t0 = time.perf_counter()

    console.rule("1/5 train LeNet-5 on digits (FP32)")
    r = train(TrainConfig(model="lenet5", data=DATA, epochs=epochs, batch_size=64, lr=0.05), fp32, quiet=quiet)
    console.rule("2/5 fuse")
    for line in fuse_file(fp32, fused).lines():
        console.print("  " + line)
    console.rule("3/5 quantize (PTQ W8A8, minmax, per-channel)")
    for line in quantize_cli(fused, int8, data=DATA, calib="minmax", calib_size=256).lines():
        console.print("  " + line)
    console.rule("4/5 eval on onnxruntime")
    acc = {name: evaluate_model(load_model(p), DATA, "val").accuracy for name, p in
           (("fp32", fp32), ("fused", fused), ("int8", int8))}
    console.rule("5/5 bench (CPU EP, batch 1 and 64)")
    rep = bench([str(fp32), str(int8)], eps=("cpu",), batches=(1, 64), threads=2, warmup=10, runs=bench_runs,
                progress=not quiet)

    t = Table(title=f"qtool demo ({time.perf_counter() - t0:.0f} s)")
    for col in ("model", "val top-1", "size (bytes)", "median ms b1", "median ms b64", "latency ratio b64"):
        t.add_column(col)
    results = {}
    for name, p in (("fp32", fp32), ("fused", fused), ("int8", int8)):
        rows = {b: rep.row(str(p), "cpu", b) for b in (1, 64)} if name != "fused" else {}
        med = {b: (f"{rw.median_ms:.3f}" if rw and rw.median_ms else "-") for b, rw in ((1, rows.get(1)), (64, rows.get(64)))}
        ratio = rows.get(64).ratio if rows.get(64) else None
        t.add_row(name, f"{acc[name] * 100:.2f}%", str(p.stat().st_size), med[1], med[64],
                  f"{ratio:.2f}" if ratio else "-")
        results[name] = {"acc": acc[name], "bytes": p.stat().st_size, "ratio_b64": ratio}
    console.print(t)
    console.print(f"files in {wd}/; next: `qtool bench {int8} {fp32} --batch 1,64`")
    return results
