"""W8A8 static PTQ of a trained transformer with and without SmoothQuant, side by side with onnxruntime's
`quantize_static` and NNCF's `quantize(model_type=TRANSFORMER)` (which runs NNCF's own SmoothQuant), on the
same calibration images.

    python -m benchmarks smoothquant [--quick] [--model vit_cifar_cifar10] [--alphas 0.25,0.5,0.75]
    # writes benchmarks/results/smoothquant[_quick].{json,md}

The model is benchmarks/models/MODEL.onnx (default the small ViT of `python -m benchmarks.train_resnet20
--model vit_cifar`), fused by `qtool fuse`; every tool gets that graph. 512 calibration images of the train
split (`qtool.data.calib_inputs`; onnxruntime reads them in batches of 64, NNCF takes all 512 as its subset).
Rows: FP32; qtool W8A8 with its defaults (mse calibration, per-channel weights); qtool `--smoothquant ALPHA`
for each alpha (the same defaults otherwise); onnxruntime `quantize_static` with its defaults (QDQ, per-tensor
weights, MinMax; `python -m benchmarks.zoo_ort`, a subprocess); NNCF 3.4 `quantize` with its defaults and
model_type transformer (benchmarks/nncf_driver.py --plain, run by the NNCF environment's interpreter). Top-1
on onnxruntime on the 5k val slice (--quick: 500), SQNR of the logits vs FP32 on the same images, latency
(median, batch 1, 2 threads, all models interleaved) and quantize wall time. Without the shared CIFAR-10
archive (or QTOOL_CIFAR) it prints why and exits 0 having written nothing.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks.common import MODELS, add_latency, cifar_spec, run_driver, timed, write_result
from qtool.api import quantize
from qtool.data import calib_inputs, model_image_input
from qtool.evaluation import compare_outputs, run_feeds
from qtool.feeds import feeds_for
from qtool.fusion import fuse
from qtool.io import load_model
from qtool.ptq import QuantConfig

NNCF_PYTHON = os.environ.get("QTOOL_NNCF_PYTHON", "/work/venvs/nncf/bin/python")
DRIVER = Path(__file__).resolve().parent / "nncf_driver.py"
N_CAL = 512
DEFAULT_MODEL = "vit_cifar_cifar10"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks smoothquant", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 500 val images, 50 latency runs")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a trained model in benchmarks/models (without .onnx)")
    ap.add_argument("--alphas", default="0.25,0.5,0.75", help="comma-separated SmoothQuant alphas in [0, 1]")
    ap.add_argument("--nncf-python", default=NNCF_PYTHON, help="interpreter of the environment with nncf")
    ap.add_argument("--runs", type=int, default=None, help="timed latency runs per model (default 200; quick 50)")
    args = ap.parse_args(argv)
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    path = MODELS / f"{args.model}.onnx"
    if not path.exists():
        print(f"smoothquant: no model {path} (train it with python -m benchmarks.train_resnet20 --model vit_cifar)",
              file=sys.stderr)
        return 2
    spec = cifar_spec()
    if spec is None:
        print("smoothquant: skipped, it needs the shared CIFAR-10 archive (or QTOOL_CIFAR)", file=sys.stderr)
        return 0
    result = ("smoothquant" if args.model == DEFAULT_MODEL else f"smoothquant_{args.model.removesuffix('_cifar10')}") \
        + ("_quick" if args.quick else "")
    t_all = time.perf_counter()
    fused = fuse(load_model(path))[0]
    calib = list(calib_inputs(fused, spec, n=N_CAL, batch_size=64))
    val = feeds_for(fused, spec, "val", limit=500 if args.quick else None)
    ref = next(iter(run_feeds(fused, val).values()))
    fp = float(np.mean(ref.argmax(1) == val.labels))
    out = {"model": args.model, "quick": args.quick, "calibration_images": N_CAL, "val_images": len(val),
           "fp32_top1": fp, "alphas": alphas, "nncf_available": Path(args.nncf_python).exists(), "rows": {}}
    models: dict[str, onnx.ModelProto] = {"FP32": fused}

    def record(tool: str, model: onnx.ModelProto, seconds: float, **extra) -> None:
        logits = next(iter(run_feeds(model, val).values()))
        t = float(np.mean(logits.argmax(1) == val.labels))
        m = compare_outputs(ref, logits)
        models[tool] = model
        out["rows"][tool] = {"top1": t, "drop_pp": (fp - t) * 100, "sqnr_db": float(m.sqnr_db),
                             "top1_agreement": m.top1_agreement, "seconds": seconds, **extra}
        print(f"[smoothquant] {tool}: top-1 {t * 100:.2f} % (FP32 {fp * 100:.2f}), SQNR {m.sqnr_db:.2f} dB, "
              f"{seconds:.1f} s", file=sys.stderr, flush=True)
        write_result(result, out, table="smoothquant")

    def failed(tool: str, error: list[str], **extra) -> None:
        out["rows"][tool] = {"error": error, **extra}
        print(f"[smoothquant] {tool}: failed: {error}", file=sys.stderr, flush=True)

    r, t = timed(lambda: quantize(fused, calib, QuantConfig()))
    record("qtool W8A8", r.model, t)
    for a in alphas:
        r, t = timed(lambda: quantize(fused, calib, QuantConfig(smoothquant=a)))
        record(f"qtool W8A8 --smoothquant {a:g}", r.model, t,
               smoothed=len(r.plan.meta["rescale"]["smoothquant"]["smoothed"]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src, cal = tmp / "fused.onnx", tmp / "calib.npz"
        onnx.save(fused, src)
        name = model_image_input(fused)[0]
        x_cal = np.concatenate([b[name] for b in calib])
        np.savez(cal, **{name: x_cal})
        dst = tmp / "ort.onnx"
        p, t = timed(lambda: subprocess.run([sys.executable, "-m", "benchmarks.zoo_ort", "static", str(src), str(dst),
                                             str(cal)], capture_output=True, text=True))
        if p.returncode == 0:
            record("ORT quantize_static (defaults)", onnx.load(dst), t)
        else:
            failed("ORT quantize_static (defaults)", (p.stderr or p.stdout).strip().splitlines()[-1:])
        if out["nncf_available"]:
            npz = tmp / "nncf_calib.npz"
            np.savez(npz, x=x_cal, input=np.array(name))
            q = tmp / "nncf.onnx"
            tool = "NNCF quantize(model_type=TRANSFORMER)"
            info, error, wall = run_driver([args.nncf_python, str(DRIVER), str(src), str(npz), "-", str(q), "--plain",
                                            "--model-type", "transformer", "--subset-size", str(N_CAL)])
            if info is None:
                failed(tool, error, wall_s_subprocess=wall)
            else:
                record(tool, onnx.load(q), info["seconds"], wall_s_subprocess=wall, nncf=info["nncf"])
    runs = args.runs or (50 if args.quick else 200)
    add_latency(out, models, next(val.batches(1)), runs)
    out["wall_s"] = time.perf_counter() - t_all
    write_result(result, out, table="smoothquant")
    return 0


if __name__ == "__main__":
    sys.exit(main())
