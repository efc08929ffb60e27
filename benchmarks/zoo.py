"""The model zoo: qtool's CLI vs onnxruntime's quantization tools on the models users bring.

    python -m benchmarks zoo [--quick] [--models a,b] [--workdir DIR]   # results/zoo[_quick].{json,md}

Models (benchmarks.zoo_models): 12 architectures built in code from transformers config objects
(random weights, BatchNorm statistics re-estimated on the benchmark's images): ResNet, ConvNeXt,
MobileNetV2, EfficientNet, RegNetY, ViT, Swin, BERT, DistilBERT, Wav2Vec2, DETR (transformers-native
ResNet backbone), SegFormer; and trained third-party ONNX files shipped inside PyPI wheels (PP-OCRv4
detector / recognizer and the PP-OCR direction classifier of rapidocr-onnxruntime 1.4.4, the YOLOv8n
detector of nudenet 3.4.2), fetched once with `pip download --no-deps` into ~/.cache/qtool/zoo
(QTOOL_ZOO_CACHE overrides it; never into the repository). Their symbolic H / W are fixed to one size
(`zoo_models.fix_dims`), which `qtool bench` needs.

Per model, as a user would run it (the CLI in subprocesses, exit codes recorded; data as npz keyed by
input name, calibration and held-out test samples disjoint):

    qtool fuse FP32 -o fused;  qtool quantize fused --data npz:calib -o qtool;
    qtool eval qtool --against FP32 --data npz:test;  qtool bench FP32 qtool ORT... --json

and, side by side, onnxruntime's quantize_static (QDQ, its defaults: per-tensor U8S8, MinMax) on the same
calibration npz, with and without its quant_pre_process (benchmarks.zoo_ort, also a subprocess; a
failure is recorded with its message). Text and audio models also run `qtool quantize --activations
dynamic` vs onnxruntime's quantize_dynamic. Measured:

- integer-kernel coverage: Conv / MatMul / Gemm nodes running as integer kernels in the graph ORT
  optimizes (qtool.ortgraph), of all such compute nodes;
- SQNR (dB) of every output against FP32 on the held-out test feeds (qtool.evaluation, the code behind
  `qtool eval --against`); the table shows the worst output;
- latency: medians of one `qtool bench` run of all variants of a model, interleaved, batch 1, 2 threads;
  qtool / ORT per model and its geometric mean over models;
- quantize wall time: `qtool fuse` + `qtool quantize` vs the ORT process (pre-processing included),
  each with its interpreter start-up.

The ORT reference of each target is quantize_static with quant_pre_process (its recommended recipe), or
without it where pre-processing fails. Targets (reported, never assumed): coverage >= ORT, SQNR >= ORT,
latency qtool / ORT <= 1.0 per model and geometric mean <= 0.95, quantize time <= 1.5x ORT.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks.common import RESULTS, write_result

REPO = Path(__file__).resolve().parent.parent
STEP_TIMEOUT_S = 600
TARGETS = {"coverage": ">= ORT", "sqnr": ">= ORT", "latency_ratio": "<= 1.0", "latency_geomean": "<= 0.95",
           "quantize_time_ratio": "<= 1.5"}
NOT_AVAILABLE = "n/a (not available)"


# ------------------------------------------------------------------------------------------ subprocesses

def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


# The tests run the two Python tools in-process (the same CLI code and exit codes, no interpreter start-up
# per step); the benchmark always runs them in subprocesses, which is what it times.
IN_PROCESS = False


def _in_process(cmd: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    module, args = cmd[2], cmd[3:]
    if module == "qtool.cli":
        from qtool.cli import main
    else:
        from benchmarks.zoo_ort import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


def run_step(cmd: list[str], timeout: float = STEP_TIMEOUT_S) -> dict:
    """Run one command: exit code, wall seconds, the last line of stderr when it failed."""
    t = time.perf_counter()
    try:
        if IN_PROCESS and cmd[:2] == [sys.executable, "-m"] and cmd[2] in ("qtool.cli", "benchmarks.zoo_ort"):
            rc, out, err = _in_process(cmd)
        else:
            p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
            rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        rc, out, err = None, "", f"timed out after {timeout:.0f} s"
    step = {"rc": rc, "seconds": time.perf_counter() - t}
    if rc != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()] or [f"exit {rc}"]
        step["error"] = lines[-1][:300]
    step["stdout"] = out.strip().splitlines()[-12:]
    return step


def qtool_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "qtool.cli", *map(str, args)]


def ort_cmd(mode: str, src: Path, dst: Path, calib: Path | None, pre: bool) -> list[str]:
    return [sys.executable, "-m", "benchmarks.zoo_ort", mode, str(src), str(dst),
            *([str(calib)] if calib else []), *(["--pre"] if pre else [])]


# ------------------------------------------------------------------------------------------ measurements

def coverage(path: Path) -> dict:
    from qtool.ortgraph import integer_kernel_report

    r = integer_kernel_report(str(path))
    return {"integer": r.integer_compute, "compute": r.compute_nodes, "float_fallbacks": r.float_fallbacks,
            "fraction": r.integer_compute / r.compute_nodes if r.compute_nodes else None,
            "integer_ops": dict(r.integer_ops)}


def sqnr(path: Path, fp32: onnx.ModelProto, test_npz: Path) -> dict:
    from qtool.evaluation import EvalConfig, evaluate_model
    from qtool.io import load_model

    r = evaluate_model(load_model(path), f"npz:{test_npz}", EvalConfig(batch_size=64), against=fp32)
    per = {k: {"sqnr_db": float(m.sqnr_db), "cosine": float(m.cosine), "top1_agreement": m.top1_agreement}
           for k, m in r.outputs.items()}
    return {"outputs": per, "min_sqnr_db": min(v["sqnr_db"] for v in per.values()), "samples": r.n}


def geomean(xs) -> float | None:
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    return float(math.exp(sum(map(math.log, xs)) / len(xs))) if xs else None


def _ok(step: dict | None) -> bool:
    return step is not None and step.get("rc") == 0


def run_model(key: str, fp32: onnx.ModelProto, calib: dict, test: dict, workdir: Path, *, runs: int = 100,
              dynamic: bool = False) -> dict:
    """Every step on one model in `workdir`; a row of results/zoo.json."""
    workdir.mkdir(parents=True, exist_ok=True)
    f = {n: workdir / f"{n}.onnx" for n in ("fp32", "fused", "qtool", "ort", "ort_nopre", "qtool_dynamic",
                                            "ort_dynamic")}
    cal_npz, test_npz = workdir / "calib.npz", workdir / "test.npz"
    onnx.save(fp32, f["fp32"])
    np.savez(cal_npz, **calib)
    np.savez(test_npz, **test)
    n_cal = len(next(iter(calib.values())))
    steps = {
        "fuse": run_step(qtool_cmd("fuse", f["fp32"], "-o", f["fused"])),
    }
    steps["quantize"] = run_step(qtool_cmd("quantize", f["fused"], "--data", f"npz:{cal_npz}", "--calib-size", n_cal,
                                           "-o", f["qtool"])) if _ok(steps["fuse"]) else None
    if _ok(steps["quantize"]):
        steps["eval"] = run_step(qtool_cmd("eval", f["qtool"], "--against", f["fp32"], "--data", f"npz:{test_npz}"))
    steps["ort"] = run_step(ort_cmd("static", f["fp32"], f["ort"], cal_npz, pre=True))
    steps["ort_nopre"] = run_step(ort_cmd("static", f["fp32"], f["ort_nopre"], cal_npz, pre=False))
    if dynamic:
        src = f["fused"] if _ok(steps["fuse"]) else f["fp32"]
        s = run_step(qtool_cmd("quantize", src, "--activations", "dynamic", "--data", f"npz:{cal_npz}",
                               "--calib-size", n_cal, "-o", f["qtool_dynamic"]))
        if s["rc"] == 2 and "no such option" in s.get("error", "").lower():
            s["status"] = NOT_AVAILABLE
        steps["qtool_dynamic"] = s
        steps["ort_dynamic"] = run_step(ort_cmd("dynamic", f["fp32"], f["ort_dynamic"], None, pre=True))
        if not _ok(steps["ort_dynamic"]):  # pre-processing failed: the tool alone, as a user would retry
            first = steps["ort_dynamic"]
            steps["ort_dynamic"] = run_step(ort_cmd("dynamic", f["fp32"], f["ort_dynamic"], None, pre=False))
            steps["ort_dynamic"]["pre_process_error"] = first.get("error")

    made = {"fp32": True, "qtool": _ok(steps.get("quantize")), "ort": _ok(steps["ort"]),
            "ort_nopre": _ok(steps["ort_nopre"]), "qtool_dynamic": _ok(steps.get("qtool_dynamic")),
            "ort_dynamic": _ok(steps.get("ort_dynamic"))}
    variants = [v for v, ok in made.items() if ok and f[v].is_file()]
    bench_json = workdir / "bench.json"
    steps["bench"] = run_step(qtool_cmd("bench", *[f[v] for v in variants], "--batch", 1, "--threads", 2,
                                        "--warmup", 5, "--runs", runs, "--json", bench_json))
    lat = {}
    if _ok(steps["bench"]):
        rows = {r["model"]: r for r in json.loads(bench_json.read_text())["rows"]}
        lat = {v: rows[str(f[v])]["median_ms"] for v in variants if rows.get(str(f[v]), {}).get("status") == "ok"}
    res: dict = {"steps": steps, "variants": {}}
    for v in variants:
        row: dict = {"latency_ms": lat.get(v)}
        if v != "fp32":
            try:
                row["coverage"] = coverage(f[v])
                row["sqnr"] = sqnr(f[v], fp32, test_npz)
            except Exception as e:  # e.g. a model ORT quantized but cannot run: recorded, not fatal
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        else:
            row["coverage"] = coverage(f[v])
        res["variants"][v] = row
    res["ort_reference"] = "ort" if made["ort"] else ("ort_nopre" if made["ort_nopre"] else None)
    res["quantize_s"] = {"qtool_fuse": steps["fuse"]["seconds"],
                         "qtool_quantize": steps["quantize"]["seconds"] if steps.get("quantize") else None}
    res["targets"] = targets(res)
    return res


def targets(res: dict) -> dict:
    """Each target against the ORT reference: True / False, or None where a side has no number."""
    v, ref = res["variants"], res["ort_reference"]
    q, o = v.get("qtool"), v.get(ref) if ref else None
    steps = res["steps"]
    pipeline = all(_ok(steps.get(s)) for s in ("fuse", "quantize", "eval", "bench"))
    out: dict = {"pipeline_exit_0": pipeline}
    if not q or not o or "error" in q or "error" in o:
        return {**out, "coverage": None, "sqnr": None, "latency_ratio": None, "quantize_time_ratio": None,
                "latency_qtool_over_ort": None, "quantize_qtool_over_ort": None}
    out["coverage"] = bool(q["coverage"]["fraction"] >= o["coverage"]["fraction"])
    out["sqnr"] = bool(q["sqnr"]["min_sqnr_db"] >= o["sqnr"]["min_sqnr_db"])
    lr = q["latency_ms"] / o["latency_ms"] if q["latency_ms"] and o["latency_ms"] else None
    out["latency_qtool_over_ort"] = lr
    out["latency_ratio"] = None if lr is None else bool(lr <= 1.0)
    qt = res["quantize_s"]["qtool_fuse"] + res["quantize_s"]["qtool_quantize"]
    tr = qt / steps[ref]["seconds"]
    out["quantize_qtool_over_ort"] = tr
    out["quantize_time_ratio"] = bool(tr <= 1.5)
    return out


# ------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    from benchmarks import zoo_models

    ap = argparse.ArgumentParser(prog="python -m benchmarks zoo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 calibration / 16 test samples, 10 timed runs (a smoke run)")
    ap.add_argument("--models", default=",".join(zoo_models.SPECS), help="subset, comma-separated")
    ap.add_argument("--workdir", default=None, help="keep every model's files here (default: a temporary folder)")
    args = ap.parse_args(argv)
    import onnxruntime

    wanted = [m for m in args.models.split(",") if m]
    unknown = sorted(set(wanted) - set(zoo_models.SPECS))
    if unknown:
        print(f"unknown models: {', '.join(unknown)} (known: {', '.join(zoo_models.SPECS)})", file=sys.stderr)
        return 2
    n_cal, n_test, runs = (16, 16, 10) if args.quick else (64, 64, 50)
    t0 = time.perf_counter()
    out: dict = {"models": {}}
    with tempfile.TemporaryDirectory(prefix="qtool-zoo-") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        for key in wanted:
            spec = zoo_models.SPECS[key]
            print(f"[zoo] {key} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            try:
                fp32, cal, test, src, stats = zoo_models.build(key, n_cal, n_test)
            except Exception as e:
                out["models"][key] = {"desc": spec.desc, "kind": spec.kind,
                                      "build_error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
                continue
            r = run_model(key, fp32, cal, test, root / key, runs=runs, dynamic=spec.dynamic)
            out["models"][key] = {"desc": spec.desc, "kind": spec.kind, "data": src, "fp32_outputs": stats,
                                  "calibration_samples": n_cal, "test_samples": n_test,
                                  "wall_s": time.perf_counter() - t, **r}
            print(f"[zoo] {key}: {time.perf_counter() - t:.0f} s, targets {r['targets']}", file=sys.stderr, flush=True)
    out["summary"] = summary(out["models"])
    out["settings"] = {"quick": args.quick, "threads": 2, "batch": 1, "runs": runs, "onnxruntime": onnxruntime.__version__,
                       "calibration_samples": n_cal, "test_samples": n_test, "targets": TARGETS,
                       "date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": time.perf_counter() - t0}
    name = "zoo_quick" if args.quick else "zoo"
    p = write_result(name, out, table="zoo")
    print((RESULTS / f"{name}.md").read_text())
    print(f"wrote {p} and {RESULTS / (name + '.md')} in {out['settings']['wall_s']:.0f} s", file=sys.stderr)
    return 0


def summary(models: dict) -> dict:
    rows = [m for m in models.values() if "targets" in m]
    ratios = [m["targets"].get("latency_qtool_over_ort") for m in rows]
    g = geomean(ratios)
    held = {k: sum(1 for m in rows if m["targets"].get(k) is True) for k in
            ("pipeline_exit_0", "coverage", "sqnr", "latency_ratio", "quantize_time_ratio")}
    compared = {k: sum(1 for m in rows if m["targets"].get(k) is not None) for k in held}
    dyn = [m["variants"]["qtool_dynamic"]["latency_ms"] / m["variants"]["ort_dynamic"]["latency_ms"]
           for m in rows if m["variants"].get("qtool_dynamic", {}).get("latency_ms")
           and m["variants"].get("ort_dynamic", {}).get("latency_ms")]
    return {"models": len(models), "latency_geomean_qtool_over_ort": g,
            "latency_geomean_target_held": None if g is None else bool(g <= 0.95),
            "targets_held": held, "targets_compared": compared,
            "dynamic_latency_geomean_qtool_over_ort": geomean(dyn),
            "build_failures": [k for k, m in models.items() if "build_error" in m]}


if __name__ == "__main__":
    raise SystemExit(main())
