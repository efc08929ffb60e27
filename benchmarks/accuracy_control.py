"""Accuracy-aware PTQ side by side: qtool's `--max-drop` (per unit float / int8 / w4a8, latency-aware) vs NNCF's
`quantize_with_accuracy_control` (W8A8 with float fallback), on a trained CIFAR-10 model, the same images.

    python -m benchmarks accuracy_control [--quick] [--model mobilenetv2_cifar10] [--nncf-python PY]
    # writes benchmarks/results/accuracy_control[_MODEL].{json,md} (--quick: a smoke run, flagged as such inside)

The model is benchmarks/models/MODEL.onnx (default resnet20_cifar10: results/accuracy_control.*; others, trained
by `python -m benchmarks.train_resnet20 --model NAME`, write results/accuracy_control_NAME.*), BN-folded by
`qtool fuse`; both tools get that graph.
512 calibration images of the train split (`qtool.data.calib_inputs`, NNCF: subset_size 512 of the same
images). The validation slice (5k images; --quick: 500) is cut in two halves: the accuracy control of both
tools tunes on the first ("control" columns), and every model is also scored on the second, which neither
tool saw ("held-out" columns). Rows: uniform W8A8 and W4A8 (qtool, mse calibration), qtool
`--bits w4a8 --max-drop 0.5` (also with `--confidence 0.9`: the budget checked on the drop's 90 % upper bound)
and `--bits w8a8 --max-drop 0.5`, and NNCF 3.4 (ONNX backend, run as a
subprocess by the NNCF environment's interpreter, benchmarks/nncf_driver.py) with max_drop=0.005 (absolute,
top-1 in [0, 1]: the same 0.5 pp) and its defaults otherwise (model_type=TRANSFORMER for a graph with
LayerNormalization or Softmax, as its users are told to pass). Top-1 on onnxruntime; latency: median, batch 1,
2 threads, every model interleaved in one measurement (`qtool.latency.median_latency_ms`); size: the ONNX
file (int8 containers), and for 4-bit weights also packed as INT4 (`export --int4-weights on`); wall time of
each quantization in one process (NNCF: measured inside its driver, without its imports).
`--search`: also `qtool search --target cpu --eval ptq --objectives acc,latency,packed_size` (NSGA-III over
float / int8 / w4a8 per layer, packed_size counting 4-bit weights at 4 bits, each candidate a plain PTQ scored
on onnxruntime on the control images; its own 256 calibration images of the train split); every front member
is then measured like the rows (top-1 on both halves, latency in the same interleaved run, file size, also
with 4-bit weights packed as INT4, which the plot shows) and plotted with them
(results/accuracy_control[_MODEL]_front.png: the front, the uniform rows, the accuracy controls).
Without the shared CIFAR-10 archive (or QTOOL_CIFAR) it prints why and exits 0 having written nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks.common import MODELS, add_latency, cifar_spec, run_driver, timed, write_result
from exporters.qdq import apply_plan
from qtool.api import quantize
from qtool.data import calib_inputs, model_image_input
from qtool.evaluation import run_feeds
from qtool.exporting import ExportConfig, export_model
from qtool.feeds import feeds_for
from qtool.fusion import fuse
from qtool.io import load_model
from qtool.plan import QuantPlan
from qtool.ptq import QuantConfig, quantize_plan

NNCF_PYTHON = os.environ.get("QTOOL_NNCF_PYTHON", "/work/venvs/nncf/bin/python")
DRIVER = Path(__file__).resolve().parent / "nncf_driver.py"
MAX_DROP_PP = 0.5
CONFIDENCE = 0.9
N_CAL = 512
DEFAULT_MODEL = "resnet20_cifar10"


def top1(model: onnx.ModelProto, fs) -> float:
    return float(np.mean(next(iter(run_feeds(model, fs).values())).argmax(1) == fs.labels))


TRANSFORMER_OPS = {"LayerNormalization", "Softmax"}  # what makes NNCF's user pass model_type=TRANSFORMER
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")


def run_nncf(python: str, fused: Path, calib: Path, val: Path, out: Path, transformer: bool) -> dict:
    cmd = [python, str(DRIVER), str(fused), str(calib), str(val), str(out), "--max-drop", str(MAX_DROP_PP / 100),
           "--subset-size", str(N_CAL)] + (["--model-type", "transformer"] if transformer else [])
    info, error, wall = run_driver(cmd)
    if info is None:
        return {"error": error, "wall_s_subprocess": wall}
    return {"seconds": info["seconds"], "wall_s_subprocess": wall, "validation_calls": info["validation_calls"],
            "validation_s": info["validation_s"], "nncf": info["nncf"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks accuracy_control", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 500 val images (250 control / 250 held out)")
    ap.add_argument("--nncf-python", default=NNCF_PYTHON, help="interpreter of the environment with nncf")
    ap.add_argument("--runs", type=int, default=None, help="timed latency runs per model (default 300; quick 50)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a trained model in benchmarks/models (without .onnx)")
    ap.add_argument("--search", action="store_true", help="also the NSGA-III search (qtool search --eval ptq), plotted")
    ap.add_argument("--pop", type=int, default=16, help="search population [16]")
    ap.add_argument("--gens", type=int, default=8, help="search generations [8]")
    args = ap.parse_args(argv)
    path = MODELS / f"{args.model}.onnx"
    if not path.exists():
        print(f"accuracy_control: no model {path} (train it with python -m benchmarks.train_resnet20 --model ...)",
              file=sys.stderr)
        return 2
    result = "accuracy_control" if args.model == DEFAULT_MODEL else f"accuracy_control_{args.model.removesuffix('_cifar10')}"
    spec = cifar_spec()
    if spec is None:
        print("accuracy_control: skipped, it needs the shared CIFAR-10 archive (or QTOOL_CIFAR)", file=sys.stderr)
        return 0
    t_all = time.perf_counter()
    n_val = 500 if args.quick else None
    fp32 = load_model(path)
    fused = fuse(fp32)[0]
    calib = list(calib_inputs(fp32, spec, n=N_CAL, batch_size=64))
    val = feeds_for(fused, spec, "val", limit=n_val)
    half = len(val) // 2
    ctl, held = val.head(half), val.subset(np.arange(half, len(val)))
    out = {"model": args.model, "quick": args.quick, "calibration_images": N_CAL, "control_images": len(ctl),
           "held_out_images": len(held), "max_drop_pp": MAX_DROP_PP,
           "nncf_available": Path(args.nncf_python).exists(), "rows": {}}
    models: dict[str, onnx.ModelProto] = {"FP32": fused}
    fp = {"control": top1(fused, ctl), "held_out": top1(fused, held)}
    out["fp32_top1"] = fp
    out["fp32"] = {"size_bytes": fused.ByteSize()}

    def record(tool, model, seconds, **extra):
        models[tool] = model
        t = {"control": top1(model, ctl), "held_out": top1(model, held)}
        out["rows"][tool] = {"top1": t, "drop_pp": {k: (fp[k] - t[k]) * 100 for k in t},
                             "size_bytes": model.ByteSize(), "seconds": seconds, **extra}
        print(f"[accuracy_control] {tool}: top-1 {t['control'] * 100:.2f} / {t['held_out'] * 100:.2f} % "
              f"(control / held-out), {seconds:.1f} s", file=sys.stderr, flush=True)
        write_result(result, out, table="accuracy_control")

    def int4_bytes(tuned, plan) -> int:
        return export_model(tuned, plan, ExportConfig(format="qdq", int4="on")).report.size_bytes

    for key, w in (("qtool W8A8 (uniform)", 8), ("qtool W4A8 (uniform)", 4)):
        (tuned, plan), t = timed(lambda: quantize_plan(fused, calib, QuantConfig(weight_bits=w, calib="mse")))
        extra = {"int4_packed_bytes": int4_bytes(tuned, plan)} if w == 4 else {}
        record(key, apply_plan(tuned, plan), t, **extra)
    for bits, w, conf in (("w4a8", 4, None), ("w4a8", 4, CONFIDENCE), ("w8a8", 8, None)):
        cfg = QuantConfig(weight_bits=w, calib="mse", max_drop=MAX_DROP_PP, confidence=conf)
        r, t = timed(lambda: quantize(fused, calib, cfg, val_data=ctl))
        c = r.control
        extra = {"int4_packed_bytes": int4_bytes(r.fused, r.plan)} if w == 4 else {}
        if conf is not None:
            extra["final_bound_pp"] = c.final_bound
        record(f"qtool --bits {bits} --max-drop {MAX_DROP_PP:g}" + (f" --confidence {conf:g}" if conf else ""),
               r.model, t, choices=c.counts(), met=c.met,
               raises=[f"{s.unit} {s.frm}->{s.to}" for s in c.steps], evaluations=c.evaluations,
               control_latency_ms=c.latency_ms, float_units=[u.unit for u in c.units if u.choice == "float"], **extra)
    if out["nncf_available"]:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            paths = {k: tmp / f"{k}.{e}" for k, e in (("fused", "onnx"), ("calib", "npz"), ("val", "npz"),
                                                      ("q", "onnx"))}
            onnx.save(fused, paths["fused"])
            name = model_image_input(fused)[0]
            np.savez(paths["calib"], x=np.concatenate([b[name] for b in calib]), input=np.array(name))
            np.savez(paths["val"], x=ctl.arrays[name], labels=ctl.labels)
            tool = f"NNCF quantize_with_accuracy_control(max_drop={MAX_DROP_PP / 100:g})"
            transformer = any(n.op_type in TRANSFORMER_OPS for n in fused.graph.node)
            res = run_nncf(args.nncf_python, paths["fused"], paths["calib"], paths["val"], paths["q"], transformer)
            if "error" in res:
                out["rows"][tool] = res
                print(f"[accuracy_control] {tool}: failed: {res['error']}", file=sys.stderr, flush=True)
            else:
                q = onnx.load(paths["q"])
                n_float = sum(1 for n in q.graph.node if n.op_type in COMPUTE_OPS)
                n_dq_in = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
                quantized = sum(1 for n in q.graph.node if n.op_type in COMPUTE_OPS and n.input[0] in n_dq_in)
                record(tool, q, res.pop("seconds"), units_quantized=quantized, units_float=n_float - quantized,
                       model_type="transformer" if transformer else None, **res)
    front = {}
    with tempfile.TemporaryDirectory() as wd:
        if args.search:
            front = run_search(fused, spec, len(ctl), args.pop, args.gens, Path(wd), out, models, ctl, held)
        runs = args.runs or (50 if args.quick else 300)
        feed = next(ctl.batches(1))
        add_latency(out, models, feed, runs, more=front)
    out["wall_s"] = time.perf_counter() - t_all
    write_result(result, out, table="accuracy_control")
    if args.search:
        plot_front(MODELS.parent / "results" / f"{result}_front.png", out)
    return 0


def run_search(fused, spec, n_control: int, pop: int, gens: int, workdir: Path, out: dict, models: dict, ctl,
               held) -> dict:
    """qtool search --target cpu --eval ptq on the control images; each front member measured like a row
    (its model into `models`, its record into out["search"]["front"]); returns name -> record."""
    from collections import Counter

    from qtool.api import search
    from qtool.bitsearch.config import SearchConfig

    cfg = SearchConfig(target="cpu", objectives=("acc", "latency", "packed_size"), evaluator="ptq", pop=pop,
                       gens=gens, val_limit=n_control)
    res, t = timed(lambda: search(fused, spec, cfg, workdir=workdir, progress=False))
    out["search"] = {"command": "qtool search --target cpu --eval ptq --objectives acc,latency,packed_size "
                                f"--pop {pop} --gens {gens} --val-limit {n_control}",
                     "seconds": t, "evaluated": res.evaluated, "front": []}
    named = {}
    for m in res.front:
        q = load_model(workdir / m["qdq_file"])
        name = f"search front {m['index']}"
        models[name] = q
        t1 = {"control": top1(q, ctl), "held_out": top1(q, held)}
        fp = out["fp32_top1"]
        rec = {"name": name, "search_acc": m["acc"], "acc_ort": m["acc_ort"], "top1": t1,
               "drop_pp": {k: (fp[k] - t1[k]) * 100 for k in t1}, "size_bytes": q.ByteSize(),
               "choices": dict(Counter(m["choices"].values()))}
        plan = QuantPlan.load(workdir / m["plan_file"])
        if any(tq.kind == "weight" and tq.bits <= 4 for tq in plan.tensors.values()):
            rec["int4_packed_bytes"] = export_model(load_model(workdir / m["model_file"]), plan,
                                                    ExportConfig(format="qdq", int4="on")).report.size_bytes
        out["search"]["front"].append(rec)
        named[name] = rec
    print(f"[accuracy_control] search: {len(res.front)} front members of {res.evaluated} evaluations, {t:.0f} s",
          file=sys.stderr, flush=True)
    return named


def plot_front(path: Path, out: dict) -> None:
    """The search front (control top-1 against measured latency and file size) with the uniform rows as
    baselines and the accuracy controls as labelled points, all measured in the same run."""
    from types import SimpleNamespace

    from qtool.bitsearch.report import plot_pareto

    def objs(r: dict) -> dict:
        return {"acc": r["top1"]["control"], "latency": r["latency_ms"],
                "size": r.get("int4_packed_bytes", r["size_bytes"]) / 1024}

    rows = out["rows"]
    fp32 = {"name": "float", "objectives": {"acc": out["fp32_top1"]["control"], "latency": out["fp32"]["latency_ms"],
                                            "size": out["fp32"].get("size_bytes", 0) / 1024}}
    base = [fp32] + [{"name": k.split("(")[0].replace("qtool ", "").strip(), "objectives": objs(r)}
                     for k, r in rows.items() if "(uniform)" in k and "error" not in r]
    front = [{"objectives": objs(r)} for r in out["search"]["front"]]
    for m in front + base:
        m["acc_ort"] = m["objectives"]["acc"]
    extra = [(k, objs(r)) for k, r in rows.items() if "(uniform)" not in k and "error" not in r]
    plot_pareto(path, SimpleNamespace(objectives=["acc", "latency", "size"], front=front, baselines=base), extra=extra,
                labels={"size": "file KiB (4-bit weights packed as INT4)"})


if __name__ == "__main__":
    sys.exit(main())
