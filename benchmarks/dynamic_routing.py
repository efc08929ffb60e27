"""What the controllers of deployed dynamic runs earn by routing, and what routing could earn at most.

    python -m benchmarks.dynamic_routing NAME [NAME ...] [--threads 2]

For each results/NAME_run/ deployment (controller.onnx, configs/, manifest.json: written by
benchmarks.dynamic, also by runs cut short after deployment): every validation image (the whole val
split, 5,000 images) through the controller and through every configuration's QDQ model on onnxruntime
(CPU EP), then `qtool.dynbits.routing.routing_analysis`: the deployed routing's accuracy vs the same
choices shuffled across images, the oracle router at the same average BitFLOPs, and the best single
configuration. With results/NAME.json (a finished run) its static baseline is put beside them.
Writes results/dynamic_routing.json (one entry per NAME; entries of other names are kept).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from benchmarks.common import RESULTS, cifar_spec, write_result


def analyse(name: str, val, threads: int) -> dict:
    from qtool.dynbits.routing import correctness, routing_analysis
    from qtool.dynbits.runtime import DynamicSession
    from qtool.io import load_model
    from qtool.preprocess import resolve_preprocess

    run = RESULTS / f"{name}_run"
    sess = DynamicSession.load(run, threads=threads)
    man = json.loads((run / "manifest.json").read_text())
    x = resolve_preprocess(load_model(run / man["configs"][0]["file"])).apply(val.images)
    routed = np.concatenate([sess.route(x[i:i + 256]) for i in range(0, len(x), 256)])
    r = routing_analysis(correctness(sess, x, val.labels), sess.bitflops, routed)
    r["bits_per_config"] = [c["bits"] for c in man["configs"]]
    res = RESULTS / f"{name}.json"
    if res.exists():
        d = json.loads(res.read_text())
        r["static"] = d.get("static")
        r["dynamic_minus_static_matched_pp"] = d.get("dynamic_minus_static_matched_pp")
    else:
        r["static"] = None
        r["note"] = f"no {res.name}: the run was stopped after its deployment was written (no static baseline)"
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+", help="result names: results/NAME_run/ deployments")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    spec = cifar_spec()
    missing = [n for n in a.names if not (RESULTS / f"{n}_run" / "manifest.json").exists()]
    if spec is None or missing:
        print(f"needs the shared CIFAR-10 data and results/NAME_run/manifest.json for {', '.join(missing) or 'all'}",
              file=sys.stderr)
        return 2
    from qtool.data import load_dataset

    val = load_dataset(spec, "val")
    out = RESULTS / "dynamic_routing.json"
    runs = json.loads(out.read_text()).get("runs", {}) if out.exists() else {}
    for n in a.names:
        r = analyse(n, val, a.threads)
        runs[n] = r
        print(f"{n}: deployed {r['deployed']['acc'] * 100:.2f}% at {r['deployed']['avg_bitflops']:.4g} BitFLOPs; "
              f"shuffled {r['shuffled']['acc_mean'] * 100:.2f}% (routing gain {r['routing_gain_pp']:+.2f} pp); "
              f"oracle {r['oracle']['acc'] * 100:.2f}%; best single configuration "
              + (f"{r['best_single']['acc'] * 100:.2f}%" if r["best_single"] else "none within the budget"))
    print(f"wrote {write_result('dynamic_routing', {'runs': runs, 'val_images': len(val)})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
