"""`qtool demo`: the whole flow on the embedded digits data, offline, in 1-2 minutes on 2 busy cores.

train (DigitNet, FP32) -> fuse -> quantize (PTQ W8A8, U8S8) -> qat (W4A4, LSQ) -> export (QOperator and
integer-only, checked against the integer simulator) -> eval each on onnxruntime -> bench.

The model is qtool.models.digitnet (its docstring says why it has that shape); every latency and ratio
in the table is measured by qtool.bench in this run, none is written down in advance.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from qtool.errors import QtoolError

DATA = "digits"
MODEL = "digitnet"
BATCHES = (1, 64)
FILES = ("fp32", "fused", "int8", "w4a4_qat", "qoperator", "integer")
TIMED = ("fp32", "int8", "w4a4_qat", "qoperator", "integer")  # "fused" is fp32 with BN folded


def speed_words(ratio: float | None) -> str:
    """A latency ratio (model / FP32) in words: "2.1x faster", "1.3x slower" or "about as fast" (within 5%)."""
    if ratio is None or not ratio > 0:
        return "not measured"
    if ratio <= 0.95:
        return f"{1 / ratio:.1f}x faster"
    if ratio >= 1.05:
        return f"{ratio:.1f}x slower"
    return "about as fast"


def cpu_int8_isa() -> str:
    """What the CPU offers onnxruntime's u8s8 kernels, from /proc/cpuinfo (Linux x86); "unknown" elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    found = [v for v in ("amx_int8", "avx512_vnni", "avx_vnni") if v in flags]
    if found:
        return "/".join(found)
    return "AVX2 without VNNI" if "avx2" in flags else "unknown"


def largest_weight(model) -> tuple[tuple[int, ...], int]:
    """Shape and byte size of a model's largest initializer (the FC weight that bounds DigitNet at batch 1)."""
    from onnx import numpy_helper

    w = max((numpy_helper.to_array(i) for i in model.graph.initializer), key=lambda a: a.nbytes)
    return tuple(w.shape), int(w.nbytes)


def run_demo(workdir: str | Path = "demo-out", epochs: int = 8, qat_epochs: int = 2, bench_runs: int = 200,
             quiet: bool = False, bench_min_time_s: float = 1.0, train_threads: int | None = 1) -> dict:
    """Run the demo in `workdir`; returns what its table shows (see tests/test_demo.py for the fields).

    `train_threads`: torch threads for training and QAT (restored afterwards; None: torch's default).
    One by default: on a CPU shared with other jobs a second thread mostly waits at the barriers of
    these small layers (on 2 busy cores the demo took 210-300 s with 2 threads, 82-93 s with 1; an
    idle machine was not measured).
    """
    import torch

    import qtool
    from qtool.data import batches, load_dataset
    from qtool.evaluation import predict
    from qtool.intsim import IntSim
    from qtool.io import load_model
    from qtool.preprocess import resolve_preprocess

    console = Console(quiet=quiet)
    console.width = max(console.width, 120)
    wd = Path(workdir)
    if wd.exists() and not wd.is_dir():
        raise QtoolError(f"demo workdir is not a directory: {wd}")
    wd.mkdir(parents=True, exist_ok=True)
    f = {k: wd / f"{MODEL}.{k}.onnx" for k in FILES}
    plan = wd / f"{MODEL}.int8.plan.json"
    t0 = time.perf_counter()

    torch_threads = torch.get_num_threads()
    try:
        if train_threads:
            torch.set_num_threads(train_threads)
        console.rule("1/6 train DigitNet on digits (FP32)")
        qtool.train(qtool.TrainConfig(model=MODEL, data=DATA, epochs=epochs, batch_size=64, lr=0.05), f["fp32"],
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
        qres = qtool.qat(fused.model, DATA, qtool.QATConfig(weight_bits=4, act_bits=4, algo="lsq", epochs=qat_epochs,
                                                         batch_size=64, lr=0.01, quiet=quiet))
        qres.save(f["w4a4_qat"])
        for line in qres.lines():
            console.print("  " + line)
    finally:
        torch.set_num_threads(torch_threads)
    console.rule("5/6 export the PTQ plan as QOperator and integer-only ONNX")
    for fmt in ("qoperator", "integer"):
        qtool.export(fused.model, q.plan, qtool.ExportConfig(format=fmt)).save(f[fmt])
    integer = load_model(f["integer"])
    ds = load_dataset(DATA, "val")
    x, _ = next(batches(ds, 64, resolve_preprocess(integer)))
    sim_out = IntSim(integer)({integer.graph.input[0].name: x})[0]
    agree = float(np.mean(sim_out.argmax(1) == predict(integer, x).argmax(1)))
    console.print(f"  integer simulator vs onnxruntime on {len(x)} images: top-1 agreement {agree * 100:.1f}%")
    console.rule("6/6 eval and bench (onnxruntime CPU EP, 2 threads)")
    acc = {}
    for k, p in f.items():
        m = load_model(p)
        acc[k] = {split: qtool.evaluate(m, DATA, qtool.EvalConfig(split=split)).accuracy for split in ("val", "test")}
    rep = qtool.bench([str(f[k]) for k in TIMED], qtool.BenchConfig(batches=BATCHES, threads=2, warmup=10,
                                                                      runs=bench_runs, min_time_s=bench_min_time_s,
                                                                      progress=not quiet))
    wall = time.perf_counter() - t0

    results: dict = {"model": MODEL, "data": DATA, "batches": list(BATCHES), "cpu_int8_isa": cpu_int8_isa()}
    t = Table(title=f"qtool demo: {MODEL} on digits ({wall:.0f} s)")
    for col in ("model", "val top-1", "test top-1", "size (bytes)", *(f"median ms b{b}" for b in BATCHES),
                *(f"latency vs fp32 b{b}" for b in BATCHES)):
        t.add_column(col, justify="left" if col == "model" else "right")
    for k, p in f.items():
        rows = {b: rep.row(str(p), "cpu", b) for b in BATCHES} if k in TIMED else {}
        med = {b: rows[b].median_ms if b in rows and rows[b].ok else None for b in BATCHES}
        ratio = {b: rows[b].ratio if b in rows and rows[b].ok else None for b in BATCHES}
        size = p.stat().st_size
        t.add_row(k, f"{acc[k]['val'] * 100:.2f}%", f"{acc[k]['test'] * 100:.2f}%", str(size),
                  *(f"{med[b]:.3f}" if med[b] else "-" for b in BATCHES),
                  *(f"{ratio[b]:.2f}" if ratio[b] else "-" for b in BATCHES))
        results[k] = {"acc": acc[k]["val"], "test_acc": acc[k]["test"], "bytes": size,
                      **{f"median_ms_b{b}": med[b] for b in BATCHES}, **{f"ratio_b{b}": ratio[b] for b in BATCHES}}
    console.print(t)
    console.print("latency vs fp32 = median latency / FP32's median, same batch, measured interleaved in this run "
                  "(< 1 is faster).")
    for k in ("int8", "w4a4_qat", "qoperator", "integer"):
        r = results[k]
        speed = ", ".join(f"batch {b}: {speed_words(r[f'ratio_b{b}'])}" for b in BATCHES)
        dacc = (r["acc"] - results["fp32"]["acc"]) * 100, (r["test_acc"] - results["fp32"]["test_acc"]) * 100
        console.print(f"  {k} vs fp32: {speed}; top-1 {dacc[0]:+.2f} pp val, {dacc[1]:+.2f} pp test")
    (shape, fp32_bytes), (_, int8_bytes) = largest_weight(load_model(f["fp32"])), largest_weight(load_model(f["int8"]))
    console.print(f"The {'x'.join(map(str, shape))} FC weight is {fp32_bytes / 2**20:.1f} MiB in FP32 and "
                  f"{int8_bytes / 2**20:.1f} MiB in int8: reading it bounds batch 1. At batch 64 the layers are "
                  "compute-bound, where int8 gains only as far as the CPU's integer dot products outpace FP32 FMA "
                  f"(VNNI; this CPU: {results['cpu_int8_isa']}). See qtool/models/digitnet.py.")
    console.print(f"files in {wd}/; compare any two with `qtool bench {f['fp32']} {f['int8']} --batch 1,64`")
    results["intsim_agreement"] = agree
    results["wall_s"] = wall
    return results
