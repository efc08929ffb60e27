"""Validation of QuantConfig's post-training refinement fields (algo, adaround_*, tune_activations, qdrop,
bias_correction, time_budget_s, seed), kept apart from qtool.ptq so the refinements stay one separable
piece; torch-free."""
from __future__ import annotations

from qtool.errors import QtoolError

ALGOS = ("none", "adaround", "brecq", "gptq")  # gptq: weight-only (activations="none") only
LEARNED_ROUNDING = ("adaround", "brecq")  # the algos that reconstruct static quantization on the lifted graph


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_refine_config(c) -> None:
    if c.algo not in ALGOS:
        raise QtoolError(f"algo must be one of {', '.join(ALGOS)}, got {c.algo!r}")
    if not _int(c.adaround_iters) or c.adaround_iters < 1:
        raise QtoolError(f"adaround_iters must be an integer >= 1, got {c.adaround_iters!r}")
    if not _int(c.adaround_samples) or c.adaround_samples < 1:
        raise QtoolError(f"adaround_samples must be an integer >= 1, got {c.adaround_samples!r}")
    if not isinstance(c.tune_activations, bool):
        raise QtoolError(f"tune_activations must be true or false, got {c.tune_activations!r}")
    if c.tune_activations and c.algo != "brecq":
        raise QtoolError(f"tune_activations learns activation scales in the block reconstruction: it needs "
                         f"algo='brecq', got algo={c.algo!r}")
    q = c.qdrop
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q < 1.0:
        raise QtoolError(f"qdrop must be a probability in [0, 1), got {q!r}")
    if q and c.algo not in LEARNED_ROUNDING:
        raise QtoolError(f"qdrop mixes FP32 inputs into the reconstruction of adaround / brecq, got algo={c.algo!r}")
    if not isinstance(c.bias_correction, bool):
        raise QtoolError(f"bias_correction must be true or false, got {c.bias_correction!r}")
    t = c.time_budget_s
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or t != t
                          or t == float("inf")):
        raise QtoolError(f"time_budget_s must be a number of seconds > 0 or None, got {t!r}")
    if not _int(c.seed) or c.seed < 0:
        raise QtoolError(f"seed must be an integer >= 0, got {c.seed!r}")


def needs_refine(c) -> bool:
    return c.algo in LEARNED_ROUNDING or c.bias_correction
