"""QAT on the model zoo: W8A8 and W4A8 `qtool qat --loss distill` on unlabeled inputs, per architecture.

    python -m benchmarks qat_zoo [--quick] [--models a,b] [--epochs N] [--batch B] [--no-speed]
                                 [--workdir D [--rescore]]
                                                         # results/qat_zoo.json + qat_zoo.md (not --quick)

Models: the zoo's architectures (benchmarks.zoo_models: built from transformers configs, random weights,
BatchNorm statistics re-estimated), their npz feeds: `train` samples (the calibration / training feeds,
images 0..n-1 of the zoo's CIFAR pool, token / waveform seed 0) and held-out `test` samples (the next
images, seed 1), disjoint. No labels anywhere: the loss is distillation against the FP32 model.

Per model and bits (w8a8, w4a8), as a user would run it (qtool.cli's main in one child process per
model, exit codes recorded):

    qtool quantize FP32 --data npz:train --bits B --plan-out ptq.json -o ptq.onnx   # "before"
    qtool qat FP32 --data npz:train --plan ptq.json --loss distill --epochs E --batch-size b
              --accept-fidelity --plan-out qat.json -o qat.onnx                     # "after"

QAT trains the bits of the PTQ plan (`--plan`: the same tensors at the same bits, and training starts
at the plan's scales and zero points, so before / after differ by training only). `--accept-fidelity` writes the model whatever the
fidelity gate says, so "after" always has a number; the gate's own verdict ("passed" or "failed,
accepted", i.e. exit 2 without the flag) and its numbers (per output: max |fake-quant - onnxruntime| in
quantization steps, argmax agreement of class scores, on qat's val split of the train feeds) are read
from the written plan. SQNR (dB) of every output vs FP32 on the held-out test feeds (qtool.evaluation,
the code of `qtool eval --against`); the tables show the worst output.

The speed part (benchmarks.qat_speed) times fake-quant W8A8 QAT training steps of a ResNet-50 and a
ViT-S lifted through qtool, with the PyTorch options tried (channels_last, torch.compile).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, write_result

REPO = Path(__file__).resolve().parent.parent
# The Done-when architectures first (ViT, BERT, ConvNeXt, MobileNetV2, EfficientNet-B0), then the rest.
DEFAULT_MODELS = ("vit", "bert", "convnext", "mobilenetv2", "efficientnet", "resnet", "regnet", "distilbert",
                  "swin", "segformer", "wav2vec2", "detr")
BITS = ("w8a8", "w4a8")


def _cli(args: list) -> dict:
    """qtool.cli main(args) in this process: exit code, wall seconds, output lines, the error line."""
    from qtool.cli import main

    out, err = io.StringIO(), io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # click's standalone mode
            rc = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # a crash is a result too
            print(f"{type(e).__name__}: {e}", file=err)
            rc = 1
    step = {"rc": rc, "seconds": time.perf_counter() - t}
    lines = [ln for ln in (out.getvalue() + "\n" + err.getvalue()).splitlines() if ln.strip()]
    if rc != 0:
        errs = [ln for ln in err.getvalue().splitlines() if ln.strip()] or [f"exit {rc}"]
        step["error"] = errs[-1][:400]
    step["lines"] = [ln for ln in lines if ln.startswith(("fidelity", "epoch", "note: WARNING", "WARNING"))][-12:]
    return step


def _sqnr(path: Path, fp32: Path, test_npz: Path) -> dict:
    from qtool.evaluation import EvalConfig, evaluate_model
    from qtool.io import load_model

    r = evaluate_model(load_model(path), f"npz:{test_npz}", EvalConfig(batch_size=32), against=load_model(fp32))
    per = {k: {"sqnr_db": float(m.sqnr_db), "top1_agreement": m.top1_agreement} for k, m in r.outputs.items()}
    return {"outputs": per, "min_sqnr_db": min(v["sqnr_db"] for v in per.values()), "samples": r.n}


def _fidelity(plan_json: Path) -> dict | None:
    if not plan_json.is_file():
        return None
    f = json.loads(plan_json.read_text()).get("meta", {}).get("fidelity")
    if not f:
        return None
    per = {k: {"max_steps": o.get("max_steps"), "max_abs": o.get("max_abs"), "step": o.get("step"),
               "step_of": o.get("step_of"), "argmax_agreement": o.get("argmax_agreement")}
           for k, o in f["outputs"].items()}
    agree = [o["argmax_agreement"] for o in per.values() if o["argmax_agreement"] is not None]
    return {"gate": f.get("gate"), "val_samples": f.get("n"), "outputs": per,
            "first_divergence": f.get("first_divergence"),
            "max_steps": max(o["max_steps"] for o in per.values()), "min_argmax_agreement": min(agree) if agree else None}


def run_one(key: str, n_train: int, n_test: int, epochs: int, batch: int, workdir: Path,
            row_path: Path | None = None) -> dict:
    """Every step on one model (in this process); a row of results/qat_zoo.json."""
    import onnx

    from benchmarks import zoo_models

    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    f32, tr_npz, te_npz = workdir / "fp32.onnx", workdir / "train.npz", workdir / "test.npz"
    if f32.is_file() and tr_npz.is_file() and te_npz.is_file():  # resuming: the same deterministic build
        src = "reused: " + str(workdir)
    else:
        fp32, train, test, src, stats = zoo_models.build(key, n_train, n_test)
        onnx.save(fp32, f32)
        np.savez(tr_npz, **train)
        np.savez(te_npz, **test)
    n_val = max(1, n_train // 10)  # qtool.feeds.FeedSet.split: qat validates on 10 % of the train feeds
    steps = epochs * -(-(n_train - n_val) // batch)
    row: dict = {"desc": zoo_models.SPECS[key].desc, "data": src, "train_samples": n_train, "test_samples": n_test,
                 "qat_val_samples": n_val, "epochs": epochs, "batch": batch, "steps": steps,
                 "build_s": time.perf_counter() - t0, "bits": {}}
    earlier = {}  # an earlier row of this workdir (rerun to re-score): its steps' seconds
    if row_path is not None and (row_path.parent / f"{key}.json").is_file():
        earlier = json.loads((row_path.parent / f"{key}.json").read_text()).get("bits", {})
    for bits in BITS:
        d = workdir / bits
        d.mkdir(exist_ok=True)
        r: dict = {}
        ptq, ptq_plan, qat, qat_plan = d / "ptq.onnx", d / "ptq.json", d / "qat.onnx", d / "qat.json"
        # Resuming (a --workdir run interrupted, e.g. at its time limit): a step whose outputs are there is not
        # rerun; qtool writes them only on exit 0 (atomically), so they stand for exit 0 (seconds: the earlier
        # row's, else unknown).
        def reused(step: str) -> dict:
            was = earlier.get(bits, {}).get(step, {})
            return {"rc": 0, "seconds": was.get("seconds"), "reused": "outputs of an earlier run of this workdir",
                    "lines": was.get("lines", [])}

        r["ptq_step"] = reused("ptq_step") if ptq.is_file() and ptq_plan.is_file() else \
            _cli(["quantize", f32, "--data", f"npz:{tr_npz}", "--bits", bits, "--calib-size", n_train,
                  "--plan-out", ptq_plan, "-o", ptq])
        if r["ptq_step"]["rc"] == 0:
            r["before"] = _sqnr(ptq, f32, te_npz)
        bits_args = ["--plan", ptq_plan] if ptq_plan.is_file() else ["--bits", bits]
        r["qat_bits_from"] = "ptq plan" if ptq_plan.is_file() else f"--bits {bits} (first/last layer 8-bit)"
        r["qat_step"] = reused("qat_step") if qat.is_file() and qat_plan.is_file() else \
            _cli(["qat", f32, "--data", f"npz:{tr_npz}", *bits_args, "--loss", "distill",
                  "--epochs", epochs, "--batch-size", batch, "--accept-fidelity",
                  "--plan-out", qat_plan, "-o", qat])
        if r["qat_step"]["rc"] == 0:
            r["after"] = _sqnr(qat, f32, te_npz)
            r["fidelity"] = _fidelity(qat_plan)
        row["bits"][bits] = r
        if row_path is not None:  # what is done survives a timeout
            row_path.write_text(json.dumps(row, indent=1, default=float))
        print(f"[qat_zoo] {key} {bits}: ptq rc {r['ptq_step']['rc']}, qat rc {r['qat_step']['rc']} "
              f"({r['qat_step']['seconds'] or 0:.0f} s)", file=sys.stderr, flush=True)
    row["wall_s"] = time.perf_counter() - t0
    return row


def _child(key: str, n_train: int, n_test: int, epochs: int, batch: int, workdir: Path, timeout: float) -> dict:
    """run_one in a fresh interpreter (a crash or hang costs one model, not the run)."""
    out = workdir / f"{key}.json"
    cmd = [sys.executable, "-m", "benchmarks.qat_zoo", "--one", key, "--train", str(n_train), "--test", str(n_test),
           "--epochs", str(epochs), "--batch", str(batch), "--workdir", str(workdir), "--row", str(out)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, err = p.returncode, p.stderr
        sys.stderr.write("".join(ln + "\n" for ln in err.splitlines() if ln.startswith("[qat_zoo]")))
    except subprocess.TimeoutExpired:
        rc, err = None, f"timed out after {timeout:.0f} s"
    if rc == 0 and out.is_file():
        return json.loads(out.read_text())
    part = out.with_suffix(".part.json")
    if part.is_file():  # the bits it finished, and why the rest is missing
        row = json.loads(part.read_text())
        row["incomplete"] = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or [f"exit {rc}"]
        return row
    lines = [ln for ln in err.strip().splitlines() if ln.strip()] or [f"exit {rc}"]
    return {"desc": key, "error": lines[-1][:400], "rc": rc, "wall_s": time.perf_counter() - t}


def summary(models: dict) -> dict:
    runs = [(k, b, r) for k, m in models.items() for b, r in m.get("bits", {}).items()]
    done = [(k, b, r) for k, b, r in runs if "after" in r]
    return {"runs": len(runs), "qat_exit_0": len(done),
            "gate_passed": sum(1 for *_, r in done if (r.get("fidelity") or {}).get("gate") == "passed"),
            "zero_steps": sum(1 for *_, r in done if (r.get("fidelity") or {}).get("max_steps") == 0),
            "improved": sum(1 for *_, r in done if "before" in r and r["after"]["min_sqnr_db"] > r["before"]["min_sqnr_db"]),
            "architectures_with_both_bits": sum(1 for m in models.values()
                                                if all("after" in m.get("bits", {}).get(b, {}) for b in BITS)),
            "failures": [f"{k} {b}: {r['qat_step'].get('error')}" for k, b, r in runs if "after" not in r]
            + [f"{k}: {m['error']}" for k, m in models.items() if "error" in m]
            + [f"{k} {b}: not run ({'; '.join(m['incomplete'])})" for k, m in models.items() if "incomplete" in m
               for b in BITS if b not in m.get("bits", {})]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks qat_zoo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 train / 8 test samples, 1 epoch, no speed part (a smoke run)")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="subset, comma-separated")
    ap.add_argument("--train", type=int, default=None, help="training (calibration) samples per model [160]")
    ap.add_argument("--test", type=int, default=None, help="held-out test samples per model [32]")
    ap.add_argument("--epochs", type=int, default=None, help="QAT epochs over the train feeds [12]")
    ap.add_argument("--batch", type=int, default=None, help="QAT batch size [8]")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per model")
    ap.add_argument("--no-speed", action="store_true", help="skip the speed part (keep the JSON's previous one)")
    ap.add_argument("--no-zoo", action="store_true", help="only the speed part (keep the JSON's previous models)")
    ap.add_argument("--speed-batch", type=int, default=32, help="batch of the speed part's models [32]")
    ap.add_argument("--speed-models", default="resnet50,vit_s,mobilenetv2")
    ap.add_argument("--speed-compile-on", default="resnet50,vit_s,mobilenetv2",
                    help="models of the speed part torch.compile is tried on")
    ap.add_argument("--speed-from", default=None, help="the speed part from a `python -m benchmarks.qat_speed --json` file")
    ap.add_argument("--workdir", default=None, help="keep every model's files here; rerun with it to resume")
    ap.add_argument("--rescore", action="store_true",
                    help="with --workdir: score every model again from its files (a model's missing steps run)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    n_train = a.train or (16 if a.quick else 160)
    n_test = a.test or (8 if a.quick else 32)
    epochs = a.epochs or (1 if a.quick else 12)  # 216 steps of batch 8 on the 144 training samples
    batch = a.batch or (8 if a.quick else 8)
    if a.one:
        row = run_one(a.one, n_train, n_test, epochs, batch, Path(a.workdir) / a.one, Path(a.row).with_suffix(".part.json"))
        Path(a.row).write_text(json.dumps(row, indent=1, default=float))
        return 0
    from benchmarks import zoo_models

    wanted = [m for m in a.models.split(",") if m]
    unknown = sorted(set(wanted) - set(zoo_models.SPECS))
    if unknown:
        print(f"unknown models: {', '.join(unknown)}", file=sys.stderr)
        return 2
    name = "qat_zoo_quick" if a.quick else "qat_zoo"
    prev = json.loads((RESULTS / f"{name}.json").read_text()) if (RESULTS / f"{name}.json").is_file() else {}
    t0 = time.perf_counter()
    out: dict = {"models": prev.get("models", {}) if a.no_zoo else {}}
    if not a.no_zoo:
        with tempfile.TemporaryDirectory(prefix="qtool-qat-zoo-") as tmp:
            root = Path(a.workdir) if a.workdir else Path(tmp)
            root.mkdir(parents=True, exist_ok=True)
            # A --workdir resumes: a model whose row is there is not rerun, and one another run of the same
            # workdir has started (KEY.started) is left to it (its row is read at the end if it is there by then).
            later = []
            for key in wanted:
                row, mark = root / f"{key}.json", root / f"{key}.started"
                if a.workdir and row.is_file() and not a.rescore:
                    out["models"][key] = json.loads(row.read_text())
                    continue
                if a.workdir and mark.exists() and not a.rescore:
                    later.append(key)
                    continue
                mark.touch()
                print(f"[qat_zoo] {key} ...", file=sys.stderr, flush=True)
                out["models"][key] = _child(key, n_train, n_test, epochs, batch, root, a.timeout)
                print(f"[qat_zoo] {key}: {out['models'][key].get('wall_s', 0):.0f} s", file=sys.stderr, flush=True)
            for key in later:
                if (root / f"{key}.json").is_file():
                    out["models"][key] = json.loads((root / f"{key}.json").read_text())
                elif (root / f"{key}.part.json").is_file():  # a run stopped midway: the bits it finished
                    out["models"][key] = json.loads((root / f"{key}.part.json").read_text())
                    out["models"][key]["incomplete"] = ["stopped before this model's other bits finished"]
            for key in wanted:  # left to another run that has not finished any of its bits
                out["models"].setdefault(key, {"desc": zoo_models.SPECS[key].desc,
                                               "error": "no bits finished (run stopped, or still running elsewhere)"})
            out["models"] = {k: out["models"][k] for k in wanted}
    out["summary"] = summary(out["models"])
    zoo_settings = {"bits": list(BITS), "train_samples": n_train, "test_samples": n_test, "epochs": epochs,
                    "batch": batch, "loss": "distill", "algo": "lsq (qtool qat default)", "optimizer": "sgd, lr 0.01 (default)",
                    "date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": time.perf_counter() - t0}
    out["settings"] = prev.get("settings", {}) if a.no_zoo else zoo_settings
    if a.speed_from:
        out["speed"] = json.loads(Path(a.speed_from).read_text())
    elif a.quick or a.no_speed:
        out["speed"] = prev.get("speed")
    else:
        from benchmarks import qat_speed

        out["speed"] = qat_speed.run(tuple(a.speed_models.split(",")), a.speed_batch, a.speed_batch,
                                     compile_on=tuple(filter(None, a.speed_compile_on.split(","))))
    p = write_result(name, out, table="qat_zoo")
    print((RESULTS / f"{name}.md").read_text())
    print(f"wrote {p} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
