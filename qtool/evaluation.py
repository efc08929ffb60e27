"""`qtool eval`: a model on onnxruntime, batched over any feeds: top-1 where there are labels, and
against a reference (the FP32 model) per output SQNR, cosine, max abs error and top-1 agreement."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from qtool.errors import QtoolError


@dataclass(frozen=True)
class EvalConfig:
    split: str = "val"  # val (a fixed slice of train) | test | train
    batch_size: int = 256
    limit: int | None = None  # the first N images of the split

    def __post_init__(self):
        if self.split not in ("train", "val", "test"):
            raise QtoolError(f"split must be train, val or test, got {self.split!r}")
        for k, v in (("batch_size", self.batch_size), ("limit", self.limit)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise QtoolError(f"{k} must be an integer >= 1, got {v!r}")


@dataclass
class OutputMetrics:
    """One output of a model against the same output of a reference model, over all samples."""
    sqnr_db: float  # 10 log10(|ref|^2 / |ref - out|^2); inf when equal
    cosine: float
    max_abs: float
    top1_agreement: float | None  # argmax agreement when the output looks like class scores (N x C, C > 1)
    collapsed: str | None = None  # "constant" / "nan" when the output carries no signal

    def line(self, name: str) -> str:
        agree = f", top-1 agreement {self.top1_agreement * 100:.2f}%" if self.top1_agreement is not None else ""
        flag = f" [{self.collapsed.upper()}]" if self.collapsed else ""
        return f"{name}: SQNR {self.sqnr_db:.2f} dB, cosine {self.cosine:.5f}, max abs error {self.max_abs:.4g}{agree}{flag}"


@dataclass
class EvalResult:
    accuracy: float | None  # top-1 against the labels (None: no labels, or the output is not class scores)
    n: int
    split: str
    data: str
    outputs: dict[str, OutputMetrics] = field(default_factory=dict)  # vs the reference model (`against`)

    def lines(self) -> list[str]:
        out = [f"top-1 {self.accuracy * 100:.2f}% on {self.n} samples ({self.data}, {self.split})"
               if self.accuracy is not None else f"{self.n} samples ({self.data}, {self.split}), no labels"]
        return out + [m.line(k) for k, m in self.outputs.items()]


def compare_outputs(ref: np.ndarray, out: np.ndarray) -> OutputMetrics:
    """SQNR, cosine, max abs error and (for class scores) top-1 agreement of `out` against `ref`."""
    r = np.asarray(ref, np.float64).reshape(len(ref), -1)
    o = np.asarray(out, np.float64).reshape(len(out), -1)
    collapsed = None
    if not np.isfinite(o).all():
        collapsed = "nan"
    elif np.ptp(o) == 0 and np.ptp(r) > 0:
        collapsed = "constant"
    if collapsed == "nan":
        return OutputMetrics(float("-inf"), float("nan"), float("inf"), None, collapsed)
    noise = float(np.sum((r - o) ** 2))
    signal = float(np.sum(r ** 2))
    sqnr = float("inf") if noise == 0 else (10 * np.log10(signal / noise) if signal > 0 else float("-inf"))
    denom = np.linalg.norm(r) * np.linalg.norm(o)
    cosine = float(np.sum(r * o) / denom) if denom > 0 else float(noise == 0)
    agree = None
    if np.ndim(ref) == 2 and np.shape(ref)[1] > 1:
        agree = float(np.mean(np.argmax(ref, 1) == np.argmax(out, 1)))
    return OutputMetrics(sqnr, cosine, float(np.max(np.abs(r - o))) if r.size else 0.0, agree, collapsed)


def run_feeds(model: onnx.ModelProto, feeds, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Every output of `model` on a FeedSet, concatenated over the samples (fixed batch dims padded)."""
    from qtool.feeds import model_inputs

    sess = make_session(model)
    fixed = {s.name: s.dims[0] for s in model_inputs(model) if s.dims and s.dims[0] is not None}
    bs = min(fixed.values()) if fixed else batch_size
    names = [o.name for o in sess.get_outputs()]
    outs: dict[str, list] = {n: [] for n in names}
    for batch in feeds.batches(bs):
        n = len(next(iter(batch.values())))
        if fixed and n != bs:  # a fixed-batch model: pad the last batch by repeating its first sample
            batch = {k: np.concatenate([v, np.repeat(v[:1], bs - n, 0)]) for k, v in batch.items()}
        try:
            res = sess.run(None, batch)
        except Exception as e:
            raise QtoolError(f"onnxruntime cannot run the model on the data: {str(e).strip().splitlines()[0]}") from None
        for k, v in zip(names, res):
            outs[k].append(v[:n] if np.ndim(v) else np.full((n,), v))
    return {k: np.concatenate(v) for k, v in outs.items()}


def evaluate_model(model: onnx.ModelProto, data="digits", config: EvalConfig = EvalConfig(), *,
                   against: onnx.ModelProto | None = None) -> EvalResult:
    """Top-1 on the labels where there are labels and class scores; with `against` (the FP32 model),
    SQNR / cosine / max abs error / top-1 agreement of every output against it, labels or not."""
    from qtool.data import as_data
    from qtool.feeds import feeds_for

    d = as_data(data)
    feeds = feeds_for(model, d, config.split, limit=config.limit)
    outs = run_feeds(model, feeds, config.batch_size)
    first = next(iter(outs.values()))
    accuracy = None
    if feeds.labels is not None:
        if first.ndim != 2:
            if against is None:
                raise QtoolError(f"model output has shape {first.shape}; top-1 needs N x classes scores "
                                 "(compare with the FP32 model instead: --against FP32.onnx)")
        else:
            accuracy = float(np.mean(first.argmax(1) == feeds.labels))
    metrics: dict[str, OutputMetrics] = {}
    if against is not None:
        ref = run_feeds(against, feeds, config.batch_size)
        if len(ref) != len(outs):
            raise QtoolError(f"the reference model has {len(ref)} outputs, this one {len(outs)}")
        for (k, o), (kr, r) in zip(outs.items(), ref.items()):
            if o.shape != r.shape:
                raise QtoolError(f"output {k!r} has shape {o.shape} but the reference's {kr!r} has {r.shape}")
            metrics[k] = compare_outputs(r, o)
    return EvalResult(accuracy, len(feeds), config.split, d.spec, metrics)


def make_session(model: onnx.ModelProto, threads: int | None = None, optimize: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise QtoolError(f"onnxruntime cannot load the model: {str(e).strip().splitlines()[0]}") from None


def predict(model: onnx.ModelProto, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    sess = make_session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])
