"""Calibration: stream input batches through onnxruntime and reduce each watched tensor to a range.

The model is run from bytes in memory with graph optimizations off (so the watched tensors exist as
named), with the watched tensors added as extra outputs. Memory is bounded whatever the data size:
per tensor a running min/max and a fixed-size histogram over [-R, R]. When a batch exceeds R, R
doubles and pairs of bins merge exactly (bin edges of the wider grid are a subset of the old ones),
so no data is kept and no re-binning error accumulates.

Range methods (`TensorStats.range(method, ...)`):
- minmax: the running min / max.
- percentile: the p-th / (100-p)-th percentiles of the histogram (p=99.99 by default); |x| for
  symmetric (signed) quantization.
- entropy: TensorRT's KL-divergence threshold search on the |x| histogram: the clip threshold T whose
  quantized distribution (`levels` bins) loses least information relative to the clipped reference.
- mse: the clip range, among shrinking fractions of [min, max], with the least expected squared
  quantization + clipping error under the histogram.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from qtool.errors import QtoolError

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_BINS = 2048  # even, so doubling the range merges bin pairs exactly


MIN_HIST_RANGE = 1e-8


class TensorStats:
    """Running min/max + symmetric fixed-bin histogram of one tensor."""

    def __init__(self, bins: int = DEFAULT_BINS):
        if bins < 16 or bins % 4:
            raise QtoolError(f"histogram bins must be a multiple of 4 and >= 16, got {bins}")
        self.bins = bins
        self.min = np.inf
        self.max = -np.inf
        self.R = 0.0
        self.hist = np.zeros(bins, np.int64)
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).ravel()
        if x.size == 0:
            return
        finite = x[np.isfinite(x)]
        if finite.size != x.size:
            log.warning("calibration tensor has %d non-finite values; ignored", x.size - finite.size)
            x = finite
            if x.size == 0:
                return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        amax = max(abs(lo), abs(hi))
        if self.R == 0.0:
            # A floor keeps the bin width a normal float32 (subnormal ranges break np.histogram);
            # ranges this small quantize to zero anyway.
            self.R = max(amax, MIN_HIST_RANGE)
        while amax > self.R:
            # [-2R, 2R]: the old [-R, R] occupies the middle half; each new bin = two old bins.
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.zeros_like(self.hist)
            q = self.bins // 4
            self.hist[q:q + self.bins // 2] = merged
            self.R *= 2.0
        h, _ = np.histogram(x, bins=self.bins, range=(-self.R, self.R))
        self.hist += h
        self.count += x.size

    # -- ranges ---------------------------------------------------------------------------------
    def edges(self) -> np.ndarray:
        return np.linspace(-self.R, self.R, self.bins + 1)

    def range(self, method: str, *, signed: bool, bits: int = 8, percentile: float = 99.99) -> tuple[float, float]:
        if self.count == 0:
            raise QtoolError("no calibration data reached a watched tensor")
        if method == "minmax":
            return float(self.min), float(self.max)
        if method == "percentile":
            lo, hi = self._percentile(percentile, signed)
        elif method == "entropy":
            t = self._entropy_threshold(levels=2 ** (bits - 1) if (signed or self.min < 0) else 2**bits)
            lo, hi = max(float(self.min), -t), min(float(self.max), t)
        elif method == "mse":
            lo, hi = self._mse(signed, bits)
        else:
            raise QtoolError(f"unknown calibration method {method!r} (choose from {', '.join(METHODS)})")
        if lo > hi:
            # Every value lies beyond one clip bound (e.g. a constant tensor clipped below its value):
            # the data-side bounds cross, so the range collapses onto that clip bound.
            lo = hi = hi if self.min > hi else lo
        return float(lo), float(hi)

    def _abs_hist(self) -> tuple[np.ndarray, float]:
        """Histogram of |x| over [0, R] with bins/2 bins (the symmetric grid folds exactly)."""
        half = self.bins // 2
        return self.hist[half:] + self.hist[:half][::-1], self.R

    def _percentile(self, p: float, signed: bool) -> tuple[float, float]:
        if signed:
            h, R = self._abs_hist()
            cdf = np.cumsum(h) / h.sum()
            i = int(np.searchsorted(cdf, p / 100.0))
            t = min((i + 1) * R / len(h), max(abs(self.min), abs(self.max)))
            return max(float(self.min), -t), min(float(self.max), t)
        cdf = np.cumsum(self.hist) / self.hist.sum()
        e = self.edges()
        lo = e[int(np.searchsorted(cdf, 1 - p / 100.0))]
        hi = e[min(int(np.searchsorted(cdf, p / 100.0)) + 1, self.bins)]
        return max(float(self.min), float(lo)), min(float(self.max), float(hi))

    def _entropy_threshold(self, levels: int) -> float:
        h, R = self._abs_hist()
        n = len(h)
        width = R / n
        nz = np.nonzero(h)[0]
        if nz.size == 0:
            return float(max(abs(self.min), abs(self.max)))
        last = int(nz[-1]) + 1
        if last <= levels:
            return last * width
        h = h.astype(np.float64)
        best, best_i = np.inf, last
        step = max(1, (last - levels) // 256)  # bounded work per tensor
        for i in range(levels, last + 1, step):
            p = h[:i].copy()
            p[i - 1] += h[i:].sum()  # clipped outliers land in the last bin
            # Quantize the first i bins of the *unclipped* histogram to `levels` bins, then expand
            # back spreading each level's mass evenly over its non-empty source bins (TensorRT).
            src = h[:i]
            idx = (np.arange(i) * levels) // i
            mass = np.bincount(idx, weights=src, minlength=levels)
            nonempty = np.bincount(idx, weights=(src > 0).astype(np.float64), minlength=levels)
            q = np.where(src > 0, mass[idx] / np.maximum(nonempty[idx], 1), 0.0)
            ps, qs = p.sum(), q.sum()
            if qs == 0:
                continue
            p, q = p / ps, q / qs
            m = p > 0
            # q == 0 where p > 0 (only possible at the outlier bin) is smoothed rather than infinite.
            kl = float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))
            if kl < best:
                best, best_i = kl, i
        return best_i * width

    def _mse(self, signed: bool, bits: int) -> tuple[float, float]:
        e = self.edges()
        centers = (e[:-1] + e[1:]) / 2
        w = self.hist.astype(np.float64)
        m = w > 0
        centers, w = centers[m], w[m]
        lo0, hi0 = min(float(self.min), 0.0), max(float(self.max), 0.0)
        best, best_r = np.inf, (float(self.min), float(self.max))
        for frac in np.linspace(1.0, 0.2, 81):
            if signed:
                t = frac * max(abs(lo0), abs(hi0))
                lo, hi = -t, t
                qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
                scale = t / (2 ** (bits - 1) - 1) if t > 0 else 1.0
                zp = 0
            else:
                lo, hi = frac * lo0, frac * hi0
                qmin, qmax = 0, 2**bits - 1
                scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
                zp = int(np.clip(np.rint(qmin - lo / scale), qmin, qmax))
            q = np.clip(np.rint(centers / scale) + zp, qmin, qmax)
            err = float(np.sum(w * ((q - zp) * scale - centers) ** 2))
            if err < best:
                best, best_r = err, (max(float(self.min), lo), min(float(self.max), hi))
        return best_r


def collect_stats(model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]], tensors: Sequence[str],
                  *, bins: int = DEFAULT_BINS, max_batches: int | None = None) -> dict[str, TensorStats]:
    """Run `batches` through `model` and accumulate statistics of `tensors` (graph inputs allowed)."""
    graph_inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    watch = [t for t in dict.fromkeys(tensors) if t not in graph_inputs]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for t in watch:
        if t not in existing:
            m.graph.output.append(onnx.ValueInfoProto(name=t))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise QtoolError(f"onnxruntime cannot load the model for calibration: {str(e).splitlines()[0]}") from None
    feed_names = [i.name for i in sess.get_inputs()]
    stats = {t: TensorStats(bins) for t in dict.fromkeys(tensors)}
    n = 0
    for batch in batches:
        if max_batches is not None and n >= max_batches:
            break
        if not isinstance(batch, dict):
            raise QtoolError(f"calibration batches must be dicts of input name -> array, got {type(batch).__name__}")
        missing = [k for k in feed_names if k not in batch]
        if missing:
            raise QtoolError(f"calibration batch lacks model inputs {missing}")
        feed = {k: np.asarray(batch[k]) for k in feed_names}
        try:
            outs = sess.run(watch, feed)
        except Exception as e:
            raise QtoolError(f"calibration run failed: {str(e).splitlines()[0]}") from None
        for t, v in zip(watch, outs):
            stats[t].update(v)
        for t in stats:
            if t in graph_inputs:
                stats[t].update(feed[t])
        n += 1
    if n == 0:
        raise QtoolError("no calibration batches were given")
    log.info("calibrated %d tensors on %d batches", len(stats), n)
    return stats
