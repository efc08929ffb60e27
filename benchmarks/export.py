"""Export benchmark (issue: exporters): one PTQ plan of ResNet-20 -> QDQ, QOperator, integer-only.

- top-1 on onnxruntime (CPU EP) of each format vs the plan's QDQ model (val split of the shared
  CIFAR-10, qtool.evaluation.evaluate_model), and top-1 disagreements of each format with the QDQ model;
- qtool.intsim vs onnxruntime on the integer model: top-1 disagreements and max |logit| difference on
  1,000 val images (--quick: 200);
- file size of a W4A8 plan's QDQ model with packed INT4 weights vs int8 containers, and whether
  onnxruntime keeps integer kernels for the int4 graph (what `--int4-weights auto` decides);
- integer kernels vs float fallbacks (qtool.ortgraph) of every export.

Model: benchmarks/models/resnet20_cifar10.onnx (benchmarks.train_resnet20); absent, a random-init
ResNet-20 (sizes, kernels and intsim agreement still mean something; accuracies do not).
Usage: python -m benchmarks.export [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx

from benchmarks.common import MODELS, cifar_spec, write_result
from qtool.evaluation import EvalConfig, evaluate_model, predict
from qtool.exporting import ExportConfig, export_model
from qtool.intsim import IntSim
from qtool.io import load_model
from qtool.ptq import QuantConfig, quantize
from qtool.fusion import fuse


def _random_resnet20() -> onnx.ModelProto:
    import torch

    from qtool.models import build_model
    from qtool.preprocess import Preprocess
    from qtool.training import export_onnx

    torch.manual_seed(0)
    m = build_model("resnet20").eval()
    with torch.no_grad():  # distinct folded biases, as in a trained model
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    from qtool.data import CIFAR_MEAN, CIFAR_STD

    return export_onnx(m, (3, 32, 32), Preprocess(mean=CIFAR_MEAN, std=CIFAR_STD))


def _images(model: onnx.ModelProto, spec: str | None, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """n val images spread over the whole split (its order may follow the classes) and labels."""
    if spec is None:
        return np.random.default_rng(0).normal(size=(n, 3, 32, 32)).astype(np.float32), None
    from qtool.data import batches, load_dataset
    from qtool.preprocess import resolve_preprocess

    ds = load_dataset(spec, "val")
    ds = ds.subset(np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).astype(int)))
    xs, ys = zip(*batches(ds, 250, resolve_preprocess(model)))
    return np.concatenate(xs), np.concatenate(ys)


def _report(r) -> dict:
    d = r.report.to_dict()
    d.pop("ops", None)
    return d


def _qat_exports(fp32, spec: str, quick: bool) -> dict:
    """Plans from the QAT issue (short LSQ QAT, W8A8 and W4A4 with 8-bit first/last layer) exported in
    every format; each format's ORT accuracy vs the fake-quant accuracy the QAT run reported."""
    from qtool.data import load_dataset
    from qtool.qat_train import QATConfig, qat

    train, val = load_dataset(spec, "train"), load_dataset(spec, "val")
    if quick:
        val = val.subset(np.arange(1000))
    out = {}
    for name, (wb, ab) in {"w8a8_lsq": (8, 8), "w4a4_lsq": (4, 4)}.items():
        cfg = QATConfig(weight_bits=wb, act_bits=ab, algo="lsq", epochs=1, train_limit=500 if quick else 2000,
                        batch_size=128, lr=0.002 if wb == 8 else 0.01, quiet=True)
        r = qat(fp32, train, val, cfg)
        row = {"config": f"LSQ W{wb}A{ab}, 1 epoch x {cfg.train_limit} images", "val_images": len(val),
               "acc_fakequant": r.fidelity["acc_fakequant"]}
        for fmt in ("qdq", "qoperator", "integer"):
            e = export_model(r.fused, r.plan, ExportConfig(format=fmt))
            acc = evaluate_model(e.model, spec, EvalConfig(limit=len(val))).accuracy  # the same images QAT scored
            row[fmt] = {"acc_ort": acc, "diff_vs_fakequant_pp": (acc - row["acc_fakequant"]) * 100,
                        "float_fallbacks": e.report.float_fallbacks, "size_bytes": e.report.size_bytes}
        out[name] = row
        print(f"qat {name}: " + ", ".join(f"{f} {row[f]['diff_vs_fakequant_pp']:+.2f} pp"
                                         for f in ("qdq", "qoperator", "integer")), file=sys.stderr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer calibration / val / intsim images")
    args = ap.parse_args(argv)
    spec = cifar_spec()
    src = MODELS / "resnet20_cifar10.onnx"
    trained = src.exists()
    fp32 = load_model(src) if trained else _random_resnet20()
    if not trained:
        print(f"{src} absent: random-init ResNet-20 (accuracies are meaningless)", file=sys.stderr)
    fused, _ = fuse(fp32)
    n_cal, n_sim = (128, 200) if args.quick else (512, 1000)
    if spec:
        from qtool.data import calib_inputs

        calib = list(calib_inputs(fused, spec, n=n_cal, batch_size=64))
    else:
        print("shared CIFAR-10 absent: random calibration / test images, no accuracy", file=sys.stderr)
        r = np.random.default_rng(0)
        calib = [{fused.graph.input[0].name: r.normal(size=(64, 3, 32, 32)).astype(np.float32)}
                 for _ in range(n_cal // 64)]
    result: dict = {"settings": {"quick": args.quick, "trained_model": trained, "data": spec,
                                 "calibration_images": n_cal, "intsim_images": n_sim,
                                 "val_images": "1000 spread over val" if args.quick else "all 5000 of val",
                                 "plan": f"W8A8 PTQ {QuantConfig().calib}, int8 per-channel weights, uint8 activations"}}
    qdq, plan = quantize(fused, calib, QuantConfig())
    exports, timing = {}, {}
    for fmt in ("qdq", "qoperator", "integer"):
        t = time.perf_counter()
        exports[fmt] = export_model(fused, plan, ExportConfig(format=fmt))
        timing[fmt] = time.perf_counter() - t
    result["w8a8"] = {fmt: {**_report(r), "export_s": timing[fmt]} for fmt, r in exports.items()}

    x, _ = _images(fused, spec, n_sim)
    ref = predict(qdq, x)
    agree = {fmt: int(np.sum(predict(r.model, x).argmax(1) != ref.argmax(1))) for fmt, r in exports.items()}
    t = time.perf_counter()
    sim = IntSim(exports["integer"].model)
    name = fused.graph.input[0].name
    sim_out = np.concatenate([sim({name: x[i:i + 100]})[0] for i in range(0, len(x), 100)])
    sim_s = time.perf_counter() - t
    ort_int = predict(exports["integer"].model, x)
    result["intsim_vs_ort"] = {"images": len(x), "top1_disagreements": int(np.sum(sim_out.argmax(1) != ort_int.argmax(1))),
                               "logits_not_bit_equal": int(np.sum(sim_out != ort_int)),
                               "max_abs_logit_diff": float(np.max(np.abs(sim_out - ort_int))), "intsim_s": sim_s}
    result["top1_disagreements_vs_qdq"] = {"images": len(x), **agree}
    step = plan.tensors[fused.graph.output[0].name].scale
    result["max_logit_diff_vs_qdq_steps"] = {fmt: float(np.max(np.abs(predict(r.model, x) - ref)) / step)
                                            for fmt, r in exports.items()}
    if spec:
        models = {"fp32": fp32, "qdq_plan": qdq, **{fmt: r.model for fmt, r in exports.items()}}
        if args.quick:
            xv, yv = _images(fused, spec, 1000)
            acc = {k: float(np.mean(predict(m, xv).argmax(1) == yv)) for k, m in models.items()}
        else:
            acc = {k: evaluate_model(m, spec).accuracy for k, m in models.items()}
        result["top1"] = acc
        result["top1_diff_vs_plan_qdq_pp"] = {k: (v - acc["qdq_plan"]) * 100 for k, v in acc.items() if k != "fp32"}

    if spec and trained:
        result["qat"] = _qat_exports(fp32, spec, args.quick)

    _, plan4 = quantize(fused, calib, QuantConfig(weight_bits=4))
    sizes = {m: export_model(fused, plan4, ExportConfig(format="qdq", int4=m)) for m in ("off", "on", "auto")}
    result["w4a8_int4_weights"] = {
        "int8_container_bytes": sizes["off"].report.size_bytes, "int4_packed_bytes": sizes["on"].report.size_bytes,
        "ratio": sizes["off"].report.size_bytes / sizes["on"].report.size_bytes,
        "int8_container_kernels": {k: _report(sizes["off"])[k] for k in ("integer_compute", "float_fallbacks")},
        "int4_packed_kernels": {k: _report(sizes["on"])[k] for k in ("integer_compute", "float_fallbacks")},
        "auto_packed": sizes["auto"].report.int4_weights > 0, "auto_notes": sizes["auto"].report.notes}
    p = write_result("export_quick" if args.quick else "export", result, table="export")
    print(p.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
