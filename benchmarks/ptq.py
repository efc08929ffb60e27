"""PTQ benchmark (issue 3): qtool W8A8 vs onnxruntime's quantize_static, same model, same images.

Accuracy: ResNet-20 trained on the shared CIFAR-10 train split (benchmarks/models/, made by
benchmarks.train_resnet20), val = the fixed 5k slice. Latency: ORT CPU EP, 2 threads, the three
models measured interleaved in one run (FP32, ORT INT8, qtool INT8) at batch 1 and 64, plus a
ResNet-18 224x224 (random weights, calibrated on random images: latency only).
Usage: python -m benchmarks.ptq [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from benchmarks.baselines import ort_quantize_static
from benchmarks.common import MODELS, cifar_spec, write_result
from qtool.bench import bench
from qtool.data import calib_inputs
from qtool.evaluate import evaluate_model
from qtool.io import load_model
from qtool.ortgraph import integer_kernel_report
from qtool.quantize import QuantConfig, quantize


def _random_model(name: str, size: int) -> onnx.ModelProto:
    import torch

    from qtool.models import build_model
    from qtool.preprocess import Preprocess
    from qtool.train import export_onnx

    torch.manual_seed(0)
    m = build_model(name).eval()
    with torch.no_grad():  # non-trivial BN statistics so folding has real work
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return export_onnx(m, (3, size, size), Preprocess(mean=(0.5,) * 3, std=(0.25,) * 3))


def _random_calib(model: onnx.ModelProto, size: int, n: int = 64, bs: int = 16):
    rng = np.random.default_rng(0)
    name = model.graph.input[0].name
    return [{name: rng.standard_normal((bs, 3, size, size)).astype(np.float32)} for _ in range(n // bs)]


def _kernels(model: onnx.ModelProto) -> dict:
    r = integer_kernel_report(model)
    return {"integer_compute": r.integer_compute, "float_fallbacks": r.float_fallbacks,
            "fallback_nodes": list(r.fallback_nodes)}


def _latency(models: dict[str, onnx.ModelProto], batches, runs: int, tmp: Path) -> dict:
    paths = {}
    for k, m in models.items():
        paths[k] = tmp / f"{k}.onnx"
        onnx.save(m, paths[k])
    rep = bench([str(p) for p in paths.values()], eps=("cpu",), batches=tuple(batches), threads=2, warmup=20,
                runs=runs, min_time_s=3.0)
    out = {}
    for b in batches:
        med = {k: rep.row(str(p), "cpu", b).median_ms for k, p in paths.items()}
        out[f"batch{b}"] = {"median_ms": med,
                            "qtool_over_ort": med["qtool_int8"] / med["ort_int8"],
                            "qtool_int8_over_fp32": med["qtool_int8"] / med["fp32"],
                            "ort_int8_over_fp32": med["ort_int8"] / med["fp32"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer timing runs and calibration images")
    args = ap.parse_args(argv)
    runs = 30 if args.quick else 200
    result = {"settings": {"threads": 2, "runs": runs, "quick": args.quick, "weights": "int8 per-channel symmetric",
                           "activations": "uint8 asymmetric (U8S8)", "calibration": "minmax"}}
    spec = cifar_spec()
    src = MODELS / "resnet20_cifar10.onnx"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if spec and src.exists():
            fp32 = load_model(src)
            n_cal = 256 if args.quick else 512
            calib = list(calib_inputs(fp32, spec, n=n_cal, batch_size=64))
            q, plan = quantize(fp32, calib, QuantConfig())
            o = ort_quantize_static(fp32, calib)
            limit = 1000 if args.quick else None
            acc = {k: evaluate_model(m, spec, "val", limit=limit).accuracy for k, m in
                   (("fp32", fp32), ("ort_int8", o), ("qtool_int8", q))}
            result["resnet20_cifar10"] = {
                "calibration_images": n_cal, "val_images": limit or 5000, "top1": acc,
                "qtool_drop_pp": (acc["fp32"] - acc["qtool_int8"]) * 100,
                "ort_drop_pp": (acc["fp32"] - acc["ort_int8"]) * 100,
                "kernels": {"qtool_int8": _kernels(q), "ort_int8": _kernels(o)},
                "latency": _latency({"fp32": fp32, "ort_int8": o, "qtool_int8": q}, (1, 64), runs, tmp)}
        else:
            print("trained ResNet-20 or shared CIFAR-10 absent: accuracy rows skipped", file=sys.stderr)
        fp32 = _random_model("resnet18", 224)
        calib = _random_calib(fp32, 224)
        q, _ = quantize(fp32, calib, QuantConfig())
        o = ort_quantize_static(fp32, calib)
        result["resnet18_224_random_weights"] = {
            "kernels": {"qtool_int8": _kernels(q), "ort_int8": _kernels(o)},
            "latency": _latency({"fp32": fp32, "ort_int8": o, "qtool_int8": q}, (1,), max(10, runs // 4), tmp)}
    p = write_result("ptq_quick" if args.quick else "ptq", result)
    print(p.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
