"""AIMET side of benchmarks/lowbit.py, run by the interpreter of an environment with aimet-onnx (and torch
pinned as the issue says: `pip install aimet-onnx torch==2.13.0 torchvision==0.28.0`); imports nothing of qtool.

    python benchmarks/aimet_driver.py MODEL CALIB.npz OUT.onnx --weight-bits 4 --act-bits 8 \\
        --scheme min_max|tf_enhanced [--adaround-iters 500 --adaround-samples 256]

MODEL is the BN-folded float model (aimet-onnx's QuantizationSimModel quantizes the graph as given); CALIB
holds the calibration images as one array `x` named after the model's input in `input`. AIMET's default
config (per-channel symmetric weights for Conv/Gemm, asymmetric activations, Conv+Relu supergroups); AdaRound
with AIMET's own defaults other than the iteration count, on the first `--adaround-samples` images in batches
of 32; encodings then computed on all calibration images. `--bits-8`: these tensors' quantizers at 8 bits
(set before AdaRound and the encodings). Writes the QDQ model (`sim.to_onnx_qdq()`) and
prints one JSON line: the seconds of each step.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("output")
    ap.add_argument("--weight-bits", type=int, default=4)
    ap.add_argument("--act-bits", type=int, default=8)
    ap.add_argument("--scheme", default="min_max", choices=["min_max", "tf_enhanced"])
    ap.add_argument("--adaround-iters", type=int, default=0, help="0: no AdaRound")
    ap.add_argument("--adaround-samples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bits-8", default="", help="comma-separated tensor names whose quantizers take 8 bits "
                    "(qtool's first/last-layer policy); a name AIMET does not quantize is reported, not an error")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    import numpy as np
    import onnx
    import aimet_onnx
    from aimet_onnx.quantsim import QuantizationSimModel
    t_import = time.perf_counter() - t0

    model = onnx.load(args.model)
    data = np.load(args.calib)
    name, x = str(data["input"]), data["x"]
    batches = [{name: x[i:i + args.batch]} for i in range(0, len(x), args.batch)]
    ada = [{name: x[i:i + args.batch]} for i in range(0, min(len(x), args.adaround_samples), args.batch)]
    types = {b: getattr(aimet_onnx, f"int{b}") for b in (2, 4, 8, 16)}
    times = {"import": t_import}
    t = time.perf_counter()
    sim = QuantizationSimModel(model, param_type=types[args.weight_bits], activation_type=types[args.act_bits],
                               quant_scheme=args.scheme, providers=["CPUExecutionProvider"])
    raised, absent = [], []
    for tensor in filter(None, args.bits_8.split(",")):
        q = sim.qc_quantize_op_dict.get(tensor)
        if q is None or not q.enabled:
            absent.append(tensor)
        else:
            q.set_bitwidth(8)
            raised.append(tensor)
    times["quantsim"] = time.perf_counter() - t
    if args.adaround_iters:
        t = time.perf_counter()
        aimet_onnx.apply_adaround(sim, ada, num_iterations=args.adaround_iters)
        times["adaround"] = time.perf_counter() - t
    t = time.perf_counter()
    sim.compute_encodings(batches)
    times["compute_encodings"] = time.perf_counter() - t
    t = time.perf_counter()
    onnx.save(sim.to_onnx_qdq(), args.output)
    times["export"] = time.perf_counter() - t
    times["total_excl_import"] = sum(v for k, v in times.items() if k != "import")
    print(json.dumps({"seconds": times, "aimet_onnx": aimet_onnx.__version__, "bits_8": raised,
                      "bits_8_not_quantized": absent}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
