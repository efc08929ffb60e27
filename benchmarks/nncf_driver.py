"""NNCF side of benchmarks/accuracy_control.py and benchmarks/smoothquant.py, run by the interpreter of an
environment with nncf (3.4, ONNX backend, onnxruntime 1.32); imports nothing of qtool.

    python benchmarks/nncf_driver.py MODEL CALIB.npz VAL.npz OUT.onnx [--max-drop 0.005] [--subset-size 512]
    python benchmarks/nncf_driver.py MODEL CALIB.npz - OUT.onnx --plain [--model-type transformer]

MODEL is the BN-folded float model; CALIB holds the calibration images as `x` (named after the model's input
in `input`), VAL the validation images `x` and their `labels`. `nncf.quantize_with_accuracy_control` with its
defaults other than max_drop (absolute, on top-1 in [0, 1]) and subset_size (all calibration images): the
validation function returns top-1 on onnxruntime and each item's correctness (NNCF's per-item metric mode,
which its ranking uses). --model-type transformer: NNCF's model_type for transformers (its SmoothQuant,
alpha 0.95 on MatMuls, and its mixed preset). --plain: `nncf.quantize` instead (no validation data).
Writes the QDQ model and prints one JSON line: seconds, NNCF's version.
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
    ap.add_argument("val")
    ap.add_argument("output")
    ap.add_argument("--max-drop", type=float, default=0.005)
    ap.add_argument("--subset-size", type=int, default=512)
    ap.add_argument("--plain", action="store_true", help="nncf.quantize (no accuracy control)")
    ap.add_argument("--model-type", choices=("transformer",), default=None)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    import numpy as np
    import onnx
    import onnxruntime as ort
    import nncf
    t_import = time.perf_counter() - t0

    model = onnx.load(args.model)
    cal = np.load(args.calib)
    name, xc = str(cal["input"]), cal["x"]
    calib = nncf.Dataset([xc[i:i + 1] for i in range(len(xc))], lambda x: {name: x})
    subset = min(args.subset_size, len(xc))
    model_type = nncf.ModelType.TRANSFORMER if args.model_type == "transformer" else None
    if args.plain:
        t = time.perf_counter()
        q = nncf.quantize(model, calib, subset_size=subset, model_type=model_type)
        seconds = time.perf_counter() - t
        onnx.save(q, args.output)
        print(json.dumps({"seconds": seconds, "import_s": t_import, "nncf": nncf.__version__}))
        return 0
    val = np.load(args.val)
    xv, yv = val["x"], val["labels"]
    items = nncf.Dataset([(xv[i:i + 1], int(yv[i])) for i in range(len(xv))])
    calls = {"n": 0, "seconds": 0.0}

    def validate(m: onnx.ModelProto, data) -> tuple[float, list[float]]:
        t = time.perf_counter()
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        xs, ys = zip(*data)
        x, y = np.concatenate(xs), np.asarray(ys)
        pred = np.concatenate([sess.run(None, {name: x[i:i + 256]})[0].argmax(1) for i in range(0, len(x), 256)])
        ok = (pred == y).astype(np.float64)
        calls["n"] += 1
        calls["seconds"] += time.perf_counter() - t
        return float(ok.mean()), ok.tolist()

    t = time.perf_counter()
    q = nncf.quantize_with_accuracy_control(model, calib, items, validate, max_drop=args.max_drop,
                                            subset_size=subset, model_type=model_type)
    seconds = time.perf_counter() - t
    onnx.save(q, args.output)
    print(json.dumps({"seconds": seconds, "import_s": t_import, "validation_calls": calls["n"],
                      "validation_s": calls["seconds"], "nncf": nncf.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
