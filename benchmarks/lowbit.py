"""Low-bit PTQ side by side: qtool (mse, AdaRound, AdaRound + bias correction; at W4A4 also BRECQ with learned
activation scales) vs AIMET (QuantSim min_max /
tf_enhanced, AdaRound) on the trained ResNet-20, W4A8 and W4A4, the same calibration images for every tool.

    python -m benchmarks lowbit [--quick] [--iters 500] [--model mobilenetv2_cifar10] [--aimet-python PY]
    # writes benchmarks/results/lowbit[_MODEL][_quick].{json,md}

The model is benchmarks/models/MODEL.onnx (default resnet20_cifar10, results/lowbit.*; another trained model,
e.g. `python -m benchmarks.train_resnet20 --model mobilenetv2`, writes results/lowbit_NAME.*), BN-folded by `qtool fuse` (both tools quantize that
graph: aimet-onnx's QuantizationSimModel quantizes the graph it is given). 512 calibration images of the
train split (`qtool.data.calib_inputs`); the AdaRound of both tools runs on the first 256 of them with the
same iteration count. Weights per-channel symmetric 4-bit (qtool: narrow range [-7, 7]), activations
asymmetric (uint8 / uint4; qtool's 4-bit activations are codes clipped to [0, 15] in uint8 containers).
Top-1 of every exported QDQ model on onnxruntime on the 5k val slice; wall time of each quantization in one
process (qtool) or measured inside the AIMET driver without its imports (benchmarks/aimet_driver.py, run by
the AIMET environment's interpreter as a subprocess; aimet-onnx 2.42, torch 2.13.0), on the same machine,
one after the other. The "adaround + bias correction" row is the AdaRound model of the row above followed
by qtool.biascorr, which is what `--algo adaround --bias-correction` runs; its time is the sum. The "--qdrop
0.5" row is AdaRound with QDrop (each element of a layer's input the FP32 model's with probability 0.5,
redrawn every step). At W4A4 the
rows marked "first/last layer 8-bit" keep the first Conv's weight and input and the last Gemm's weight, input
and output at 8 bits (`--first-last-bits 8`, the layout of `qtool qat --bits w4a4` and of the AdaRound / BRECQ
papers); AIMET's row sets the same tensors' quantizers to 8 bits. The last row of each bit-width gives qtool's
AdaRound the wall time AIMET's AdaRound took, as more iterations per layer (500 x AIMET's time / qtool's,
rounded to 100).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from benchmarks.common import MODELS, cifar_spec, run_driver, timed, write_result
from exporters.qdq import apply_plan
from qtool.biascorr import bias_correct
from qtool.data import calib_inputs, load_dataset, model_image_input
from qtool.evaluation import EvalConfig, evaluate_model
from qtool.fusion import fuse
from qtool.io import load_model
from qtool.ptq import QuantConfig, quantize_plan

AIMET_PYTHON = os.environ.get("QTOOL_AIMET_PYTHON", "/work/venvs/aimet/bin/python")
DRIVER = Path(__file__).resolve().parent / "aimet_driver.py"
BITS = {"W4A8": (4, 8), "W4A4": (4, 4)}
DEFAULT_MODEL = "resnet20_cifar10"
FIRST_LAST = ", first/last layer 8-bit"
QDROP = 0.5  # the QDrop paper's probability


def run_aimet(python: str, fused_path: Path, calib_path: Path, out: Path, w: int, a: int, scheme: str, iters: int,
              samples: int, bits_8: list[str] = ()) -> dict:
    cmd = [python, str(DRIVER), str(fused_path), str(calib_path), str(out), "--weight-bits", str(w),
           "--act-bits", str(a), "--scheme", scheme, "--adaround-iters", str(iters), "--adaround-samples", str(samples),
           "--bits-8", ",".join(bits_8)]
    info, error, wall = run_driver(cmd)
    if info is None:
        return {"error": error, "wall_s": wall}
    out = {"seconds": info["seconds"]["total_excl_import"], "steps_s": info["seconds"], "wall_s_subprocess": wall,
           "aimet_onnx": info["aimet_onnx"]}
    if bits_8:
        out["bits_8_not_quantized"] = info["bits_8_not_quantized"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks lowbit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 iterations, 500 val images")
    ap.add_argument("--iters", type=int, default=None, help="AdaRound iterations per layer, both tools (default 500)")
    ap.add_argument("--bits", default="W4A8,W4A4", help="comma-separated of W4A8, W4A4")
    ap.add_argument("--aimet-python", default=AIMET_PYTHON, help="interpreter of the environment with aimet-onnx")
    ap.add_argument("--brecq-iters", type=int, default=None,
                    help="qtool BRECQ iterations per block at W4A4 (default: --iters)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a trained model in benchmarks/models (without .onnx)")
    ap.add_argument("--no-match-time", dest="match_time", action="store_false",
                    help="skip the row of qtool AdaRound given AIMET AdaRound's wall time (more iterations)")
    args = ap.parse_args(argv)
    path = MODELS / f"{args.model}.onnx"
    if not path.exists():
        print(f"lowbit: no model {path} (train it with python -m benchmarks.train_resnet20 --model ...)", file=sys.stderr)
        return 2
    spec = cifar_spec()
    if spec is None:
        print("needs the shared CIFAR-10 archive (or QTOOL_CIFAR)", file=sys.stderr)
        return 2
    iters = args.iters or (20 if args.quick else 500)
    n_cal, n_ada, limit = 512, 256, (500 if args.quick else None)
    name = "lowbit" + ("" if args.model == DEFAULT_MODEL else f"_{args.model.removesuffix('_cifar10')}") \
        + ("_quick" if args.quick else "")
    fp32 = load_model(path)
    fused = fuse(fp32)[0]
    calib = list(calib_inputs(fp32, spec, n=n_cal, batch_size=64))
    ev = EvalConfig(limit=limit)
    out = {"model": args.model, "calibration_images": n_cal, "adaround_samples": n_ada,
           "adaround_iterations": iters, "brecq_iterations": args.brecq_iters or iters, "val_images": limit or len(load_dataset(spec, "val")),
           "fp32_top1": evaluate_model(fused, spec, ev).accuracy, "aimet_available": Path(args.aimet_python).exists(),
           "bits": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fused_path, calib_path = tmp / "fused.onnx", tmp / "calib.npz"
        onnx.save(fused, fused_path)
        input_name = model_image_input(fused)[0]
        np.savez(calib_path, x=np.concatenate([b[input_name] for b in calib]), input=np.array(input_name))
        for key in args.bits.split(","):
            w, a = BITS[key]
            rows = out["bits"][key] = {}

            def record(tool, model, seconds, **extra):
                rows[tool] = {"top1": evaluate_model(model, spec, ev).accuracy, "seconds": seconds, **extra}
                print(f"[lowbit] {key} {tool}: top-1 {rows[tool]['top1'] * 100:.2f} %, {seconds:.1f} s",
                      file=sys.stderr, flush=True)
                write_result(name, out, table="lowbit")

            base = QuantConfig(weight_bits=w, act_bits=a, calib="mse")
            (m, plan), t = timed(lambda: quantize_plan(fused, calib, base))
            record("qtool mse", apply_plan(m, plan), t)
            ada_cfg = QuantConfig(weight_bits=w, act_bits=a, calib="mse", algo="adaround", adaround_iters=iters,
                                  adaround_samples=n_ada)
            (tuned, plan), t_ada = timed(lambda: quantize_plan(fused, calib, ada_cfg))
            qdq, t_apply = timed(lambda: apply_plan(tuned, plan))
            record("qtool adaround", qdq, t_ada + t_apply, refine=plan.meta["refine"]["adaround"])
            (bc, rep), t_bc = timed(lambda: bias_correct(fused, tuned, plan, calib, samples=n_ada))
            qdq, t_apply = timed(lambda: apply_plan(bc, plan))
            record("qtool adaround + bias correction", qdq, t_ada + t_bc + t_apply)
            (tuned, plan), t_q = timed(lambda: quantize_plan(fused, calib, replace(ada_cfg, qdrop=QDROP)))
            qdq, t_apply = timed(lambda: apply_plan(tuned, plan))
            record(f"qtool adaround --qdrop {QDROP}", qdq, t_q + t_apply)
            edge = []  # W4A4: the tensors qtool's first/last policy keeps at 8 bits (as `qtool qat` does)
            if a < 8:  # block reconstruction that also learns the activation scales: what W4A4 needs
                brecq_cfg = replace(ada_cfg, algo="brecq", tune_activations=True, adaround_iters=args.brecq_iters or iters)
                for suffix, cfg in (("", brecq_cfg), (FIRST_LAST, replace(brecq_cfg, first_last_bits=8))):
                    (tuned, plan), t_b = timed(lambda: quantize_plan(fused, calib, cfg))
                    qdq, t_apply = timed(lambda: apply_plan(tuned, plan))
                    record("qtool brecq --tune-activations" + suffix, qdq, t_b + t_apply)
                    if suffix:
                        edge = [k for k, tq in plan.tensors.items() if tq.bits == 8]
                (tuned, plan), t_ada = timed(lambda: quantize_plan(fused, calib, replace(ada_cfg, first_last_bits=8)))
                qdq, t_apply = timed(lambda: apply_plan(tuned, plan))
                record("qtool adaround" + FIRST_LAST, qdq, t_ada + t_apply)
            if not out["aimet_available"]:
                continue
            aimet_rows = [("AIMET QuantSim min_max", "min_max", 0, []),
                          ("AIMET QuantSim tf_enhanced", "tf_enhanced", 0, []),
                          ("AIMET AdaRound (tf_enhanced)", "tf_enhanced", iters, [])]
            if edge:
                aimet_rows.append(("AIMET AdaRound (tf_enhanced)" + FIRST_LAST, "tf_enhanced", iters, edge))
            for tool, scheme, it, bits_8 in aimet_rows:
                q_path = tmp / f"aimet_{key}_{scheme}_{it}_{len(bits_8)}.onnx"
                res = run_aimet(args.aimet_python, fused_path, calib_path, q_path, w, a, scheme, it, n_ada, bits_8)
                if "error" in res:
                    rows[tool] = res
                    print(f"[lowbit] {key} {tool}: failed: {res['error']}", file=sys.stderr, flush=True)
                    write_result(name, out, table="lowbit")
                    continue
                record(tool, onnx.load(q_path), res.pop("seconds"), **res)
            aimet_ada = rows.get("AIMET AdaRound (tf_enhanced)", {})
            if "seconds" in aimet_ada and args.match_time:
                # The same wall time as AIMET's AdaRound, spent on more iterations per layer.
                n = max(iters, int(round(iters * aimet_ada["seconds"] / rows["qtool adaround"]["seconds"], -2)))
                (tuned, plan), t_m = timed(lambda: quantize_plan(fused, calib, replace(ada_cfg, adaround_iters=n)))
                qdq, t_apply = timed(lambda: apply_plan(tuned, plan))
                record(f"qtool adaround, {n} iterations (AIMET AdaRound's wall time)", qdq, t_m + t_apply,
                       iterations=n)
    write_result(name, out, table="lowbit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
