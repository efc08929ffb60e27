"""The wall time of a fake-quant QAT training step (W8A8, LSQ, loss distill) on these CPUs, through the
path `qtool qat` takes: the ONNX model -> `qtool.qat_model.build_qat_model` (fuse, onnxruntime
calibration, lift, one quantizer per plan tensor, Conv->BN unfolded) -> `objective_loss` with the
lifted FP32 teacher -> backward -> SGD step. Part of `python -m benchmarks qat_zoo` (its "speed"
table); alone:

    python -m benchmarks.qat_speed [--models resnet50,vit_s,mobilenetv2] [--batch 32] [--steps 3] [--compile-on M,...]

Models: ResNet-50 (transformers ResNetConfig defaults, 224 px) and ViT-S/16 (ViTConfig hidden 384,
12 layers, 6 heads, 224 px), random weights. Variants: eager (what qat runs), channels_last (the conv
model: module and input in NHWC), torch.compile (inductor; its compile time is the first step's
minus an eager step). Each: one warm-up step, then the median of `steps` steps; the outputs of one
forward pass are compared with eager's (max |difference|) so a faster variant that computes
something else shows.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import numpy as np

SPECS = {"resnet50": "ResNet-50 (ResNetConfig defaults), 224 px", "vit_s": "ViT-S/16 (d 384, 12 layers, 6 heads), 224 px",
         "mobilenetv2": "the zoo's MobileNetV2 x0.5, 128 px"}


def _onnx(key: str):
    import torch
    import transformers as t

    from benchmarks.zoo_models import export

    torch.manual_seed(0)
    if key == "mobilenetv2":  # the zoo's (BN re-estimated), small enough to compile here
        from benchmarks import zoo_models

        return zoo_models.build(key, 8, 2)[0]
    if key == "resnet50":
        m = t.ResNetForImageClassification(t.ResNetConfig())
    else:
        m = t.ViTForImageClassification(t.ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12,
                                                     num_attention_heads=6, intermediate_size=1536))
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    return export(m.eval(), {"pixel_values": x}, ["logits"])


def _qat_parts(model, batch: int):
    """What qtool qat trains: the fake-quant lifted module, the FP32 teacher and the loss (distill)."""
    import torch

    from qtool.distill import fp32_teacher
    from qtool.feeds import FeedSet
    from qtool.preprocess import resolve_preprocess
    from qtool.qat_config import QATConfig
    from qtool.qat_model import build_qat_model, resolve_objective

    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(1).standard_normal((max(batch, 8), *dims)).astype(np.float32)
    fs = FeedSet({"pixel_values": x}, None)
    cfg = QATConfig(loss="distill", batch_size=batch, steps=10, calib_size=8, quiet=True)
    pre = resolve_preprocess(model)
    qm = build_qat_model(model, fs, cfg, pre, torch.device("cpu"), [])
    qm.objective = resolve_objective(qm.fused, fs, cfg, pre)
    return qm, fp32_teacher(qm.fused).eval(), cfg, {"pixel_values": torch.from_numpy(x[:batch])}


def _prepare(qm, teacher, cfg, x, variant: str):
    """A step function of `variant` on its own copy of the model, and its first (warm-up) step's time."""
    import torch

    from qtool.qat_model import objective_loss

    qm = copy.deepcopy(qm)
    teacher = copy.deepcopy(teacher)
    if variant == "channels_last":
        qm.lifted.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
        x = {k: v.contiguous(memory_format=torch.channels_last) for k, v in x.items()}
    if variant == "compile":
        qm.lifted = torch.compile(qm.lifted)
        teacher = torch.compile(teacher)
    loss_fn = objective_loss(qm, teacher, cfg)
    opt = torch.optim.SGD(qm.lifted.parameters(), lr=1e-4, momentum=0.9)
    qm.lifted.train()

    def step() -> float:
        t = time.perf_counter()
        _, loss = loss_fn(x, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    def output(module):
        from qtool.trainloop import forward

        with torch.no_grad():
            out = forward(module, x)
        return (out if isinstance(out, torch.Tensor) else out[0]).detach()

    ref_out = (output(qm.lifted), output(teacher))  # before any step: the same weights in every variant
    return step, step(), ref_out


def run(models=("resnet50", "vit_s"), resnet_batch: int = 32, vit_batch: int = 32, steps: int = 3,
        compile_on=("resnet50", "vit_s")) -> dict:
    """Per model, in a process of its own (so one model's memory, which the allocator keeps after its
    steps, is gone before the next is built): every variant warmed up, then `steps` rounds of one step
    of each variant in turn (interleaved, so a change in the machine's load hits all variants alike)."""
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    load_start = os.getloadavg()[0]
    rows = []
    for key in models:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "rows.json"
            subprocess.run([sys.executable, "-m", "benchmarks.qat_speed", "--in-process", "--models", key,
                            "--batch", str(vit_batch if key == "vit_s" else resnet_batch), "--steps", str(steps),
                            "--compile-on", ",".join(compile_on), "--json", str(out)], check=True)
            rows += json.loads(out.read_text())["rows"]
    return _result(rows, steps, load_start)


def _result(rows: list, steps: int, load_start: float) -> dict:
    import os

    import torch

    load = (load_start, os.getloadavg()[0])
    busy = max(load) > 1.5 * (os.cpu_count() or 1)
    return {"rows": rows, "threads": torch.get_num_threads(), "steps": steps, "load_avg_1min": load,
            "note": (f"Fake-quant W8A8 QAT training step (LSQ, loss distill with the lifted FP32 teacher, SGD), "
                     f"median of {steps} steps after one warm-up, the variants interleaved, torch {torch.__version__}, "
                     f"{torch.get_num_threads()} threads, one process per model; 1-minute load average "
                     f"{load[0]:.1f} at the start, {load[1]:.1f} at the end on {os.cpu_count()} cores"
                     + (" (a loaded machine: the absolute times are inflated, the ratios within one model are the "
                        "result)" if busy else "") + ". max |out - eager|: the fake-quant model's logits (train mode, "
                     "before any step) vs eager's; FP32: the lifted FP32 teacher's. peak_rss_gib: the model's "
                     "process, all its variants.")}


def run_in_process(models, resnet_batch: int, vit_batch: int, steps: int, compile_on) -> dict:
    import os
    import resource

    load_start = os.getloadavg()[0]
    rows = []
    for key in models:
        batch = vit_batch if key == "vit_s" else resnet_batch
        print(f"[qat_speed] {key} batch {batch} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        qm, teacher, cfg, x = _qat_parts(_onnx(key), batch)
        setup = time.perf_counter() - t
        variants = ["eager"] + (["channels_last"] if key != "vit_s" else []) + (["compile"] if key in compile_on else [])
        ready, out = {}, {}
        for v in variants:
            r = {"model": SPECS[key], "key": key, "batch": batch, "variant": v, "setup_s": setup}
            try:
                step, first, out[v] = _prepare(qm, teacher, cfg, x, v)
                ready[v] = step
                r["first_step_s"] = first
            except Exception as e:  # an option that does not work here is a result
                r["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            rows.append(r)
        times = {v: [] for v in ready}
        for _ in range(steps):
            for v, step in ready.items():
                try:
                    times[v].append(step())
                except Exception as e:
                    next(r for r in rows if r["key"] == key and r["variant"] == v)["error"] = \
                        f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        eager = statistics.median(times["eager"]) if times.get("eager") else None
        for r in rows:
            if r["key"] != key or r["variant"] not in ready or not times[r["variant"]]:
                continue
            v = r["variant"]
            r["steps_s"] = times[v]
            r["step_s"] = statistics.median(times[v])
            r["vs_eager"] = r["step_s"] / eager if eager else None
            if "eager" in out:
                r["max_abs_diff"] = float((out[v][0] - out["eager"][0]).abs().max())
                r["fp32_max_abs_diff"] = float((out[v][1] - out["eager"][1]).abs().max())
            if v == "compile":
                r["compile_s"] = r["first_step_s"] - r["step_s"]
            print(f"[qat_speed] {key} {v}: {r['step_s']:.2f} s/step, first {r['first_step_s']:.1f} s, "
                  f"max |out - eager| {r['max_abs_diff']:.3g}", file=sys.stderr, flush=True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        for r in rows:
            if r["key"] == key:
                r["peak_rss_gib"] = round(peak, 2)
    return _result(rows, steps, load_start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.qat_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,vit_s")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compile-on", default="resnet50,vit_s", help="models to try torch.compile on ('' for none)")
    ap.add_argument("--json", default=None, help="also write the result here (qat_zoo --speed-from reads it)")
    ap.add_argument("--in-process", action="store_true", help="all models in this process (run() starts one per model)")
    a = ap.parse_args(argv)
    r = (run_in_process if a.in_process else run)(tuple(a.models.split(",")), a.batch, a.batch, a.steps,
                                                  tuple(filter(None, a.compile_on.split(","))))
    print(json.dumps(r["rows"], indent=1, default=float))
    if a.json:
        from pathlib import Path

        Path(a.json).write_text(json.dumps(r, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
