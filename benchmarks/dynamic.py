"""Dynamic (DQNet) vs static QAT at equal average BitFLOPs on ResNet-20 / CIFAR-10, deployed on onnxruntime.

Reports (benchmarks/results/dynamic[_quick].json via benchmarks.common.write_result):
- val top-1 of the deployed dynamic model on onnxruntime and in PyTorch (fidelity: ORT - PyTorch, pp),
  its average BitFLOPs, and the static configuration closest to that average trained with the same
  budget (same epochs, images, learning rates, seed, initial weights): the accuracy difference in pp;
  with the full run also static QAT at every uniform bit-width;
- routing latency on ORT (CPU EP): controller + per-configuration QDQ models vs one static QDQ model,
  batch 1 and 64.

Model: benchmarks/models/resnet20_cifar10.onnx (benchmarks.train_resnet20); data: the shared CIFAR-10
split (QTOOL_CIFAR overrides the path). Usage: python -m benchmarks.dynamic [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.common import MODELS, RESULTS, cifar_spec, write_result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="2,000 training images, 1 epoch, 1,000 val images")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (full default 3)")
    ap.add_argument("--bits", default="3,4,5")
    ap.add_argument("--target", default="u4", help="BitFLOPs per sample or uB (uniform B bits)")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for evaluation and latency")
    args = ap.parse_args(argv)
    spec = cifar_spec()
    src = MODELS / "resnet20_cifar10.onnx"
    if spec is None or not src.exists():
        print(f"needs {src} (python -m benchmarks.train_resnet20) and the shared CIFAR-10 archive", file=sys.stderr)
        return 1
    import torch

    from qtool.data import load_dataset
    from qtool.dynamic import DynamicConfig, dynamic
    from qtool.io import load_model

    torch.set_num_threads(args.threads)
    quick = args.quick
    cfg = DynamicConfig(bits=tuple(int(b) for b in args.bits.split(",")), target=args.target, alpha=args.alpha,
                        epochs=args.epochs or (1 if quick else 3), train_limit=2000 if quick else None,
                        val_limit=1000 if quick else None, uniform_baselines=not quick,
                        latency_runs=20 if quick else 100, threads=args.threads)
    name = "dynamic_quick" if quick else "dynamic"
    out = RESULTS / f"{name}_run" if not quick else Path(tempfile.mkdtemp(prefix="qtool-dynamic-"))
    r = dynamic(load_model(src), load_dataset(spec, "train"), load_dataset(spec, "val"), cfg, out)
    for line in r.lines():
        print(line)
    rep = r.report
    d = rep["dynamic"]
    payload = {
        "model": str(src.name), "data": spec, "config": rep["config"], "output_dir": str(out),
        "dynamic": {k: d[k] for k in ("acc_torch", "acc_torch_argmax", "acc_ort", "ort_minus_torch_pp",
                                      "prediction_agreement", "config_agreement", "avg_bitflops", "bitflops_p10",
                                      "bitflops_median", "bitflops_p90", "mean_bits", "codebook_size",
                                      "codebook_coverage", "distinct_configs_argmax_train")},
        "static": [{k: s[k] for k in ("name", "bits", "bitflops", "acc_torch", "acc_ort")} for s in rep["static"]],
        "dynamic_minus_static_matched_pp": rep["acc_diff_pp"],
        "uniform_bitflops": rep["uniform_bitflops"], "target_bitflops": rep["target_bitflops"],
        "latency": rep.get("latency"), "training_cost": rep["training_cost"], "notes": rep["notes"],
        "wall_time_s": rep["wall_time_s"],
    }
    print(f"wrote {write_result(name, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
