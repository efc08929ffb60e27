"""Does the search's fine-tune help or hurt? Uniform configurations fine-tuned at several learning rates.

    python -m benchmarks.finetune_lr [--configs w8a8,w4a8,w4a4 --lrs 0,5e-4,1e-3,2e-3 --seeds 1 --workers 2]

The fine-tune of `benchmarks.search --stage finetune` (`QATEvaluator`: FP32 weights, fresh quantizers,
SGD + cosine, batch 128, `--steps` steps on the 45k training images, BN re-calibration, 5k val), at each
learning rate; lr 0 means no step at all (calibration + BN re-calibration only: post-training
quantization). Answers two questions behind #6's domination criterion: which rate keeps W8A8 where PTQ
puts it, and how close the cheapest plausible challenger of W8A8 (uniform W4A8, 0.5x BitOps) gets under
the same fine-tune. Writes results/finetune_lr.json.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from benchmarks.common import MODELS, cifar_spec, write_result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="w8a8,w4a8,w4a4", help="uniform (w, a) pairs of the 2/4/8 search space")
    ap.add_argument("--lrs", default="0,5e-4,1e-3,2e-3", help="learning rates; 0 = no fine-tune step")
    ap.add_argument("--steps", type=int, default=352, help="fine-tune steps (batch 128), as the search benchmark")
    ap.add_argument("--seeds", type=int, default=1, help="fine-tunes per cell (seeds 0 .. N-1)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--name", default="finetune_lr")
    a = ap.parse_args(argv)
    src, spec = MODELS / "resnet20_cifar10.onnx", cifar_spec()
    if spec is None or not src.exists():
        print(f"needs {src} and the shared CIFAR-10 data", file=sys.stderr)
        return 2
    from qtool.io import load_model
    from qtool.bitsearch import LocalExecutor, SearchData, SearchProblem
    from qtool.bitsearch.evaluators import QATEvaluator

    problem = SearchProblem.from_model(load_model(src), spec, objectives="acc,bitops", bits=(2, 4, 8),
                                       train_limit=1000, val_limit=1000)
    pairs = {u.key.split("-")[problem.space.searched[0]]: u for u in problem.space.uniform_pairs()}
    names = [c.strip().lower() for c in a.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in pairs]
    if unknown:
        print(f"--configs: {', '.join(unknown)} not uniform pairs of the space ({', '.join(sorted(pairs))})",
              file=sys.stderr)
        return 2
    data = SearchData.load(problem.fused, spec)
    cells = []
    for lr in (float(x) for x in a.lrs.split(",")):
        for seed in range(a.seeds if lr > 0 else 1):  # lr 0 takes no step: every seed gives the same model
            qat = QATEvaluator(steps=a.steps if lr > 0 else 0, batch_size=128, lr=lr if lr > 0 else 1.0)
            qat.prepare(problem.fused, problem.space, data, seed=seed)
            ex = LocalExecutor(a.workers)
            try:
                for c, acc in ex.run(qat, [pairs[n] for n in names]):
                    name = next(n for n in names if pairs[n].key == c.key)
                    cells.append({"config": name, "lr": lr, "seed": seed, "acc": float(acc)})
                    print(f"{name} lr {lr:g} seed {seed}: {acc * 100:.2f}%", flush=True)
            finally:
                ex.close()
    table = {n: {f"{lr:g}": float(np.mean([c["acc"] for c in cells if c["config"] == n and c["lr"] == lr]))
                 for lr in sorted({c["lr"] for c in cells})} for n in names}
    payload = {"model": src.name, "data": spec, "steps": a.steps, "batch_size": 128, "seeds": a.seeds,
               "val_images": int(len(data.val)), "cells": cells, "mean_acc": table,
               "note": "QATEvaluator fine-tune from the FP32 weights (the search benchmark's), per learning rate; "
                       "lr 0 = calibration + BN re-calibration only"}
    print(f"wrote {write_result(a.name, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
