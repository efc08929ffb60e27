"""Routing latency of a deployed dynamic run, measured on THIS machine's CPU (onnxruntime CPU EP).

    python -m benchmarks.dynamic_latency NAME [--threads 2 --runs 100]

For runs trained elsewhere (`benchmarks.gpu_batch` trains on a borrowed GPU with --no-latency): reads
results/NAME_run/ (controller.onnx, configs/, static.onnx), measures the routed dynamic model, its
controller and the static QDQ model interleaved on the same validation images (`qtool.dynbits.runtime.latency`)
and writes the numbers into results/NAME.json under "latency", with this machine's description.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from benchmarks.common import RESULTS, cifar_spec, machine


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="result name: results/NAME.json and results/NAME_run/")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=100)
    a = ap.parse_args(argv)
    res, run = RESULTS / f"{a.name}.json", RESULTS / f"{a.name}_run"
    spec = cifar_spec()
    if not res.exists() or not (run / "manifest.json").exists() or not (run / "static.onnx").exists() or spec is None:
        print(f"needs {res}, {run}/manifest.json, {run}/static.onnx and the shared CIFAR-10 data", file=sys.stderr)
        return 2
    import onnx

    from qtool.data import load_dataset
    from qtool.dynbits.runtime import DynamicSession, latency
    from qtool.io import atomic_write_text
    from qtool.preprocess import resolve_preprocess

    val = load_dataset(spec, "val")
    static = onnx.load(str(run / "static.onnx"))
    x = resolve_preprocess(static).apply(val.images[np.arange(64)])
    lat = latency(DynamicSession.load(run, threads=a.threads), static, x, runs=a.runs, threads=a.threads)
    lat["note"] = ("dynamic = controller (with its own copy of the stem) + one QDQ model run per configuration "
                   "group in the batch; static = the matched static QDQ model; onnxruntime CPU EP")
    lat["machine"] = machine()
    d = json.loads(res.read_text())
    d["latency"] = lat
    atomic_write_text(res, json.dumps(d, indent=2, default=float) + "\n")
    for b in ("batch1", "batch64"):
        v = lat[b]
        print(f"{a.name} {b}: dynamic {v['dynamic_ms']:.3f} ms (controller {v['controller_ms']:.3f}) vs static "
              f"{v['static_ms']:.3f} ms (x{v['dynamic_over_static']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
