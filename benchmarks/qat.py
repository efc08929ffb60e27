"""QAT benchmark: fidelity (fake-quant PyTorch vs onnxruntime on the written QDQ model) and accuracy.

Model: ResNet-20 trained on the shared CIFAR-10 train split (benchmarks/models/, made by
benchmarks.train_resnet20); val = the fixed 5k slice. Rows, each from the same FP32 model:
- FP32 on onnxruntime, and qtool PTQ W8A8 (default calibration, 512 images) for reference;
- QAT W8A8 (LSQ): accuracy drop vs FP32;
- QAT W4A4 (first conv and last FC at 8 bits) with LSQ, PACT and DoReFa: drop vs FP32.
Every QAT row reports fidelity: val accuracy of the fake-quant model and of onnxruntime on the
exported model (difference in pp, target <= 0.1), argmax agreement, and the largest logit
difference in quantization steps of the (quantized) output tensor.

Without the trained ResNet-20 or the shared data the script runs the same rows on LeNet-5 trained
for a few epochs on the embedded digits set, under a different key (a smoke run, not a result).

Usage: python -m benchmarks.qat [--quick] [--epochs N] [--train-limit N] [--algos lsq,pact,dorefa]
       python -m benchmarks.qat --model vit_cifar --rows w8a8,w4a8   # results/qat_vit_cifar.*
--model NAME: another model trained by benchmarks.train_resnet20 (benchmarks/models/NAME_cifar10.onnx);
--rows: instead of the W8A8 + W4A4 algorithm rows, PTQ (qtool quantize's defaults) and LSQ QAT started at
that PTQ plan (its bits, scales and zero points, as `qtool qat --plan`) at each of these bits, e.g. the ViT's
PTQ vs QAT comparison (--optimizer adam --lr 1e-4).
--quick: 2000 training images, 1 epoch, 1000 val images (about 10 minutes on 2 busy cores).
Default: 1 epoch over 10000 training images per row, full 5k val (about 45 minutes on 2 cores;
a fake-quant ResNet-20 step of 128 images takes several seconds there). More: --epochs/--train-limit.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx

from benchmarks.common import MODELS, cifar_spec, write_result
from qtool.cli import parse_bits
from qtool.data import calib_inputs, load_dataset
from qtool.evaluation import EvalConfig, evaluate_model
from qtool.io import load_model, save_model
from qtool.qat_config import plan_bits_of, plan_init_of
from qtool.qat_train import QATConfig, qat
from qtool.ptq import QuantConfig, quantize


def _lenet_digits() -> onnx.ModelProto:
    import tempfile

    from qtool.training import TrainConfig, train

    with tempfile.TemporaryDirectory() as d:
        train(TrainConfig(model="lenet5", data="digits", epochs=5, batch_size=64, lr=0.05), f"{d}/lenet.onnx",
              quiet=True)
        return load_model(f"{d}/lenet.onnx")


def _row(r, fp32_acc: float) -> dict:
    f = r.fidelity
    return {"acc_fakequant": f["acc_fakequant"], "acc_ort": f["acc_ort"], "fidelity_diff_pp": f["diff_pp"],
            "argmax_agreement": f["argmax_agreement"], "logit_max_diff_steps": f["logit_max_steps"],
            "logit_max_diff_abs": f["logit_max_abs"], "drop_pp_vs_fp32": (fp32_acc - f["acc_ort"]) * 100,
            "history": r.history, "wall_time_s": round(r.wall_time_s, 1), "device": r.device, "bn_fold": r.bn_fold,
            "notes": r.notes, "plan_counts": r.plan.summary_counts()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2000 train images, 1 epoch, 1000 val images")
    ap.add_argument("--epochs", type=int, default=1, help="QAT epochs per row")
    ap.add_argument("--train-limit", type=int, default=None, help="training images per epoch [quick 2000, else 10000]")
    ap.add_argument("--algos", default="lsq,pact,dorefa", help="W4A4 algorithms")
    ap.add_argument("--lr", default="0.01",
                    help="peak learning rate (cosine); with --rows also one per row, comma-separated")
    ap.add_argument("--loss", choices=("auto", "ce", "distill"), default="auto",
                    help="QAT loss: ce on the labels (auto), or distill: KL to the FP32 model's outputs")
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="QAT optimizer (the ViT: adam)")
    ap.add_argument("--model", default="resnet20", help="trained CIFAR-10 model (benchmarks/models/NAME_cifar10.onnx)")
    ap.add_argument("--rows", default=None, help="bits rows, e.g. w8a8,w4a8: PTQ and LSQ QAT at each")
    ap.add_argument("--name", default=None,
                    help="result file name [qat, qat_quick]; only the run named qat replaces benchmarks/models/*.qat_*")
    args = ap.parse_args(argv)
    lrs = [float(v) for v in str(args.lr).split(",")]
    epochs = args.epochs
    train_limit = args.train_limit or (2000 if args.quick else 10000)
    val_limit = 1000 if args.quick else None

    spec, src = cifar_spec(), MODELS / f"{args.model}_cifar10.onnx"
    if spec and src.exists():
        key, model = f"{args.model}_cifar10", load_model(src)
    else:
        print("trained ResNet-20 or shared CIFAR-10 absent: smoke run on LeNet-5 / digits", file=sys.stderr)
        key, spec, model = "lenet5_digits_smoke", "digits", _lenet_digits()
    train, val = load_dataset(spec, "train"), load_dataset(spec, "val")
    if val_limit and len(val) > val_limit:
        val = val.subset(np.arange(val_limit))
    t0 = time.perf_counter()
    fp32 = evaluate_model(model, spec, EvalConfig(limit=val_limit)).accuracy
    calib = list(calib_inputs(model, spec, n=512))
    ptq_model, ptq_plan = quantize(model, calib, QuantConfig())
    ptq = evaluate_model(ptq_model, spec, EvalConfig(limit=val_limit)).accuracy
    base = dict(epochs=epochs, train_limit=train_limit, batch_size=128, optimizer=args.optimizer, loss=args.loss)
    ptq_rows = {}
    if args.rows:
        rows = {}
        bits = [b.strip() for b in args.rows.split(",") if b.strip()]
        if len(lrs) not in (1, len(bits)):
            ap.error(f"--lr: one rate, or one per row ({len(bits)}), got {len(lrs)}")
        for b, lr in zip(bits, lrs * len(bits) if len(lrs) == 1 else lrs):
            wb, ab = parse_bits(b)
            if (wb, ab) == (8, 8):  # the default PTQ above
                acc, plan = ptq, ptq_plan
            else:
                q, plan = quantize(model, calib, QuantConfig(weight_bits=wb, act_bits=ab))
                acc = evaluate_model(q, spec, EvalConfig(limit=val_limit)).accuracy
            ptq_rows[f"ptq_{b}"] = {"acc_ort": acc, "drop_pp_vs_fp32": (fp32 - acc) * 100}
            # QAT starts at this PTQ plan (its bits, scales and zero points), as `qtool qat --plan` does
            rows[f"qat_{b}_lsq"] = QATConfig(plan_bits=plan_bits_of(plan), plan_init=plan_init_of(plan), algo="lsq",
                                             lr=lr, **base)
    else:
        if len(lrs) != 1:
            ap.error("--lr: one rate per row needs --rows")
        base["lr"] = lrs[0]
        rows = {"qat_w8a8_lsq": QATConfig(weight_bits=8, act_bits=8, algo="lsq", **base)}
        for algo in [a.strip() for a in args.algos.split(",") if a.strip()]:
            rows[f"qat_w4a4_{algo}"] = QATConfig(weight_bits=4, act_bits=4, first_last_bits=8, algo=algo, **base)
    results = {}
    for name, cfg in rows.items():
        print(f"== {name}", file=sys.stderr)
        r = qat(model, train, val, cfg)
        results[name] = _row(r, fp32) | {"lr": cfg.learning_rate}
        if key == "resnet20_cifar10" and not args.rows and not args.quick and args.name in (None, "qat"):  # the suite times these
            save_model(r.model, MODELS / f"{key}.{name}.onnx")
        print(f"{name}: fake-quant {r.fidelity['acc_fakequant']:.4f} ort {r.fidelity['acc_ort']:.4f} "
              f"(diff {r.fidelity['diff_pp']:+.2f} pp), drop vs fp32 {results[name]['drop_pp_vs_fp32']:+.2f} pp",
              file=sys.stderr)
    worst = max(abs(v["fidelity_diff_pp"]) for v in results.values())
    payload = {"settings": {"quick": args.quick, "model": args.model, "rows": args.rows, "epochs": epochs, "train_limit": train_limit,
                            "lr": lrs[0] if len(lrs) == 1 else args.lr,
                            "batch_size": 128, "optimizer": f"{args.optimizer} + cosine", "loss": args.loss, "val_images": len(val),
                            "activations": "uint8 asymmetric (PTQ placement)", "weights": "int per-channel symmetric",
                            "first_last_bits": 8, "qat_from": "ptq plan" if args.rows else "calibration"},
               key: {"fp32_acc": fp32, "ptq_w8a8_acc": ptq, "ptq_w8a8_drop_pp": (fp32 - ptq) * 100, **ptq_rows, **results,
                     "worst_fidelity_diff_pp": worst, "fidelity_target_pp": 0.1, "meets_fidelity_target": worst <= 0.1,
                     "wall_time_s": round(time.perf_counter() - t0, 1)}}
    name = args.name or ("qat_quick" if args.quick else "qat" if args.model == "resnet20" else f"qat_{args.model}")
    p = write_result(name if key != "lenet5_digits_smoke" else "qat_smoke", payload, table="qat")
    print(p.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
