"""Calibration side by side: qtool vs onnxruntime's quantize_static, per method, on the same model and images.

The trained ResNet-20 (benchmarks/models/resnet20_cifar10.onnx) at W8A8 (U8S8, per-channel int8 weights),
the same calibration images for both tools (`qtool.data.calib_inputs`), top-1 on onnxruntime on the val
slice, and the quantize wall time: best of --repeats, qtool and onnxruntime interleaved so that the load of
a shared machine hits both alike. onnxruntime has no mse method; its entropy is its EntropyCalibrater with
the defaults quantize_static uses (128 histogram bins). Also where qtool's time goes: fuse, the calibration
run (inference + statistics), the range search, Q/DQ insertion.

Each quantized model is also evaluated with onnxruntime's graph optimizations off ("float kernels"): the
Q/DQ pairs then run as written around float Conv/Gemm, which is what the calibration itself achieves. On a
CPU without AVX-512 VNNI onnxruntime's U8S8 integer kernels saturate int16 pair sums (VPMADDUBSW), so the
deployed top-1 there loses about 2 pp for every tool; the float-kernel column is free of that.

    python -m benchmarks.calibration [--quick]   # writes benchmarks/results/calibration[_quick].{json,md}
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time

import numpy as np
from onnxruntime.quantization import CalibrationMethod

import passes
from benchmarks.baselines import ort_quantize_static
from benchmarks.common import MODELS, RESULTS, cifar_spec, timed, write_result
from exporters.qdq import apply_plan
from qtool.calibrate import collect_stats
from qtool.data import batches, calib_inputs, load_dataset, model_image_input
from qtool.evaluation import EvalConfig, evaluate_model, make_session
from qtool.fusion import fuse
from qtool.io import load_model
from qtool.ptq import QuantConfig, build_plan, quantize

METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
           "entropy": CalibrationMethod.Entropy, "mse": None}


def ort_quiet(fp32, calib, method):
    with contextlib.redirect_stdout(io.StringIO()):  # its histogram calibraters print progress lines
        return ort_quantize_static(fp32, calib, method=method)


def top1_float_kernels(model, spec: str, limit: int | None) -> float:
    """Top-1 with graph optimizations off: Q/DQ as written around float kernels (no integer Conv)."""
    from qtool.preprocess import resolve_preprocess

    ds = load_dataset(spec, "val")
    if limit:
        ds = ds.subset(np.arange(min(limit, len(ds))))
    sess = make_session(model, optimize=False)
    name = model_image_input(model)[0]
    correct = sum(int((sess.run(None, {name: x})[0].argmax(1) == y).sum())
                  for x, y in batches(ds, 256, resolve_preprocess(model)))
    return correct / len(ds)


def qtool_phases(fp32, calib, calib_method: str) -> dict:
    """quantize()'s steps one by one (the same public calls), each timed."""
    config = QuantConfig(calib=calib_method)
    fused, t_fuse = timed(lambda: fuse(fp32)[0])
    marks = passes.mark_tensors(passes.to_ir(fused).graph)
    roots = list(dict.fromkeys(marks.root(a) for a in marks.activations()))
    _, t_infer = timed(lambda: collect_stats(fused, calib, roots, histograms=False))
    stats, t_cal = timed(lambda: collect_stats(fused, calib, roots, histograms=calib_method != "minmax"))
    plan, t_plan = timed(lambda: build_plan(fused, config, stats))
    _, t_qdq = timed(lambda: apply_plan(fused, plan))
    return {"method": calib_method, "fuse": t_fuse, "calibration_run": t_cal,
            "of_which_inference_and_minmax": t_infer, "plan_incl_range_search": t_plan, "insert_qdq": t_qdq}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.calibration", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 calibration images, 1,000 val images, one repeat")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per tool and method (default 3, quick 1)")
    args = ap.parse_args(argv)
    spec = cifar_spec()
    if spec is None:
        print("needs the shared CIFAR-10 archive (or QTOOL_CIFAR)", file=sys.stderr)
        return 2
    repeats = args.repeats or (1 if args.quick else 3)
    n_cal, limit = (256, 1000) if args.quick else (512, None)
    t0 = time.perf_counter()
    fp32 = load_model(MODELS / "resnet20_cifar10.onnx")
    calib = list(calib_inputs(fp32, spec, n=n_cal, batch_size=64))
    ev = EvalConfig(limit=limit)
    out = {"model": "resnet20_cifar10", "calibration_images": n_cal,
           "val_images": limit or len(load_dataset(spec, "val")), "repeats": repeats,
           "fp32_top1": evaluate_model(fp32, spec, ev).accuracy, "methods": {}}
    times = {m: {"qtool": [], "ort": []} for m in METHODS}
    models = {}
    for _ in range(repeats):
        for m, ort_method in METHODS.items():
            print(f"[calibration] {m} ...", file=sys.stderr, flush=True)
            (models[m, "qtool"], _), t = timed(lambda: quantize(fp32, calib, QuantConfig(calib=m)))
            times[m]["qtool"].append(t)
            if ort_method is not None:
                models[m, "ort"], t = timed(lambda: ort_quiet(fp32, calib, ort_method))
                times[m]["ort"].append(t)
    for m in METHODS:
        row = {}
        for tool in ("qtool", "ort"):
            if (m, tool) in models:
                row[tool] = {"top1": evaluate_model(models[m, tool], spec, ev).accuracy,
                             "top1_float_kernels": top1_float_kernels(models[m, tool], spec, limit),
                             "seconds": min(times[m][tool]), "seconds_all": times[m][tool]}
            else:
                row[tool] = None
        if row["ort"]:
            row["qtool_over_ort_time"] = row["qtool"]["seconds"] / row["ort"]["seconds"]
        out["methods"][m] = row
    # qtool's default (mse) against onnxruntime's default (MinMax): what a user gets from each out of the box
    out["default_vs_default_time"] = out["methods"][QuantConfig().calib]["qtool"]["seconds"] / \
        out["methods"]["minmax"]["ort"]["seconds"]
    out["qtool_phases_s"] = [qtool_phases(fp32, calib, m) for m in ("mse", "entropy")]
    import onnxruntime

    out["settings"] = {"quick": args.quick, "onnxruntime": onnxruntime.__version__,
                       "wall_s": time.perf_counter() - t0}
    name = "calibration_quick" if args.quick else "calibration"
    p = write_result(name, out, table="calibration")
    print((RESULTS / f"{name}.md").read_text())
    print(f"wrote {p} in {out['settings']['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
