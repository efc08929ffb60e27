"""The static baseline of a dynamic run stopped after its deployment was written, trained here.

    python -m benchmarks.dynamic_static NAME --controller-layers 7 [--distill 0.5] [benchmarks.dynamic's options]

`benchmarks.gpu_batch` stops every job at its deadline; a dynamic run stopped after writing
results/NAME_run/ (controller.onnx, configs/, manifest.json) but before its static baseline has a
complete deployment and no comparison. This finishes it the way `qtool.dynbits.dynamic` would have:
the deployment routes every validation image on onnxruntime (its accuracy and average BitFLOPs), the
matched static configuration is derived from those choices (`matched_config`), and static QAT of that
configuration is trained from the same initial network (`build_net`: same calibration, seed, budget and
learning rates; the options must repeat the run's) on this machine's CPU. Writes results/NAME.json.
The dynamic net was trained on the GPU and the static one here: different float rounding in training,
the same protocol otherwise; both accuracies are onnxruntime's, on this CPU.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from benchmarks.common import MODELS, RESULTS, cifar_spec, resnet20_cifar, write_result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="results/NAME_run/ holds the deployment")
    ap.add_argument("--bits", default="3,4,5")
    ap.add_argument("--target", default="u4")
    ap.add_argument("--budget", choices=("batch", "sample"), default="batch")
    ap.add_argument("--controller-layers", type=int, default=1)
    ap.add_argument("--controller-conv", type=int, default=0)
    ap.add_argument("--distill", type=float, default=0.0)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=45000)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    run, src, spec = RESULTS / f"{a.name}_run", MODELS / "resnet20_cifar10.onnx", cifar_spec()
    if spec is None or not (run / "manifest.json").exists() or not src.exists():
        print(f"needs {run}/manifest.json, {src} and the shared CIFAR-10 data", file=sys.stderr)
        return 2
    from qtool.dynbits import DynamicConfig
    from qtool.dynbits.runtime import DynamicSession
    from qtool.dynbits.train import build_net, matched_config, teacher_for, train_static

    model, pre, train_data, val = resnet20_cifar(spec, a.threads)
    cfg = DynamicConfig(bits=tuple(int(b) for b in a.bits.split(",")), target=a.target, budget=a.budget,
                        controller_layers=a.controller_layers, controller_conv=a.controller_conv, distill=a.distill,
                        epochs=a.epochs, train_limit=a.train_limit, threads=a.threads, latency=False)
    sess = DynamicSession.load(run, threads=a.threads)
    man = json.loads((run / "manifest.json").read_text())
    logits, routed = [], []
    for i in range(0, len(val), 256):
        logits.append(sess.run(pre.apply(val.images[i:i + 256])))
        routed.append(sess.last_configs)
    logits, routed = np.concatenate(logits), np.concatenate(routed)
    choices = np.array([man["configs"][c]["choice"] for c in routed])
    acc_ort = float((logits.argmax(1) == val.labels).mean())
    avg_bf = float(sess.bitflops[routed].mean())

    net, fused, target = build_net(model, train_data, cfg, pre)
    if [e["bits"] for e in man["configs"]] != [net.config_bits(e["choice"]) for e in man["configs"]]:
        print(f"{run} was not trained with these options (its configurations' bits differ)", file=sys.stderr)
        return 2
    matched = matched_config(net, avg_bf, choices.mean(0))
    row, _ = train_static(net, matched, "matched", train_data, val, pre, cfg, target, teacher_for(fused, cfg))
    diff = (acc_ort - row["acc_ort"]) * 100
    print(f"{a.name}: dynamic (deployed, onnxruntime) {acc_ort * 100:.2f}% at {avg_bf:.4g} BitFLOPs; static matched "
          f"{row['acc_ort'] * 100:.2f}% at {row['bitflops']:.4g}: {diff:+.2f} pp")
    payload = {"model": src.name, "data": spec, "config": {**vars(a), "seed": cfg.seed, "lr": cfg.lr},
               "dynamic": {"acc_ort": acc_ort, "avg_bitflops": avg_bf, "codebook_size": len(man["configs"]),
                           "config_counts_val": np.bincount(routed, minlength=len(man["configs"])).tolist(),
                           "trained_on": "GPU (benchmarks.gpu_batch), stopped at its deadline after deployment"},
               "static": [{k: row[k] for k in ("name", "bits", "bitflops", "acc_torch", "acc_ort")}],
               "static_trained_on": "this CPU (benchmarks.dynamic_static)",
               "dynamic_minus_static_matched_pp": diff, "target_bitflops": target,
               "static_history": row["history"]}
    print(f"wrote {write_result(a.name, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
