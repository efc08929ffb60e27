"""The benchmark suite: FP32 vs onnxruntime's quantize_static vs qtool, side by side in one run.

Per model: the FP32 ONNX (BN kept, as a user would bring it), onnxruntime's own `quantize_static`
(QDQ, per-channel, U8S8, after its recommended quant_pre_process) and qtool's PTQ (W8A8, same
calibration images), plus qtool QAT models found in benchmarks/models/. Latency on the ORT CPU EP
with 2 intra-op threads, all variants of a model measured interleaved (qtool.latency), medians and
ratios. Accuracy rows for models trained on the shared CIFAR-10 split (val = the fixed 5k slice);
other models get random weights with realistic BN statistics and are timed only.

    python -m benchmarks run [--quick]     # writes benchmarks/results/suite[_quick].{json,md}
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks.baselines import ort_quantize_static
from benchmarks.common import MODELS, RESULTS, cifar_spec, write_result
from qtool.latency import BenchConfig, bench
from qtool.data import calib_inputs, load_dataset
from qtool.evaluation import EvalConfig, evaluate_model
from qtool.io import load_model
from qtool.ortgraph import integer_kernel_report
from qtool.ptq import QuantConfig, quantize

# name, zoo model, input size, batches (quick), batches (full)
MODEL_SET = [
    ("resnet20", "resnet20", 32, (1, 64), (1, 64)),
    ("resnet56", "resnet56", 32, (1, 64), (1, 64)),
    ("mobilenetv2", "mobilenetv2", 32, (1,), (1, 64)),
    ("resnet18_224", "resnet18", 224, (1,), (1,)),
]


def random_weights_model(zoo_name: str, size: int) -> onnx.ModelProto:
    import torch

    from qtool.models import build_model
    from qtool.preprocess import Preprocess
    from qtool.training import export_onnx

    torch.manual_seed(0)
    m = build_model(zoo_name).eval()
    with torch.no_grad():  # non-trivial BN statistics so folding has real work to do
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.3, 0.7)
    return export_onnx(m, (3, size, size), Preprocess(mean=(0.5,) * 3, std=(0.25,) * 3))


def random_calib(model: onnx.ModelProto, size: int, n: int, bs: int = 16) -> list[dict]:
    rng = np.random.default_rng(0)
    name = model.graph.input[0].name
    return [{name: rng.standard_normal((bs, 3, size, size)).astype(np.float32)} for _ in range(max(1, n // bs))]


def kernels(model: onnx.ModelProto) -> dict:
    r = integer_kernel_report(model)
    return {"integer_compute": r.integer_compute, "float_compute": r.float_compute,
            "float_fallbacks": r.float_fallbacks, "fallback_nodes": list(r.fallback_nodes)}


def bench_variants(variants: dict[str, onnx.ModelProto], batches, runs: int, min_time_s: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        paths = {k: Path(d) / f"{k}.onnx" for k in variants}
        for k, m in variants.items():
            onnx.save(m, paths[k])
        rep = bench([str(p) for p in paths.values()], BenchConfig(batches=tuple(batches), threads=2, warmup=10,
                                                                   runs=runs, min_time_s=min_time_s))
        out = {}
        for b in batches:
            rows = {k: rep.row(str(p), "cpu", b) for k, p in paths.items()}
            out[f"batch{b}"] = {k: {"median_ms": r.median_ms, "p90_ms": r.p90_ms, "p99_ms": r.p99_ms}
                                for k, r in rows.items()}
        return out


def run_model(key: str, zoo: str, size: int, batches, quick: bool, spec: str | None) -> dict:
    trained = MODELS / f"{zoo}_cifar10.onnx"
    use_cifar = spec is not None and trained.exists() and size == 32
    fp32 = load_model(trained) if use_cifar else random_weights_model(zoo, size)
    n_cal = 256 if quick else 512
    calib = list(calib_inputs(fp32, spec, n=n_cal, batch_size=64)) if use_cifar else random_calib(fp32, size, 64)
    t = time.perf_counter()
    q, _ = quantize(fp32, calib, QuantConfig())
    t_qtool = time.perf_counter() - t
    t = time.perf_counter()
    o = ort_quantize_static(fp32, calib)
    t_ort = time.perf_counter() - t
    variants = {"fp32": fp32, "ort_int8": o, "qtool_int8": q}
    for extra in sorted(MODELS.glob(f"{zoo}_cifar10.qat_*.onnx")) if use_cifar else []:
        variants["qtool_" + extra.stem.split(".")[-1]] = load_model(extra)
    res = {"weights": "trained on shared CIFAR-10" if use_cifar else "random (latency only)",
           "calibration_images": n_cal if use_cifar else 64, "quantize_seconds": {"qtool": t_qtool, "ort": t_ort},
           "kernels": {k: kernels(m) for k, m in variants.items() if k != "fp32"}}
    if use_cifar:
        limit = 1000 if quick else None
        res["top1"] = {k: evaluate_model(m, spec, EvalConfig(limit=limit)).accuracy for k, m in variants.items()}
        res["val_images"] = limit or len(load_dataset(spec, "val"))
        # every calibration method on the same images: the default (QuantConfig().calib) is the measured choice
        res["top1_by_calibration"] = {
            c: evaluate_model(quantize(fp32, calib, QuantConfig(calib=c))[0], spec, EvalConfig(limit=limit)).accuracy
            for c in ("minmax", "percentile", "entropy", "mse")}
        res["default_calibration"] = QuantConfig().calib
    runs = 20 if quick else 100
    res["latency"] = bench_variants(variants, batches, runs if size == 32 else max(10, runs // 2),
                                    1.0 if quick else 3.0)
    for b, rows in res["latency"].items():
        rows["ratios"] = {"qtool_over_ort": rows["qtool_int8"]["median_ms"] / rows["ort_int8"]["median_ms"],
                          "qtool_int8_over_fp32": rows["qtool_int8"]["median_ms"] / rows["fp32"]["median_ms"],
                          "ort_int8_over_fp32": rows["ort_int8"]["median_ms"] / rows["fp32"]["median_ms"]}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer runs, 1,000 val images, smaller model set batches")
    ap.add_argument("--models", default=",".join(m[0] for m in MODEL_SET), help="subset, comma-separated")
    args = ap.parse_args(argv)
    import onnxruntime

    wanted = args.models.split(",")
    unknown = set(wanted) - {m[0] for m in MODEL_SET}
    if unknown:
        print(f"unknown models: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    spec = cifar_spec()
    t0 = time.perf_counter()
    out = {"models": {}}
    for key, zoo, size, bq, bf in MODEL_SET:
        if key in wanted:
            print(f"[suite] {key} ...", file=sys.stderr, flush=True)
            out["models"][key] = run_model(key, zoo, size, bq if args.quick else bf, args.quick, spec)
    out["settings"] = {"quick": args.quick, "threads": 2, "onnxruntime": onnxruntime.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": time.perf_counter() - t0,
                       "cifar": spec is not None}
    name = "suite_quick" if args.quick else "suite"
    p = write_result(name, out, table="suite")
    print((RESULTS / f"{name}.md").read_text())
    print(f"wrote {p} and {RESULTS / (name + '.md')} in {out['settings']['wall_s']:.0f} s", file=sys.stderr)
    return 0
