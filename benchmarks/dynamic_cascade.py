"""Would a confidence cascade pay where the DQNet controller does not? (an analysis, not a qtool feature)

    python -m benchmarks.dynamic_cascade [--lo 4 --hi 5 --escalate 0.1,0.2,0.3 --train-limit 16000]

Per-image bit-widths without a learned controller: every image runs the uniform `lo`-bit model; the
images it is least sure of (max softmax below a threshold) run the uniform `hi`-bit model too, whose answer
counts. Average BitFLOPs per image = BF(lo) + f x BF(hi) for an escalated fraction f. The threshold for
each f is set on 5,000 training images outside the pool the models trained on, and applied unchanged to
the validation images.

Compared at equal average BitFLOPs with static QAT of the configuration closest to that cost
(`qtool.dynbits.train.matched_config`, widening layers in graph order, or in reverse order with
`--static-orders graph,reverse`, the best of them counting), trained with the same budget as
the lo / hi models (`train_static`: same initial network, images, learning rates and seed). All
accuracies are onnxruntime's on the 5,000 validation images. Writes results/dynamic_cascade.json.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np

from benchmarks.common import MODELS, cifar_spec, resnet20_cifar, write_result


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lo", type=int, default=4)
    ap.add_argument("--hi", type=int, default=5)
    ap.add_argument("--escalate", default="0.1,0.2,0.3", help="fractions of images sent on to the hi-bit model")
    ap.add_argument("--train-limit", type=int, default=16000)
    ap.add_argument("--threshold-images", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="data order and augmentation of every training")
    ap.add_argument("--name", default="dynamic_cascade", help="result name: results/NAME.json")
    ap.add_argument("--shared", action="store_true",
                    help="lo and hi from ONE network trained on both bit-widths (each step: the mean of the two "
                         "losses) instead of two static trainings; the static references get --static-epochs")
    ap.add_argument("--static-epochs", default="1",
                    help="comma list: epochs of the static references (2 = the shared net's forward/backward "
                         "passes); every one is reported, the best counts")
    ap.add_argument("--static-orders", default="graph",
                    help="comma list of graph|reverse: the order in which the static reference widens layers from "
                         "uniform lo to hi bits; each is trained, the best one is the comparison")
    a = ap.parse_args(argv)
    src, spec = MODELS / "resnet20_cifar10.onnx", cifar_spec()
    if spec is None or not src.exists():
        print(f"needs {src} and the shared CIFAR-10 data", file=sys.stderr)
        return 2
    import torch

    from qtool.dynbits import DynamicConfig
    from qtool.dynbits.train import _ort_logits, build_net, matched_config, train_static

    model, pre, train_data, val = resnet20_cifar(spec, a.threads)
    # every bit-width from lo to hi: the static reference may then use the ones between (uniform 4 is the
    # natural reference of a 3 -> 5 cascade)
    bits = tuple(range(a.lo, a.hi + 1))
    cfg = DynamicConfig(bits=bits, target=f"u{a.lo}", train_limit=a.train_limit, threads=a.threads, latency=False,
                        quiet=True, seed=a.seed)
    net, _, _ = build_net(model, train_data, cfg, pre)
    # threshold images: training images outside the pool the models train on (train() draws its pool
    # as the first train_limit of a seeded permutation)
    gen = torch.Generator().manual_seed(cfg.seed)
    unused = torch.randperm(len(train_data), generator=gen)[a.train_limit:].numpy()
    thr_data = train_data.subset(np.sort(unused[:a.threshold_images]))
    if a.shared:
        trained = _shared_pair(model, train_data, val, pre, cfg, a.lo, a.hi)
    else:
        trained = {}
        for b in (a.lo, a.hi):
            row, qdq = train_static(net, net.uniform(b), f"uniform{b}", train_data, val, pre, cfg, 0.0)
            trained[b] = ({k: row[k] for k in ("name", "bitflops", "acc_torch", "acc_ort")}, qdq)
    rows, logits = {}, {}
    for b, (row, qdq) in trained.items():
        rows[b] = row
        logits[b] = (_ort_logits(qdq, val, pre, a.threads), _ort_logits(qdq, thr_data, pre, a.threads))
        print(f"{'shared ' if a.shared else ''}uniform {b}: {row['acc_ort'] * 100:.2f}% at {row['bitflops']:.4g} "
              f"BitFLOPs", flush=True)
    bf_lo, bf_hi = rows[a.lo]["bitflops"], rows[a.hi]["bitflops"]
    conf_thr = _softmax(logits[a.lo][1]).max(1)
    conf_val = _softmax(logits[a.lo][0]).max(1)
    pred_lo, pred_hi = logits[a.lo][0].argmax(1), logits[a.hi][0].argmax(1)
    points = []
    for f in (float(x) for x in a.escalate.split(",")):
        tau = float(np.quantile(conf_thr, f))  # escalate images less sure than the f-quantile of threshold images
        esc = conf_val < tau
        acc = float((np.where(esc, pred_hi, pred_lo) == val.labels).mean())
        avg_bf = bf_lo + float(esc.mean()) * bf_hi
        statics = {}
        for order in a.static_orders.split(","):
            pref = {"graph": np.zeros(net.n_dynamic), "reverse": np.arange(net.n_dynamic, dtype=float)}[order]
            for ep in (int(e) for e in a.static_epochs.split(",")):
                row, _ = train_static(net, matched_config(net, avg_bf, pref), f"matched_{order}", train_data, val,
                                      pre, replace(cfg, epochs=ep), 0.0)
                key = order if ep == 1 else f"{order}_{ep}ep"
                statics[key] = {k: row[k] for k in ("bits", "bitflops", "acc_torch", "acc_ort")}
                print(f"  static {key}: {row['acc_ort'] * 100:.2f}% at {row['bitflops']:.4g}", flush=True)
        srow = max(statics.values(), key=lambda r: r["acc_ort"])
        diff = (acc - srow["acc_ort"]) * 100
        # the uniform lo / hi static points, linearly interpolated at the cascade's cost: a second reference
        curve = rows[a.lo]["acc_ort"] + (rows[a.hi]["acc_ort"] - rows[a.lo]["acc_ort"]) * (avg_bf - bf_lo) / (bf_hi - bf_lo)
        points.append({"escalate_target": f, "threshold": tau, "escalated_val": float(esc.mean()),
                       "cascade_acc_ort": acc, "cascade_avg_bitflops": avg_bf,
                       "static": srow, "static_by_order": statics,
                       "cascade_minus_static_pp": diff, "cascade_minus_uniform_curve_pp": (acc - curve) * 100})
        print(f"escalate {esc.mean() * 100:.1f}%: cascade {acc * 100:.2f}% at {avg_bf:.4g} BitFLOPs vs static "
              f"{srow['acc_ort'] * 100:.2f}% at {srow['bitflops']:.4g}: {diff:+.2f} pp (vs the uniform "
              f"{a.lo}/{a.hi} line {(acc - curve) * 100:+.2f} pp)", flush=True)
    payload = {"model": src.name, "data": spec, "lo": a.lo, "hi": a.hi, "seed": a.seed, "shared": a.shared,
               "static_epochs": a.static_epochs, "train_images": a.train_limit,
               "threshold_images": len(thr_data), "val_images": len(val), "uniform": rows, "points": points,
               "note": "cascade: lo-bit model on every image, hi-bit model on the least confident (threshold set "
                       "on unused training images); static: matched configuration at the cascade's average "
                       "BitFLOPs; every model static QAT with the same budget; accuracies on onnxruntime"}
    print(f"wrote {write_result(a.name, payload)}")
    return 0


def _shared_pair(model, train_data, val, pre, cfg, lo: int, hi: int) -> dict:
    """Uniform lo and hi bits of ONE network trained on both: a global-granularity DynamicNet whose
    controller stays at its zero logits (lr ~0, no penalty), so the expected-loss step weighs the two
    bit-widths 1/2 each at every step. Returns {bits: (row, QDQ model)}."""
    from qtool.dynbits.train import _ort_logits, build_net, evaluate, train
    from exporters.qdq import apply_plan

    scfg = replace(cfg, bits=(lo, hi), granularity="global", estimator="expected", alpha=0.0, controller_lr=1e-30)
    net, _, target = build_net(model, train_data, scfg, pre)
    net.set_mode("gumbel")
    train(net, train_data, pre, scfg, target, "shared", scfg.seed)
    out = {}
    for b in (lo, hi):
        c = net.uniform(b)
        net.set_mode("fixed", fixed=c)
        qdq = apply_plan(*net.export_config(c))
        acc_ort = float((_ort_logits(qdq, val, pre, cfg.threads).argmax(1) == val.labels).mean())
        out[b] = ({"name": f"shared{b}", "bitflops": net.config_bitflops(c), "acc_torch": evaluate(net, val, pre).acc,
                   "acc_ort": acc_ort}, qdq)
    return out


if __name__ == "__main__":
    sys.exit(main())
