"""Calibration: stream input batches through onnxruntime and reduce each watched tensor to a range.

The model is run from bytes in memory with graph optimizations off (so the watched tensors exist as
named), with the watched tensors added as extra outputs. Memory is bounded whatever the data size:
per tensor a running min/max and a fixed-size histogram over [-R, R]. When a batch exceeds R, R
doubles and pairs of bins merge exactly (bin edges of the wider grid are a subset of the old ones),
so no data is kept and no re-binning error accumulates. Min / max are exact; a batch of more than
HIST_SAMPLES values adds an evenly strided sample of them to the histogram (binning is most of the
calibration time on large activation maps, and a 2048-bin histogram is as well estimated from 2^18
values a batch as from 10^7).

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
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx

from qtool.errors import QtoolError
from qtool.ortgraph import tap_runs

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_BINS = 2048  # even, so doubling the range merges bin pairs exactly


MIN_HIST_RANGE = 1e-8
# Sub-bins per histogram bin kept internally. percentile / mse read the `bins`-bin histogram (their
# sums); entropy reads the finer one: TensorRT's KL search needs many histogram bins per quantization
# level (it uses 2048 bins for 128 levels), else a candidate threshold T whose quantization step is one
# histogram bin looks lossless to the search and wins. With 2048 x 4 signed bins, |x| over [0, max]
# gets 2048-4096 bins, as fine as TensorRT's.
FINE = 4
HIST_SAMPLES = 1 << 18  # at most this many values of one batch go into the histogram


def sample_stride(shape: Sequence[int], cap: int = HIST_SAMPLES) -> int:
    """The smallest stride >= size / cap sharing no factor with any dimension of `shape`: flat positions
    0, s, 2s, .. then visit every index of every axis evenly (a stride dividing the row length would
    read one column only)."""
    size = int(np.prod(shape))
    s = max(1, -(-size // cap))
    while s > 1 and any(np.gcd(s, int(d)) > 1 for d in shape):
        s += 1
    return s


class TensorStats:
    """Running min/max + symmetric fixed-bin histogram of one tensor (`histogram=False`: min/max only,
    enough for minmax and far cheaper per batch)."""

    def __init__(self, bins: int = DEFAULT_BINS, histogram: bool = True, channel_axis: int | None = None):
        if bins < 16 or bins % 4:
            raise QtoolError(f"histogram bins must be a multiple of 4 and >= 16, got {bins}")
        self.bins = bins
        self.histogram = histogram
        self.min = np.inf
        self.max = -np.inf
        self.R = 0.0
        self.fine = np.zeros(bins * FINE if histogram else 0, np.int64)
        self.count = 0
        self.nonfinite = 0  # inf / NaN values seen (left out of the statistics; see `finite`)
        # Per-channel min / max along `channel_axis` (None: not tracked): the activation codes each input
        # channel of a weighted node reaches, for the pair bound of qtool.ptq.kernel_pairs.
        self.channel_axis = channel_axis
        self.channel_min: np.ndarray | None = None
        self.channel_max: np.ndarray | None = None

    @property
    def finite(self) -> bool:
        """False when the tensor held inf / NaN (an attention mask's -inf): Q(-inf) saturates to the
        lowest code, so quantizing it would silently change what the graph computes."""
        return self.nonfinite == 0

    @property
    def hist(self) -> np.ndarray:
        """The `bins`-bin histogram over [-R, R]."""
        return self.fine.reshape(self.bins, FINE).sum(axis=1)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        finite = np.isfinite(lo) and np.isfinite(hi)  # NaN propagates through min/max: one check suffices
        if self.channel_axis is not None:
            self._update_channels(x, finite)
        shape, x = x.shape, x.ravel()
        if not finite:
            kept = x[np.isfinite(x)]
            self.nonfinite += x.size - kept.size
            x = kept
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += x.size
        if not self.histogram:
            return
        amax = max(abs(lo), abs(hi))
        if x.size > HIST_SAMPLES:
            stride = sample_stride(shape) if x.size == int(np.prod(shape)) else -(-x.size // HIST_SAMPLES)
            x = x[stride // 2::stride]
        if self.R == 0.0:
            # A floor keeps the bin width a normal float32 (subnormal ranges break the binning);
            # ranges this small quantize to zero anyway.
            self.R = max(amax, MIN_HIST_RANGE)
        n = self.fine.size
        while amax > self.R:
            # [-2R, 2R]: the old [-R, R] occupies the middle half; each new bin = two old bins.
            merged = self.fine.reshape(-1, 2).sum(axis=1)
            self.fine = np.zeros_like(self.fine)
            self.fine[n // 4:n // 4 + n // 2] = merged
            self.R *= 2.0
        # Vectorized binning, ~3x faster than np.histogram (which also bisects edge cases): floor of
        # (x + R) * n / 2R. No clip pass: |x| <= R, so rounding can only give a tiny negative value (the
        # cast truncates it to bin 0) or n for x == R, which joins the last bin as in np.histogram.
        idx = x * np.float32(n / (2.0 * self.R))
        idx += np.float32(n / 2)
        h = np.bincount(idx.astype(np.intp), minlength=n + 1)
        h[n - 1] += h[n]
        self.fine += h[:n]

    def _update_channels(self, x: np.ndarray, finite: bool) -> None:
        if x.ndim == 0 or x.size == 0:
            return
        axes = tuple(a for a in range(x.ndim) if a != self.channel_axis % x.ndim)
        if finite:  # reduce in place: no copy of the tensor
            lo, hi = x.min(axis=axes), x.max(axis=axes)
        else:
            ok = np.isfinite(x)
            lo, hi = np.where(ok, x, np.inf).min(axis=axes), np.where(ok, x, -np.inf).max(axis=axes)
        if self.channel_min is None:
            self.channel_min, self.channel_max = lo.astype(np.float64), hi.astype(np.float64)
        elif self.channel_min.shape != lo.shape:  # the channel count changed between batches: not a channel axis
            self.channel_axis = self.channel_min = self.channel_max = None
        else:
            self.channel_min, self.channel_max = np.minimum(self.channel_min, lo), np.maximum(self.channel_max, hi)

    # -- ranges ---------------------------------------------------------------------------------
    def edges(self) -> np.ndarray:
        return np.linspace(-self.R, self.R, self.bins + 1)

    def range(self, method: str, *, signed: bool, bits: int = 8, percentile: float = 99.99) -> tuple[float, float]:
        if self.count == 0:
            raise QtoolError("no calibration data reached a watched tensor")
        if method == "minmax":
            return float(self.min), float(self.max)
        if not self.histogram and method in METHODS:
            raise QtoolError(f"calibration method {method!r} needs histograms; these statistics were collected "
                             "with histograms=False (minmax only)")
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
        """TensorRT's KL threshold on the fine |x| histogram: the smallest KL(P || Q) over every candidate
        threshold from `levels` bins up to the last non-empty bin (kl_by_threshold)."""
        half = self.fine.size // 2
        h = self.fine[half:] + self.fine[:half][::-1]  # |x| over [0, R]: the symmetric grid folds exactly
        # The first bin holds the exact zeros of a Relu (often half the tensor). 0 is exact in any range
        # (activation_quant), yet a level spanning that spike and its neighbours looks like a big loss to
        # the KL, so every threshold whose step is wider than one bin lost to the smallest candidate
        # (the old 0.25 x range). TensorRT's calibrator (pytorch-quantization) flattens it the same way.
        h[0] = h[1]
        width = self.R / half
        nz = np.nonzero(h)[0]
        if nz.size == 0:
            return float(max(abs(self.min), abs(self.max)))
        last = int(nz[-1]) + 1
        if last <= levels:
            return last * width
        # Every `step`-th candidate, then every one around the best: the same optimum unless the KL curve
        # has a sharper dip between two coarse candidates than around its minimum, at a fraction of the cost.
        step = max(1, (last - levels) // 512)
        cands, kl = kl_by_threshold(h[:last], levels, stride=step)
        best = int(cands[int(np.argmin(kl))])
        if step > 1:
            lo, hi = max(levels, best - step + 1), min(last, best + step - 1)
            cands, kl = kl_by_threshold(h[:last], levels, start=lo, stop=hi)
            best = int(cands[int(np.argmin(kl))])
        return best * width

    def _mse(self, signed: bool, bits: int) -> tuple[float, float]:
        """Every candidate fraction at once (81 x non-empty bins): one array expression, not 81 passes."""
        e = self.edges()
        centers = (e[:-1] + e[1:]) / 2
        w = self.hist.astype(np.float64)
        m = w > 0
        centers, w = centers[m], w[m]
        lo0, hi0 = min(float(self.min), 0.0), max(float(self.max), 0.0)
        frac = np.linspace(1.0, 0.2, 81)
        if signed:
            hi = frac * max(abs(lo0), abs(hi0))
            lo = -hi
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            scale = np.where(hi > 0, hi / qmax, 1.0)
            zp = np.zeros_like(frac)
        else:
            lo, hi = frac * lo0, frac * hi0
            qmin, qmax = 0, 2**bits - 1
            scale = np.where(hi > lo, (hi - lo) / (qmax - qmin), 1.0)
            zp = np.clip(np.rint(qmin - lo / scale), qmin, qmax)
        s, z = scale[:, None], zp[:, None]
        q = np.clip(np.rint(centers / s) + z, qmin, qmax)
        err = np.sum(w * ((q - z) * s - centers) ** 2, axis=1)
        i = int(np.argmin(err)) if np.isfinite(err).any() else 0
        return max(float(self.min), float(lo[i])), min(float(self.max), float(hi[i]))


def kl_by_threshold(hist: np.ndarray, levels: int, *, start: int | None = None, stop: int | None = None,
                    stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) of TensorRT's entropy calibration for candidate thresholds i (in bins) of the |x|
    histogram `hist`, i = start, start + stride, .. <= stop (default: levels .. len(hist)).
    Returns (candidates, kl); inf where undefined.

    P is hist[:i] with the clipped outliers hist[i:] added to its last bin; Q quantizes hist[:i]
    (without the outliers) into `levels` levels, bin j to level floor(j * levels / i) (an even split;
    TensorRT gives the remainder of i / levels to the last level), and expands each level's mass evenly
    over its bins where P > 0. Both normalized. Computed in closed form from cumulative sums, O(levels)
    per candidate instead of O(i) Python-level work, so every candidate is tried (TensorRT does too):
        N * KL = sum_{j<i-1} h_j log h_j - sum_{j<i-1} h_j log q_j + p log p - p log q_last + N log(S/N)
    with q_j = mass / (non-empty bins) of j's level, p = h_{i-1} + outliers, S = sum(hist[:i]).
    """
    h = np.asarray(hist, np.float64)
    n, N = h.size, float(h.sum())
    start = levels if start is None else max(start, levels)
    cands = np.arange(start, (n if stop is None else min(stop, n)) + 1, stride)
    if cands.size == 0 or N <= 0:
        return cands, np.full(cands.size, np.inf)
    C = np.concatenate([[0.0], np.cumsum(h)])
    Z = np.concatenate([[0.0], np.cumsum(h > 0)])
    H = np.concatenate([[0.0], np.cumsum(h * np.log(np.where(h > 0, h, 1.0)))])
    out = np.empty(cands.size)
    lv = np.arange(levels + 1)
    for c0 in range(0, cands.size, 512):  # bounded memory: 512 x levels per chunk
        i = cands[c0:c0 + 512]
        s = -((-lv[None, :] * i[:, None]) // levels)  # first bin of each level: ceil(l * i / levels)
        mass = np.diff(C[s], axis=1)
        ne = np.diff(Z[s], axis=1)
        hl = h[i - 1]
        p = N - C[i] + hl  # P's last bin: its own count plus every clipped outlier
        ne[:, -1] += (hl == 0) & (p > 0)  # the outlier bin counts as non-empty in P
        q = np.divide(mass, ne, out=np.zeros_like(mass), where=ne > 0)
        logq = np.log(np.where(q > 0, q, 1.0))
        rest = (mass[:, :-1] * logq[:, :-1]).sum(axis=1) + (mass[:, -1] - hl) * logq[:, -1]
        plogp = p * np.log(np.where(p > 0, p, 1.0))
        S = C[i]
        kl = (H[i - 1] - rest + plogp - p * logq[:, -1]) / N + np.log(np.where(S > 0, S, 1.0) / N)
        # P > 0 where Q == 0 (an outlier bin in an otherwise empty last level), or nothing kept: undefined
        kl[((p > 0) & (q[:, -1] == 0)) | (S <= 0)] = np.inf
        out[c0:c0 + 512] = kl
    return cands, out


def collect_stats(model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]], tensors: Sequence[str],
                  *, bins: int = DEFAULT_BINS, max_batches: int | None = None,
                  histograms: bool = True, channel_axes: dict[str, int] | None = None,
                  on_outputs: Callable[[dict, dict], None] | None = None) -> dict[str, TensorStats]:
    """Run `batches` through `model` and accumulate statistics of `tensors` (graph inputs allowed).
    `histograms=False` keeps only min/max (the minmax method), which costs almost nothing per batch.
    `on_outputs(feed, outputs)` receives each batch and the model's own outputs of it (by name): the
    error report reuses them as its FP32 reference instead of running the model again.
    `channel_axes`: tensors (watched too, min/max only when not in `tensors`) whose per-channel min / max
    along the given axis is tracked as well (`TensorStats.channel_min` / `channel_max`)."""
    channel_axes = channel_axes or {}
    stats = {t: TensorStats(bins, histograms, channel_axes.get(t)) for t in dict.fromkeys(tensors)}
    for t, axis in channel_axes.items():
        stats.setdefault(t, TensorStats(bins, False, axis))
    outputs = [o.name for o in model.graph.output] if on_outputs is not None else []
    n = 0

    def update(values: dict) -> None:
        for t, st in stats.items():
            st.update(values[t])

    # One batch's statistics are reduced in a worker thread while onnxruntime runs the next (numpy and
    # onnxruntime release the GIL): at most two batches of tensors are held at once.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for feed, values in tap_runs(model, batches, [*stats, *outputs], "calibration", max_batches):
            if on_outputs is not None:
                on_outputs(feed, {k: values[k] for k in outputs})
            if pending is not None:
                pending.result()
            pending = pool.submit(update, values)
            n += 1
        if pending is not None:
            pending.result()
    if n == 0:
        raise QtoolError("no calibration batches were given")
    log.info("calibrated %d tensors on %d batches", len(stats), n)
    return stats
