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

Default run (25-30 minutes on 2 busy CPU cores; measured per step of 128 images with 1 thread at
load 3-6: dynamic 3.4-5.9 s, static 1.2-1.5 s, plus about 3.5 minutes of evaluation, codebook,
onnxruntime and latency): bits 3,4,5, target u4 (the BitFLOPs of uniform 4 bits), 16,000 training
images x 1 epoch (125 steps) for the dynamic net and for each static row (matched, uniform 3/4/5),
all 5,000 val images. Why this configuration:
- 3,4,5 around a u4 target is the honest middle: right after initialisation uniform 3/4/5 bits score
  47/84/87% (FP32 86%; 500 val images), so every option is usable and the controller faces a real
  trade-off. Uniform 2 bits starts at chance (10%) and this budget cannot repair it (the controller
  would just avoid it); 5 bits already match FP32, so 6-8 bits leave nothing to decide.
- the uniform rows give the static accuracy-vs-BitFLOPs curve, so the dynamic point can be read against
  it and not only against the one matched configuration (whose accuracy depends on which layers the
  greedy widens: +-1 pp between nearby configurations was measured);
- 5,000 val images: on 1,000-2,000 the dynamic - static difference moved by +-1 pp between settings
  that should not matter.
Learning rates are qtool.dynamic's defaults (network SGD 1e-3: the trained graph is BN-folded and
diverges at 1e-2; controller Adam 1e-2). --quick (2,000 images, 1 epoch, 1,000 val, no uniform rows,
a few minutes) is a smoke run, not a result.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.common import MODELS, RESULTS, cifar_spec, write_result


def _vs_uniform_curve(rep: dict) -> float | None:
    """Dynamic ORT accuracy minus the uniform static rows' accuracy interpolated (linearly in BitFLOPs)
    at the dynamic average; None without uniform rows or outside their BitFLOPs range."""
    pts = sorted((s["bitflops"], s["acc_ort"]) for s in rep["static"] if s["name"].startswith("uniform"))
    bf = rep["dynamic"]["avg_bitflops"]
    for (b0, a0), (b1, a1) in zip(pts, pts[1:]):
        if b0 <= bf <= b1:
            return (rep["dynamic"]["acc_ort"] - (a0 + (a1 - a0) * (bf - b0) / (b1 - b0))) * 100
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="2,000 training images, 1 epoch, 1,000 val images")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs")
    ap.add_argument("--train-limit", type=int, default=None, help="training images [quick 2000, else 16000]")
    ap.add_argument("--lr", type=float, default=None, help="network SGD learning rate [qtool.dynamic default]")
    ap.add_argument("--controller-lr", type=float, default=None, help="controller Adam learning rate [default]")
    ap.add_argument("--no-uniform", action="store_true", help="skip the uniform static rows (about 9 minutes)")
    ap.add_argument("--bits", default="3,4,5")
    ap.add_argument("--target", default="u4", help="BitFLOPs per sample or uB (uniform B bits)")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for evaluation and latency")
    ap.add_argument("--budget", choices=("batch", "sample"), default="batch",
                    help="the penalty's hinge on the batch-mean BitFLOPs or on every sample's")
    ap.add_argument("--device", default="cpu", help="torch device of training and PyTorch evaluation (cpu, cuda)")
    ap.add_argument("--controller-conv", type=int, default=0, help="channels of the controller's 3x3 conv (0: none)")
    ap.add_argument("--controller-layers", type=int, default=1,
                    help="the controller reads the input of quantizable layer N (the first N stay static)")
    ap.add_argument("--granularity", choices=("layer", "global"), default="layer",
                    help="bits chosen per layer, or one bit-width per image for every layer")
    ap.add_argument("--estimator", choices=("gumbel", "expected"), default="gumbel",
                    help="controller training: Gumbel samples, or the expected loss over every bit-width (global)")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="weight of the FP32 model's soft labels in the loss, dynamic and static alike (0: labels only)")
    ap.add_argument("--no-latency", action="store_true", help="skip the routing latency (e.g. on a borrowed machine)")
    ap.add_argument("--seed", type=int, default=0, help="initial controller, data order, augmentation")
    ap.add_argument("--name", default=None, help="result name: results/NAME.json and results/NAME_run/ [dynamic]")
    args = ap.parse_args(argv)
    spec = cifar_spec()
    src = MODELS / "resnet20_cifar10.onnx"
    if spec is None or not src.exists():
        print(f"needs {src} (python -m benchmarks.train_resnet20) and the shared CIFAR-10 archive", file=sys.stderr)
        return 1
    import torch

    from qtool.data import load_dataset
    from qtool.dynbits import DynamicConfig, dynamic
    from qtool.io import load_model

    torch.set_num_threads(args.threads)
    quick = args.quick
    lrs = {k: v for k, v in (("lr", args.lr), ("controller_lr", args.controller_lr)) if v is not None}
    cfg = DynamicConfig(bits=tuple(int(b) for b in args.bits.split(",")), target=args.target, alpha=args.alpha,
                        epochs=args.epochs, train_limit=args.train_limit or (2000 if quick else 16000),
                        val_limit=1000 if quick else None, uniform_baselines=not (quick or args.no_uniform),
                        latency_runs=20 if quick else 100, threads=args.threads, budget=args.budget,
                        device=args.device, latency=not args.no_latency, controller_conv=args.controller_conv,
                        controller_layers=args.controller_layers, granularity=args.granularity,
                        estimator=args.estimator, distill=args.distill, seed=args.seed, **lrs)
    name = args.name or ("dynamic_quick" if quick else "dynamic")
    out = RESULTS / f"{name}_run" if not quick else Path(tempfile.mkdtemp(prefix="qtool-dynamic-"))
    r = dynamic(load_model(src), load_dataset(spec, "train"), load_dataset(spec, "val"), cfg, out)
    for line in r.lines():
        print(line)
    rep = r.report
    curve = _vs_uniform_curve(rep)
    if curve is not None:
        print(f"dynamic - uniform static curve (interpolated at the dynamic average BitFLOPs): {curve:+.2f} pp")
    d = rep["dynamic"]
    payload = {
        "model": str(src.name), "data": spec, "config": rep["config"], "output_dir": str(out),
        "torch_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dynamic": {k: d[k] for k in ("acc_torch", "acc_torch_argmax", "acc_ort", "ort_minus_torch_pp",
                                      "prediction_agreement", "config_agreement", "avg_bitflops", "bitflops_p10",
                                      "bitflops_median", "bitflops_p90", "mean_bits", "codebook_size",
                                      "codebook_coverage", "distinct_configs_argmax_train",
                                      "acc_torch_shared_at_matched")},
        "routing": {k: v for k, v in rep["routing"].items() if k != "per_config"},
        "static": [{k: s[k] for k in ("name", "bits", "bitflops", "acc_torch", "acc_ort")} for s in rep["static"]],
        "dynamic_minus_static_matched_pp": rep["acc_diff_pp"],
        "dynamic_minus_uniform_curve_pp": _vs_uniform_curve(rep),
        "uniform_bitflops": rep["uniform_bitflops"], "target_bitflops": rep["target_bitflops"],
        "latency": rep.get("latency"), "training_cost": rep["training_cost"], "notes": rep["notes"],
        "wall_time_s": rep["wall_time_s"],
    }
    print(f"wrote {write_result(name, payload, table='dynamic')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
