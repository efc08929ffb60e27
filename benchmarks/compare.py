"""Compare two sets of benchmark results (e.g. before and after a change, or two machines).

    python -m benchmarks.compare OLD_DIR NEW_DIR [--names suite_quick,qat_quick,...] [--json OUT]

Every numeric leaf that both JSONs hold is paired by its path. Accuracies, counts and sizes must agree
exactly (they are deterministic on one machine); timings (keys with `ms`, `_s`, `seconds`, `time` or
`throughput` in the path, and the latency ratios) are compared as a relative change and only reported,
since shared machines are noisy. The printout lists what differs; `--json` writes the whole comparison.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

TIMING = re.compile(r"(ms|_s$|_s_|seconds|time|throughput|ratio|latency|elapsed|wall|date|speed)", re.I)
NAMES = ("suite_quick", "qat_quick", "export_quick", "dynamic_quick", "search_quick")


def leaves(d, path=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from leaves(v, f"{path}/{k}")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from leaves(v, f"{path}[{i}]")
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        yield path, float(d)


def compare(old: dict, new: dict) -> dict:
    a, b = dict(leaves(old)), dict(leaves(new))
    exact_diff, timing = [], []
    for k in sorted(a.keys() & b.keys()):
        x, y = a[k], b[k]
        if TIMING.search(k):
            if x and math.isfinite(x) and math.isfinite(y):
                timing.append((k, x, y, y / x))
        elif not (x == y or (math.isnan(x) and math.isnan(y))):
            exact_diff.append((k, x, y))
    ratios = [r for *_, r in timing if r > 0]
    return {"paired": len(a.keys() & b.keys()), "only_old": len(a.keys() - b.keys()), "only_new": len(b.keys() - a.keys()),
            "exact_differences": [{"path": k, "old": x, "new": y} for k, x, y in exact_diff],
            "timing_geomean_new_over_old": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None,
            "timings": [{"path": k, "old": x, "new": y, "ratio": r} for k, x, y, r in timing]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--names", default=",".join(NAMES), help="result names (NAME.json in both folders)")
    ap.add_argument("--json", type=Path, default=None, help="write the comparison here")
    a = ap.parse_args(argv)
    out, bad = {}, 0
    for name in a.names.split(","):
        po, pn = a.old / f"{name}.json", a.new / f"{name}.json"
        if not (po.exists() and pn.exists()):
            print(f"{name}: missing in {'old' if not po.exists() else 'new'}", file=sys.stderr)
            continue
        c = compare(json.loads(po.read_text()), json.loads(pn.read_text()))
        out[name] = c
        g = c["timing_geomean_new_over_old"]
        print(f"{name}: {c['paired']} values paired ({c['only_old']} only old, {c['only_new']} only new); "
              f"{len(c['exact_differences'])} non-timing values differ; timings new/old geomean "
              + (f"{g:.2f}" if g else "-"))
        for d in c["exact_differences"][:10]:
            print(f"  {d['path']}: {d['old']:.6g} -> {d['new']:.6g}")
        bad += len(c["exact_differences"])
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
