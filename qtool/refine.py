"""The post-training refinements of `qtool quantize`, in order: learned rounding (`algo="adaround"`,
qtool.adaround, layer by layer; `algo="brecq"`, qtool.brecq, block by block, with `tune_activations` also
the plan's activation scales), then empirical bias correction (`bias_correction`, qtool.biascorr) measured
on the model with the learned rounding. One time budget bounds both; what each did is logged and recorded
in the plan's meta under "refine"."""
from __future__ import annotations

import logging
import time

import onnx

from qtool.adaround import adaround
from qtool.biascorr import bias_correct
from qtool.brecq import brecq
from qtool.plan import QuantPlan

log = logging.getLogger(__name__)


def refine(model: onnx.ModelProto, plan: QuantPlan, calib_batches: list, config) -> onnx.ModelProto:
    """The fused `model` with refined weights / biases for `plan` (whose scales stay as they are, except
    the activation scales `algo="brecq"` with `tune_activations` learns: written into `plan`)."""
    t0 = time.perf_counter()
    budget = config.time_budget_s
    notes: dict = {}
    tuned = model
    if config.algo == "adaround":
        tuned, rep = adaround(model, plan, calib_batches, iters=config.adaround_iters,
                              samples=config.adaround_samples, drop=config.qdrop, time_budget_s=budget,
                              seed=config.seed)
        notes["adaround"] = {"layers_learned": sum(r.kept == "learned" for r in rep.layers),
                             "layers_kept_nearest": [r.weight for r in rep.layers if r.kept == "nearest"],
                             "layers_skipped_time_budget": rep.skipped, "samples": rep.samples,
                             "iterations": config.adaround_iters, "qdrop": config.qdrop,
                             "seconds": round(rep.seconds, 3)}
        lines = rep.lines()
    elif config.algo == "brecq":
        tuned, rep = brecq(model, plan, calib_batches, iters=config.adaround_iters, samples=config.adaround_samples,
                           tune_activations=config.tune_activations, drop=config.qdrop, time_budget_s=budget,
                           seed=config.seed)
        notes["brecq"] = {"blocks_learned": sum(b.kept == "learned" for b in rep.blocks),
                          "blocks_kept_start": [b.weights for b in rep.blocks if b.kept == "start"],
                          "blocks_skipped_time_budget": rep.skipped, "samples": rep.samples,
                          "iterations": config.adaround_iters, "qdrop": config.qdrop,
                          "tune_activations": config.tune_activations,
                          "activations_tuned": [a for b in rep.blocks if b.kept == "learned" for a in b.activations],
                          "seconds": round(rep.seconds, 3)}
        lines = rep.lines()
    else:
        lines = []
    if config.bias_correction:
        left = None if budget is None else max(budget - (time.perf_counter() - t0), 1e-9)
        tuned, bc = bias_correct(model, tuned, plan, calib_batches, samples=config.adaround_samples,
                                 time_budget_s=left)
        notes["bias_correction"] = {"layers_corrected": len(bc.layers), "layers_skipped_time_budget": bc.skipped,
                                    "samples": bc.samples, "seconds": round(bc.seconds, 3)}
        lines += bc.lines()
    for line in lines:
        log.info(line)
    plan.meta["refine"] = {**notes, "lines": lines}
    return tuned
