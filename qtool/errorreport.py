"""Where a quantized model loses its accuracy: per quantized tensor, the SQNR of the QDQ model's value
against the FP32 value on the same inputs, worst first (`qtool quantize --report FILE`).

Both models run with onnxruntime's graph optimizations off, so every planned tensor is observable: the
QDQ model's value of tensor T is the output of T's DequantizeLinear (it carries T's own rounding and
everything upstream). The model outputs are also compared as onnxruntime really runs them (optimized,
integer kernels): an output that is constant, NaN, or whose SQNR is below `COLLAPSE_SQNR_DB` has
collapsed, and `check_not_collapsed` turns that into a QtoolError naming the worst tensor.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from qtool.errors import QtoolError
from qtool.evaluation import OutputMetrics, compare_outputs, make_session
from qtool.io import atomic_write_text
from qtool.ortgraph import tap_session
from qtool.plan import QuantPlan

COLLAPSE_SQNR_DB = 1.0  # noise about as large as the signal: the output carries (almost) nothing


@dataclass
class TensorError:
    tensor: str
    bits: int
    sqnr_db: float
    cosine: float
    max_abs: float


@dataclass
class ErrorReport:
    tensors: list[TensorError]  # worst (lowest SQNR) first
    outputs: dict[str, OutputMetrics] = field(default_factory=dict)
    samples: int = 0

    def collapsed(self) -> list[str]:
        return [k for k, m in self.outputs.items() if m.collapsed or m.sqnr_db < COLLAPSE_SQNR_DB]

    def to_dict(self) -> dict:
        return {"samples": self.samples, "outputs": {k: asdict(v) for k, v in self.outputs.items()},
                "tensors": [asdict(t) for t in self.tensors]}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=float) + "\n")

    def table(self, limit: int = 15):
        from rich.table import Table

        t = Table(title=f"quantization error per tensor, worst first ({self.samples} samples, vs FP32)")
        for col in ("tensor", "bits", "SQNR dB", "cosine", "max abs err"):
            t.add_column(col)
        for r in self.tensors[:limit]:
            t.add_row(r.tensor, str(r.bits), f"{r.sqnr_db:.2f}", f"{r.cosine:.5f}", f"{r.max_abs:.4g}")
        if len(self.tensors) > limit:
            t.add_row(f"... {len(self.tensors) - limit} more in the JSON", "", "", "", "")
        return t


class _Running:
    """SQNR / cosine / max abs error of one tensor, accumulated batch by batch (no values kept)."""

    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.qq = self.max_abs = 0.0
        self.nan = False

    def update(self, r: np.ndarray, q: np.ndarray) -> None:
        r = np.asarray(r, np.float64).ravel()
        q = np.asarray(q, np.float64).ravel()
        if not np.isfinite(q).all():
            self.nan = True
            return
        d = r - q
        self.signal += float(r @ r)
        self.noise += float(d @ d)
        self.dot += float(r @ q)
        self.qq += float(q @ q)
        self.max_abs = max(self.max_abs, float(np.max(np.abs(d))) if d.size else 0.0)

    def result(self) -> tuple[float, float, float]:
        if self.nan:
            return float("-inf"), float("nan"), float("inf")
        sqnr = float("inf") if self.noise == 0 else (
            10 * np.log10(self.signal / self.noise) if self.signal > 0 else float("-inf"))
        denom = np.sqrt(self.signal * self.qq)
        cosine = self.dot / denom if denom > 0 else float(self.noise == 0)
        return sqnr, float(cosine), self.max_abs


def error_report(fused: onnx.ModelProto, qmodel: onnx.ModelProto, plan: QuantPlan,
                 batches: Iterable[dict[str, np.ndarray]], per_tensor: bool = True,
                 reference: list[dict[str, np.ndarray]] | None = None) -> ErrorReport:
    """Run `batches` through the FP32 fused graph and its quantized model; see the module docstring.

    `per_tensor=False` compares the outputs only (both models optimized: two fast runs per batch); the
    per-tensor rows need both models unoptimized with every planned tensor as an output, i.e. two more,
    slower runs per batch, so they are computed on request (`quantize --report`) or to name the worst
    tensor of a collapse. `reference`: the FP32 outputs of each batch, already computed (calibration
    returns them), so that without per-tensor rows the FP32 model is not run again."""
    dq_out = {n.name.removesuffix("_DequantizeLinear"): n.output[0] for n in qmodel.graph.node
              if n.op_type == "DequantizeLinear" and n.name.endswith("_DequantizeLinear")}
    acts = [t for t, q in plan.tensors.items() if q.kind == "activation" and t in dq_out] if per_tensor else []
    # With the per-tensor rows, the unoptimized reference run also gives the FP32 outputs.
    if per_tensor or reference is None:
        ref_sess = tap_session(fused, acts, "the error report") if per_tensor else make_session(fused)
        ref_run = lambda feed: dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, feed)))  # noqa: E731
    else:
        ref_run = None
    q_sess = tap_session(qmodel, [dq_out[t] for t in acts], "the error report") if per_tensor else None
    q_run = make_session(qmodel)  # the outputs as onnxruntime deploys the quantized model (integer kernels)
    out_names = [o.name for o in fused.graph.output]
    running = {t: _Running() for t in acts}
    outs: dict[str, tuple[list, list]] = {k: ([], []) for k in out_names}
    n = 0
    in_names = [i.name for i in q_run.get_inputs()]
    for b, batch in enumerate(batches):
        feed = {k: batch[k] for k in in_names}
        r = ref_run(feed) if ref_run is not None else reference[b]
        if q_sess is not None:
            q = dict(zip([o.name for o in q_sess.get_outputs()], q_sess.run(None, feed)))
            for t in acts:
                running[t].update(r[t], q[dq_out[t]])
        for k, qo in zip([o.name for o in q_run.get_outputs()], q_run.run(None, feed)):
            outs[k][0].append(r[k])
            outs[k][1].append(qo)
        n += len(next(iter(feed.values())))
    if n == 0:
        raise QtoolError("the error report got no data")
    rows = [TensorError(t, plan.tensors[t].bits, *running[t].result()) for t in acts]
    rows.sort(key=lambda e: (e.sqnr_db, e.tensor))
    outputs = {k: compare_outputs(_cat(r), _cat(q)) for k, (r, q) in outs.items()}
    return ErrorReport(rows, outputs, n)


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    """Samples on axis 0; batches whose other dims differ (sequence lengths) are flattened per batch."""
    if len({a.shape[1:] for a in arrays}) == 1:
        return np.concatenate(arrays)
    return np.concatenate([a.reshape(-1) for a in arrays])[:, None]


def check_not_collapsed(report: ErrorReport) -> None:
    """A quantized model whose outputs collapsed against FP32 is an error, not a result (exit 2)."""
    bad = report.collapsed()
    if not bad:
        return
    m = report.outputs[bad[0]]
    worst = report.tensors[0] if report.tensors else None
    what = m.collapsed or f"SQNR {m.sqnr_db:.2f} dB"
    raise QtoolError(f"the quantized model's output {bad[0]!r} collapsed against FP32 on the calibration data "
                     f"({what}); worst tensor: {worst.tensor!r} at {worst.sqnr_db:.2f} dB ({worst.bits} bits)"
                     if worst else f"the quantized model's output {bad[0]!r} collapsed against FP32 ({what})")
