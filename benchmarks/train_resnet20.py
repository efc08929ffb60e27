"""Train ResNet-20 FP32 on the shared CIFAR-10 train split (45k train / 5k val slice).

Writes benchmarks/models/resnet20_cifar10.onnx (BN kept, used by the PTQ/QAT benchmarks) and
benchmarks/results/train_resnet20.json (epochs, wall time, val accuracy of PyTorch and of the ONNX
export on onnxruntime).  Usage: python -m benchmarks.train_resnet20 [--epochs N] [--model NAME]
(e.g. --model vit_cifar: AdamW recipe, see RECIPES). A stopped run resumes from
benchmarks/models/NAME_cifar10.resume.pt when started again with the same arguments.
"""
from __future__ import annotations

import argparse
import sys

from benchmarks.common import MODELS, cifar_spec, write_result
from qtool.training import TrainConfig, train


# Per model: TrainConfig fields besides data and epochs, and the val top-1 the run should reach.
RECIPES = {
    "vit_cifar": ({"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "label_smoothing": 0.1, "warmup": 0.1}, 0.80),
}
DEFAULT = ({"lr": 0.2}, 0.85)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--model", default="resnet20")
    args = ap.parse_args(argv)
    spec = cifar_spec()
    if spec is None:
        print("shared CIFAR-10 data not found; nothing to do", file=sys.stderr)
        return 2
    MODELS.mkdir(exist_ok=True)
    recipe, target = RECIPES.get(args.model, DEFAULT)
    cfg = TrainConfig(model=args.model, data=spec, epochs=args.epochs, batch_size=128, threads=2, **recipe)
    r = train(cfg, MODELS / f"{args.model}_cifar10.onnx")
    gap_pp = abs(r.val_acc_torch - r.val_acc_onnx) * 100
    p = write_result(f"train_{args.model}", {
        "config": {k: v for k, v in cfg.__dict__.items() if k != "data"}, "data": "shared cifar10-train-jpg (45k/5k)",
        "epochs": r.epochs, "wall_time_s": round(r.wall_time_s, 1), "val_acc_torch": r.val_acc_torch,
        "val_acc_onnx": r.val_acc_onnx, "onnx_vs_torch_gap_pp": gap_pp,
        "target_val_acc": target, "meets_target": r.val_acc_onnx >= target and gap_pp <= 0.05, "history": r.history},
        table="train")
    print(f"val acc torch {r.val_acc_torch:.4f} onnx {r.val_acc_onnx:.4f} ({r.wall_time_s / 60:.1f} min) -> {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
