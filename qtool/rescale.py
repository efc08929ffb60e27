"""Equivalent FP32 rescalings of the fused graph before calibration (`quantize --equalize`,
`--smoothquant ALPHA`): cross-layer equalization of Conv pairs (passes.equalize, data-free) and
SmoothQuant of LayerNorm -> MatMul / Gemm (passes.smooth, on per-channel activation maxima measured
on the calibration data). Both only move per-channel scales between neighbouring constants, so the
model computes the same in FP32 (checked on the first calibration batch: a mismatch is an error) and
the later stages (calibration, adaround, bias correction, apply_plan) see an ordinary fused graph with
the same tensor names. Torch-free; what each did is recorded in the plan's meta under "rescale"."""
from __future__ import annotations

import time

import numpy as np
import onnx

import passes
from qtool.errors import QtoolError
from qtool.ortgraph import tap_runs, tap_session
from qtool.progress import progress


# FP32 outputs of the rescaled model vs the original, relative L2 error on the first calibration batch
# (float32 rounding of the rescaled weights is ~1e-7; anything near this bound is a wrong rewrite)
FP32_TOLERANCE = 1e-4


def check_rescale_config(c) -> None:
    """Validation of QuantConfig.equalize / smoothquant (kept with the code that uses them)."""
    if not isinstance(c.equalize, bool):
        raise QtoolError(f"equalize must be true or false, got {c.equalize!r}")
    a = c.smoothquant
    if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0):
        raise QtoolError(f"smoothquant must be an alpha in [0, 1] or None, got {a!r}")
    if needs_rescale(c) and c.activations == "dynamic":
        raise QtoolError("equalize / smoothquant precondition calibrated static quantization; "
                         "activations='dynamic' has no calibration")


def needs_rescale(c) -> bool:
    return c.equalize or c.smoothquant is not None


def rescale(model: onnx.ModelProto, calib_batches: list, config) -> tuple[onnx.ModelProto, dict]:
    """The fused `model` with `config.equalize` / `config.smoothquant` applied, and notes for the plan."""
    if not calib_batches:
        raise QtoolError("no calibration batches were given")
    t0 = time.perf_counter()
    m = passes.to_ir(model)
    notes: dict = {}
    lines: list[str] = []
    if config.equalize:
        p = passes.CrossLayerEqualizationPass()
        p(m)
        notes["equalize"] = {"pairs": [f.what for f in p.fired], "rounds": p.rounds,
                             "refused": [str(r) for r in p.refusals]}
        lines.append(f"equalize: {len(p.fired)} Conv pairs equalized in {p.rounds} rounds, {len(p.refusals)} refused"
                     + (" (qtool -v quantize lists why)" if p.refusals else ""))
    if config.smoothquant is not None:
        targets = passes.smooth_targets(m.graph)
        amax = channel_absmax(passes.to_proto(m), calib_batches, [t.tensor for t in targets], config.max_batches)
        p = passes.SmoothQuantPass(amax, float(config.smoothquant))
        p(m)
        notes["smoothquant"] = {"alpha": float(config.smoothquant), "smoothed": [f.what for f in p.fired],
                                "refused": [str(r) for r in p.refusals]}
        lines.append(f"smoothquant (alpha {config.smoothquant:g}): {len(p.fired)} LayerNorms smoothed, "
                     f"{len(p.refusals)} refused" + (" (qtool -v quantize lists why)" if p.refusals else ""))
    out = passes.to_proto(m)
    check_same_fp32(model, out, calib_batches[0])
    notes["seconds"] = round(time.perf_counter() - t0, 3)
    notes["lines"] = lines
    return out, notes


def channel_absmax(model: onnx.ModelProto, batches: list, tensors: list[str],
                   max_batches: int | None = None) -> dict[str, np.ndarray]:
    """Per last-axis channel max |value| of each of `tensors` over `batches`."""
    if not tensors:
        return {}
    n = len(batches) if max_batches is None else min(len(batches), max_batches)
    out: dict[str, np.ndarray] = {}
    with progress() as bar:
        task = bar.add_task("smoothquant maxima", total=n, info="")
        for _, values in tap_runs(model, batches[:n], tensors, "the rescaling"):
            for t, v in values.items():
                a = np.abs(v.reshape(-1, v.shape[-1])).max(axis=0).astype(np.float64)
                out[t] = a if t not in out else np.maximum(out[t], a)
            bar.advance(task)
    return out


def check_same_fp32(before: onnx.ModelProto, after: onnx.ModelProto, batch: dict) -> None:
    """Refuse a rescaling that changed what the model computes (a wrong rewrite must not go unnoticed)."""
    names = [o.name for o in before.graph.output]
    s0, s1 = tap_session(before, [], "the rescaling"), tap_session(after, [], "the rescaling")
    feed = {k.name: np.asarray(batch[k.name]) for k in s0.get_inputs()}
    for name, a, b in zip(names, s0.run(names, feed), s1.run(names, feed)):
        if not np.issubdtype(np.asarray(a).dtype, np.floating) or not np.isfinite(a).all():
            continue
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
        if err > FP32_TOLERANCE:
            raise QtoolError(f"equalize / smoothquant changed FP32 output {name!r} by {err:.2e} (relative L2); "
                             "this is a bug in the rescaling, please report it")

