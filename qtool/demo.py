"""`qtool demo`: the whole flow on the embedded digits data, offline, in a few minutes.

train (LeNet-5, FP32) -> fuse -> quantize (PTQ W8A8, U8S8) -> qat (W4A4, LSQ) -> export (QOperator and
integer-only, checked against the integer simulator) -> eval each on onnxruntime -> bench.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from qtool.errors import QtoolError

DATA = "digits"


def run_demo(workdir: str | Path = "demo-out", epochs: int = 8, qat_epochs: int = 2, bench_runs: int = 200,
             quiet: bool = False) -> dict:
    import qtool
    from qtool.data import batches, load_dataset
    from qtool.evaluation import predict
    from qtool.intsim import IntSim
    from qtool.preprocess import resolve_preprocess

    console = Console(quiet=quiet)
    console.width = max(console.width, 120)
    wd = Path(workdir)
    if wd.exists() and not wd.is_dir():
        raise QtoolError(f"demo workdir is not a directory: {wd}")
    wd.mkdir(parents=True, exist_ok=True)
    f = {k: wd / f"lenet5.{k}.onnx" for k in ("fp32", "fused", "int8", "w4a4_qat", "qoperator", "integer")}
    plan = wd / "lenet5.int8.plan.json"
    t0 = time.perf_counter()

    console.rule("1/6 train LeNet-5 on digits (FP32)")
    qtool.train(qtool.TrainConfig(model="lenet5", data=DATA, epochs=epochs, batch_size=64, lr=0.05), f["fp32"],
                quiet=quiet)
    console.rule("2/6 fuse")
    fused = qtool.fuse(f["fp32"])
    fused.save(f["fused"])
    for line in fused.summary.lines():
        console.print("  " + line)
    console.rule("3/6 quantize (PTQ W8A8, mse calibration, per-channel)")
    q = qtool.quantize(fused.model, DATA, qtool.QuantConfig(calib="mse", calib_size=256))
    q.save(f["int8"], plan)
    for line in q.lines():
        console.print("  " + line)
    console.rule("4/6 qat (W4A4 LSQ, first/last layer 8-bit)")
    t = qtool.qat(fused.model, DATA, qtool.QATConfig(weight_bits=4, act_bits=4, algo="lsq", epochs=qat_epochs,
                                                     batch_size=64, lr=0.01, quiet=quiet))
    t.save(f["w4a4_qat"])
    for line in t.lines():
        console.print("  " + line)
    console.rule("5/6 export the PTQ plan as QOperator and integer-only ONNX")
    for fmt in ("qoperator", "integer"):
        qtool.export(fused.model, q.plan, qtool.ExportConfig(format=fmt)).save(f[fmt])
    integer = qtool.load_model(f["integer"])
    ds = load_dataset(DATA, "val")
    x, _ = next(batches(ds, 64, resolve_preprocess(integer)))
    sim_out = IntSim(integer)({integer.graph.input[0].name: x})[0]

    agree = float(np.mean(sim_out.argmax(1) == predict(integer, x).argmax(1)))
    console.print(f"  integer simulator vs onnxruntime on {len(x)} images: top-1 agreement {agree * 100:.1f}%")
    console.rule("6/6 eval and bench (onnxruntime CPU EP, 2 threads)")
    acc = {k: qtool.evaluate(p, DATA).accuracy for k, p in f.items()}
    timed = ("fp32", "int8", "w4a4_qat", "qoperator")
    rep = qtool.bench([str(f[k]) for k in timed], qtool.BenchConfig(batches=(1, 64), threads=2, warmup=10,
                                                                      runs=bench_runs, progress=not quiet))

    t = Table(title=f"qtool demo on digits ({time.perf_counter() - t0:.0f} s)")
    for col in ("model", "val top-1", "size (bytes)", "median ms b1", "median ms b64", "latency vs fp32 b64"):
        t.add_column(col)
    results = {}
    for k, p in f.items():
        rows = {b: rep.row(str(p), "cpu", b) for b in (1, 64)} if k in timed else {}
        med = {b: f"{rows[b].median_ms:.3f}" if rows.get(b) and rows[b].median_ms else "-" for b in (1, 64)}
        ratio = rows[64].ratio if rows.get(64) else None
        t.add_row(k, f"{acc[k] * 100:.2f}%", str(p.stat().st_size), med[1], med[64], f"{ratio:.2f}" if ratio else "-")
        results[k] = {"acc": acc[k], "bytes": p.stat().st_size, "ratio_b64": ratio}
    console.print(t)
    console.print("On this tiny LeNet-5 (1- and 6-channel 5x5 convs) onnxruntime's int8 kernels are SLOWER than FP32 "
                  "(its own quantize_static model too); on CIFAR ResNets they are ~2x faster: see "
                  "benchmarks/results/suite.md.")
    console.print(f"files in {wd}/; compare any two with `qtool bench {f['int8']} {f['fp32']} --batch 1,64`")
    results["intsim_agreement"] = agree
    return results
