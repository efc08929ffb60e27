"""Validation of QuantConfig's accuracy-control fields (max_drop, min_sqnr_db, metric, target, eval_size,
candidates), kept apart from qtool.ptq like the refinements' (qtool.refine_config); torch-free.

The control itself is qtool.accuracy_control (docs/DESIGN.md, "Accuracy-aware PTQ")."""
from __future__ import annotations

import math

from qtool.errors import QtoolError

METRICS = ("auto", "top1", "agreement", "sqnr")
TARGETS = ("cpu",)
# Per target, the choices of one quantization unit from the least to the most aggressive, as
# (name, weight bits); activations stay at 8 bits. On CPU a 4-bit weight lives in an int8 container
# and runs the same integer kernel as int8: its gain is size (packed INT4 at export), not latency.
TARGET_CHOICES = {"cpu": (("float", None), ("int8", 8), ("w4a8", 4))}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def control_enabled(c) -> bool:
    return c.max_drop is not None or c.min_sqnr_db is not None


def check_control_config(c) -> None:
    if c.max_drop is not None and (not _num(c.max_drop) or c.max_drop < 0):
        raise QtoolError(f"max_drop must be a number of percentage points >= 0, got {c.max_drop!r}")
    if c.min_sqnr_db is not None and not _num(c.min_sqnr_db):
        raise QtoolError(f"min_sqnr_db must be a finite number of dB, got {c.min_sqnr_db!r}")
    if c.confidence is not None:
        if not _num(c.confidence) or not 0.5 <= c.confidence < 1:
            raise QtoolError(f"confidence must be a level in [0.5, 1), e.g. 0.9, got {c.confidence!r}")
        if c.max_drop is None:
            raise QtoolError("confidence bounds the max_drop budget's drop: give max_drop")
    if c.metric not in METRICS:
        raise QtoolError(f"metric must be one of {', '.join(METRICS)}, got {c.metric!r}")
    if c.target not in TARGETS:
        raise QtoolError(f"target must be one of {', '.join(TARGETS)}, got {c.target!r}")
    if c.eval_size is not None and (not isinstance(c.eval_size, int) or isinstance(c.eval_size, bool)
                                    or c.eval_size < 1):
        raise QtoolError(f"eval_size must be an integer >= 1 or None, got {c.eval_size!r}")
    if not isinstance(c.candidates, int) or isinstance(c.candidates, bool) or c.candidates < 1:
        raise QtoolError(f"candidates must be an integer >= 1, got {c.candidates!r}")
    if not control_enabled(c):
        if c.metric != "auto":
            raise QtoolError(f"metric={c.metric!r} needs a budget: max_drop (top1 / agreement) or min_sqnr_db (sqnr)")
        return
    if c.max_drop is not None and c.min_sqnr_db is not None:
        raise QtoolError("give one budget: max_drop (percentage points of top-1 / agreement) or min_sqnr_db (sqnr)")
    if c.metric == "sqnr" and c.min_sqnr_db is None:
        raise QtoolError("metric='sqnr' takes its budget as min_sqnr_db (worst-output SQNR vs FP32, dB), not max_drop")
    if c.metric in ("top1", "agreement") and c.max_drop is None:
        raise QtoolError(f"metric={c.metric!r} takes its budget as max_drop (percentage points), not min_sqnr_db")
    if c.activations != "static":
        raise QtoolError("the accuracy control (max_drop / min_sqnr_db) chooses among calibrated static "
                         "quantizations; activations='dynamic' is not supported")
    if c.algo != "none" or c.bias_correction:
        raise QtoolError("the accuracy control (max_drop / min_sqnr_db) does not combine with algo / bias_correction "
                         "(each candidate would need its own refinement)")
    bits = {b for _, b in TARGET_CHOICES[c.target] if b is not None}
    if c.act_bits != 8 or c.weight_bits not in bits:
        names = ", ".join(n for n, _ in TARGET_CHOICES[c.target])
        raise QtoolError(f"on target {c.target!r} the accuracy control chooses among {names} per unit: the most "
                         f"aggressive (weight_bits / act_bits) must be w8a8 or w4a8, got "
                         f"w{c.weight_bits}a{c.act_bits}")
