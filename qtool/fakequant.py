"""Fake-quantization modules whose forward pass equals onnxruntime's QDQ numerics bit for bit.

onnxruntime (MLAS, CPU) computes a QuantizeLinear -> DequantizeLinear pair in float32 as

    q = clamp(nearbyint(x / scale) + zp, qmin, qmax)      # true division, round half to even
    y = float(q - zp) * scale

Division matters: `x * (1/scale)` differs from ORT on some inputs (measured; see the tests).
`fake_quant` below computes exactly this in float32 with torch ops of the same IEEE semantics
(`torch.round` is round-half-to-even), so `forward(x)` of every module here equals what ORT
returns for the exported QDQ pair written from `qparams()`.

Integer ranges: `bits` 2..8 with `qmin, qmax` of the b-bit type. ORT has native int8/uint8
(opset 13), int4/uint4 (opset 21) and int2/uint2 (opset 25) Q/DQ. Other widths (3, 5, 6, 7) live
in an int8/uint8 container, where ORT would saturate to the container's range, not the b-bit one;
the exporter then either writes weights as integer codes (`quantize_codes`, exact for every
algorithm here) or gives an activation an integer Clip of its codes to [qmin, qmax] between Q
and DQ (the same values as `Clip(clip_range())` before the Q, tested), which onnxruntime still
fuses into integer kernels.

How each algorithm maps to an ORT QDQ pair (what `qparams()` returns):

- MinMax / EMA observers: affine `scale = (max - min) / (qmax - qmin)`, integer
  `zp = clamp(round(qmin - min / scale))` with the range widened to contain 0 (so 0 is exact);
  symmetric (signed only): `scale = max|x| / qmax`, zp 0.
- LSQ (Esser et al. 2020): the learned step size is the scale, zp 0, signed or unsigned.
- PACT (Choi et al. 2018): unsigned, `scale = alpha / (2^b - 1)`, zp 0; the clip at alpha is
  the Q's saturation at qmax and the clip at 0 its saturation at 0.
- DoReFa weights (Zhou et al. 2016): `u = tanh(w) / max|tanh(w)|` in [-1, 1], quantized on the
  zero-including symmetric grid `k / qmax`, k in [-qmax, qmax] (narrow range, zp 0,
  `scale = 1/qmax`). DoReFa's original grid `(2i - n) / n` (n = 2^b - 1) has no zero level and
  needs a half-integer zero point at b bits, so it is not offered; the output magnitude is
  [-1, 1] as in the paper, which suits a graph with a BatchNormalization after the weight layer.
- BNN (binary weights, XNOR-Net style scaling): `sign(w) * mean|w|` per output channel: codes
  +-1 in an int8 container (`qmin, qmax = -1, 1`), `scale = mean|w_c|`, zp 0, `bits = 1`.

Weights should be exported as `quantize_codes(w)` (int8/uint8 initializer) + DequantizeLinear:
DoReFa and BNN transform the weight before quantizing, so a QDQ on the raw float weight would not
reproduce them.

Schedules: quantization is bypassed for the first `quant_delay` training forward calls (Jacob et
al. 2018); observers keep collecting ranges meanwhile. Eval mode always fake-quantizes, because
that is what the exported model computes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qtool.errors import QtoolError

__all__ = [
    "QParams", "int_range", "fake_quant", "FakeQuant", "MinMaxFakeQuant", "EMAFakeQuant",
    "LSQFakeQuant", "PACTFakeQuant", "DoReFaWeightFakeQuant", "BNNWeightFakeQuant",
]

_UNIT_RANGE_FALLBACK = 1.0  # scale used when the observed range is empty (ORT's own choice)
_MIN_LEARNED = 1e-8  # lower bound of a learned scale / alpha: ORT needs scale > 0


def int_range(bits: int, signed: bool, narrow_range: bool = False) -> tuple[int, int]:
    """Integer range of a b-bit type; narrow range drops the most negative code (symmetric)."""
    if signed:
        return -(1 << (bits - 1)) + int(narrow_range), (1 << (bits - 1)) - 1
    return int(narrow_range), (1 << bits) - 1


@dataclass(frozen=True)
class QParams:
    """What the exporter writes for one QDQ pair.

    Unpacks as `(scale, zero_point, bits, signed, axis)`; `qmin, qmax` give the integer range the
    fake-quant clamps to (for a Clip in front of a container Q, or to check codes).
    """
    scale: np.ndarray  # float32, shape () per-tensor or (C,) per-channel
    zero_point: np.ndarray  # int8 if signed else uint8, same shape as scale
    bits: int
    signed: bool
    axis: int | None
    qmin: int
    qmax: int

    def __iter__(self):
        return iter((self.scale, self.zero_point, self.bits, self.signed, self.axis))


class _FakeQuantFn(torch.autograd.Function):
    """ORT's Q->DQ forward; STE for x (zero outside the integer range), LSQ gradient for scale."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):
        # In-place steps on one buffer and only what backward needs saved: about 2x faster on CPU
        # than a fresh tensor per step, with the same operations in the same order.
        v = x / scale
        q = torch.round(v)
        need_scale = ctx.needs_input_grad[1]
        frac = q - v if need_scale else None  # round(v) - v
        del v
        q += zero_point
        inside = (q >= qmin).logical_and_(q <= qmax)
        q.clamp_(qmin, qmax)
        q -= zero_point
        # d y / d scale, the one float tensor backward needs (not frac and q both: a third less
        # memory per quantized activation): round(v) - v inside the range, (q_bound - zp) where saturated.
        ctx.save_for_backward(inside, torch.where(inside, frac, q, out=frac) if need_scale else None)
        ctx.scale_shape = scale.shape
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        inside, dscale = ctx.saved_tensors
        gx = grad * inside if ctx.needs_input_grad[0] else None
        gs = _sum_to_shape(grad * dscale, ctx.scale_shape) if ctx.needs_input_grad[1] else None
        return gx, gs, None, None, None


def _sum_to_shape(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if t.shape == shape:
        return t
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1 and t.shape[lead + i] != 1]
    return t.sum(dim=dims, keepdim=True).reshape(shape) if dims else t.reshape(shape)


def _per_axis_view(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               axis: int | None = None) -> torch.Tensor:
    """`(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale` in float32, as ORT computes it.

    scale/zero_point are 0-d (per-tensor) or 1-d along `axis`; zero_point holds integral values.
    Gradients: straight-through for x inside the range, LSQ's for scale (if it requires grad).
    """
    s = _per_axis_view(scale.to(x.dtype), x, axis)
    z = _per_axis_view(zero_point.to(x.dtype), x, axis)
    return _FakeQuantFn.apply(x, s, z, qmin, qmax)


def _exact_with_grad_of(exact: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Forward value `exact` bit for bit, gradient of `surrogate` (x + 0.0 == x in IEEE)."""
    return exact.detach() + (surrogate - surrogate.detach())


def _reduce_dims(x: torch.Tensor, axis: int | None) -> list[int]:
    if axis is None:
        return list(range(x.dim()))
    a = axis % x.dim()
    return [d for d in range(x.dim()) if d != a]


class FakeQuant(nn.Module):
    """Common interface: `forward(x)`, `qparams()`, `quantize_codes(x)`, `clip_range()`.

    Subclasses implement `_observe(x)` (training-time state update; may be a no-op) and
    `_quantize(x)` (the exact fake-quantized value).
    """

    def __init__(self, bits: int = 8, signed: bool = True, axis: int | None = None,
                 narrow_range: bool = False, quant_delay: int = 0):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {bits}")
        if quant_delay < 0:
            raise ValueError("quant_delay must be >= 0")
        self.bits, self.signed, self.axis, self.narrow_range = bits, signed, axis, narrow_range
        self.quant_delay = quant_delay
        self.qmin, self.qmax = int_range(bits, signed, narrow_range)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.step += 1
            self._observe(x)
            # tested in Python first: without a delay, no data-dependent branch (a torch.compile graph break)
            if self.quant_delay and int(self.step) <= self.quant_delay:
                return x
        return self._quantize(x)

    # -- what the exporter needs ---------------------------------------------------------------
    def _scale_zp(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def qparams(self) -> QParams:
        scale, zp = self._scale_zp()
        s = scale.detach().to(torch.float32).cpu().numpy()
        z = zp.detach().cpu().numpy().astype(np.int8 if self.signed else np.uint8)
        return QParams(s, z, self.bits, self.signed, self.axis, self.qmin, self.qmax)

    @torch.no_grad()
    def quantize_codes(self, x: torch.Tensor) -> np.ndarray:
        """Integer codes whose DequantizeLinear equals `forward(x)` in eval mode, bit for bit."""
        y = self._quantize(x)
        scale, zp = self._scale_zp()
        s = _per_axis_view(scale.to(y.dtype), y, self.axis)
        z = _per_axis_view(zp.to(y.dtype), y, self.axis)
        codes = (torch.round(y / s) + z).clamp(self.qmin, self.qmax)
        return codes.cpu().numpy().astype(np.int8 if self.signed else np.uint8)

    def clip_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Float bounds (qmin - zp) * scale, (qmax - zp) * scale for a Clip before a container Q."""
        scale, zp = self._scale_zp()
        s = scale.detach().float().cpu()
        z = zp.detach().float().cpu()
        return ((self.qmin - z) * s).numpy(), ((self.qmax - z) * s).numpy()

    def _observe(self, x: torch.Tensor) -> None:
        pass

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self._scale_zp()
        return fake_quant(x, scale, zp, self.qmin, self.qmax, self.axis)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, signed={self.signed}, axis={self.axis}, "
                f"narrow_range={self.narrow_range}, quant_delay={self.quant_delay}")


class MinMaxFakeQuant(FakeQuant):
    """Range observer: running min/max over all training batches (frozen in eval mode)."""

    def __init__(self, bits: int = 8, signed: bool = True, axis: int | None = None, symmetric: bool = False,
                 narrow_range: bool = False, quant_delay: int = 0):
        super().__init__(bits, signed, axis, narrow_range, quant_delay)
        if symmetric and not signed:
            raise ValueError("symmetric quantization needs a signed type")
        self.symmetric = symmetric
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The range buffers' shape (per-channel) is only known after the first batch.
        for k in ("min_val", "max_val"):
            if prefix + k in state_dict:
                setattr(self, k, torch.empty_like(state_dict[prefix + k]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _combine(self, mn: torch.Tensor, mx: torch.Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, mn)
        self.max_val = torch.maximum(self.max_val, mx)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        xd = x.detach().float()
        dims = _reduce_dims(xd, self.axis)
        mn, mx = torch.amin(xd, dim=dims), torch.amax(xd, dim=dims)
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = mn, mx
        else:
            self._combine(mn, mx)

    def observe(self, x: torch.Tensor) -> None:
        """Update the range without quantizing (calibration in eval mode)."""
        self._observe(x)

    def _scale_zp(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min_val.numel() == 0:
            raise QtoolError(f"{type(self).__name__} has no observed range yet: run training or observe() first")
        mn = torch.clamp(self.min_val, max=0.0)
        mx = torch.clamp(self.max_val, min=0.0)
        if self.symmetric:
            scale = torch.maximum(-mn, mx) / float(self.qmax)
            zp = torch.zeros_like(scale)
        else:
            scale = (mx - mn) / float(self.qmax - self.qmin)
        scale = torch.where(scale > 0, scale, torch.full_like(scale, _UNIT_RANGE_FALLBACK)).float()
        if not self.symmetric:
            zp = torch.clamp(torch.round(self.qmin - mn / scale), self.qmin, self.qmax)
        return scale, zp

    def extra_repr(self) -> str:
        return super().extra_repr() + f", symmetric={self.symmetric}"


class EMAFakeQuant(MinMaxFakeQuant):
    """Range observer with exponential moving averages of batch min/max (Jacob et al. 2018)."""

    def __init__(self, bits: int = 8, signed: bool = True, axis: int | None = None, symmetric: bool = False,
                 narrow_range: bool = False, quant_delay: int = 0, decay: float = 0.99):
        super().__init__(bits, signed, axis, symmetric, narrow_range, quant_delay)
        if not 0.0 <= decay < 1.0:
            raise ValueError("decay must be in [0, 1)")
        self.decay = decay

    @torch.no_grad()
    def _combine(self, mn: torch.Tensor, mx: torch.Tensor) -> None:
        self.min_val = self.decay * self.min_val + (1 - self.decay) * mn
        self.max_val = self.decay * self.max_val + (1 - self.decay) * mx


class LSQFakeQuant(FakeQuant):
    """Learned step size (Esser et al. 2020): scale is a Parameter, zp 0.

    Initialized from the first batch to 2 * mean|x| / sqrt(qmax); its gradient is scaled by
    1 / sqrt(N * qmax), N = elements per scale. Per-channel needs `num_channels` up front so the
    parameter exists before an optimizer is built.
    """

    def __init__(self, bits: int = 8, signed: bool = True, axis: int | None = None, narrow_range: bool = False,
                 quant_delay: int = 0, num_channels: int | None = None, init_scale: float | None = None):
        super().__init__(bits, signed, axis, narrow_range, quant_delay)
        if axis is not None and num_channels is None:
            raise ValueError("per-channel LSQ needs num_channels")
        shape = () if axis is None else (num_channels,)
        self.scale = nn.Parameter(torch.full(shape, 1.0 if init_scale is None else init_scale))
        self.register_buffer("initialized", torch.tensor(init_scale is not None))
        # A Python mirror of the buffer, branched on instead of bool(buffer): torch.compile guards on it
        # (one recompile when it flips) instead of breaking the graph at every quantizer.
        self._ready = init_scale is not None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Set the step from `x` (the paper's 2 mean|x| / sqrt(qmax), per channel on `axis`)."""
        a = x.detach().float().abs()
        mean_abs = a.mean() if self.axis is None else a.mean(dim=_reduce_dims(a, self.axis))
        self.scale.copy_((2 * mean_abs / math.sqrt(self.qmax)).clamp_min(_MIN_LEARNED))
        self.initialized.fill_(True)
        self._ready = True

    def _observe(self, x: torch.Tensor) -> None:
        if not self._ready:
            self.init_from(x)

    def _scale_zp(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._ready:
            raise QtoolError("LSQFakeQuant scale not initialized: run a batch through it first")
        s = self.scale.clamp_min(_MIN_LEARNED)
        return s, torch.zeros_like(s.detach())

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        self._observe(x)  # eval before any training batch still gets a data-derived scale
        s, zp = self._scale_zp()
        n = x.numel() if self.axis is None else x.numel() // x.shape[self.axis]
        g = 1.0 / math.sqrt(n * self.qmax)
        s_graded = _exact_with_grad_of(s, s * g)  # forward value exactly s, gradient scaled by g
        return fake_quant(x, s_graded, zp, self.qmin, self.qmax, self.axis)


class PACTFakeQuant(FakeQuant):
    """PACT activation quantizer (Choi et al. 2018): clip to [0, alpha], alpha learned.

    Unsigned, scale = alpha / (2^b - 1), zp 0. Gradient to alpha is 1 where x >= alpha (the
    paper's STE), and straight-through for x inside [0, alpha]. `learn_alpha=False` with alpha 1
    is DoReFa's activation quantizer.
    """

    def __init__(self, bits: int = 8, alpha: float = 10.0, quant_delay: int = 0, learn_alpha: bool = True):
        super().__init__(bits, signed=False, axis=None, narrow_range=False, quant_delay=quant_delay)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)), requires_grad=learn_alpha)

    def _scale_zp(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alpha.clamp_min(_MIN_LEARNED)
        return a / float(self.qmax), torch.zeros((), device=a.device)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self._scale_zp()
        y = fake_quant(x, scale.detach(), zp, self.qmin, self.qmax)
        saturated = (x >= self.alpha.detach()).to(x.dtype)
        return y + (self.alpha - self.alpha.detach()) * saturated  # + exactly 0, carries d/d alpha


class DoReFaWeightFakeQuant(FakeQuant):
    """DoReFa weights on a zero-including symmetric grid (see the module docstring).

    Without `magnitude`: the paper's form, per tensor, u = tanh(w) / max|tanh(w)| in [-1, 1],
    scale 1/qmax. With `magnitude` (one value, or one per channel of `axis`): u is normalized per
    channel and multiplied by that fixed magnitude (scale = magnitude / qmax), which `qtool qat`
    uses with the channel's initial max|w|: with BN folded there is no BatchNormalization left to
    absorb DoReFa's [-1, 1] weight range. An all-zero magnitude falls back to qmax (scale 1).
    """

    def __init__(self, bits: int = 4, magnitude: torch.Tensor | None = None, axis: int | None = None,
                 quant_delay: int = 0):
        super().__init__(bits, signed=True, axis=axis, narrow_range=True, quant_delay=quant_delay)
        if magnitude is None:
            if axis is not None:
                raise ValueError("per-channel DoReFa needs the channels' magnitude")
            self.register_buffer("magnitude", torch.tensor(1.0))
        else:
            m = magnitude.detach().float()
            self.register_buffer("magnitude", torch.where(m > 0, m, torch.full_like(m, float(self.qmax))))

    def _scale_zp(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.magnitude / float(self.qmax)
        return s, torch.zeros_like(s)

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(w)
        dims = list(range(w.dim())) if self.axis is None else [d for d in range(w.dim()) if d != self.axis]
        norm = t.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12)  # an all-zero weight: 0 / eps = 0
        mag = self.magnitude if self.axis is None else self.magnitude.reshape(
            [-1 if d == self.axis else 1 for d in range(w.dim())])
        s, zp = self._scale_zp()
        return fake_quant(t / norm * mag, s, zp, self.qmin, self.qmax, self.axis)


class BNNWeightFakeQuant(FakeQuant):
    """Binary weights sign(w) * mean|w| per output channel (axis), gradient hardtanh-STE * mean|w|.

    `sign(0)` is +1. The per-channel scale depends on the weight, so `qparams()` reports the
    scale of the last weight seen by forward (run one forward before exporting).
    """

    def __init__(self, axis: int = 0, quant_delay: int = 0):
        super().__init__(bits=2, signed=True, axis=axis, narrow_range=True, quant_delay=quant_delay)
        self.bits = 1  # codes +-1 in an int8 container; qmin, qmax = -1, 1 from the 2-bit narrow range
        self.register_buffer("last_scale", torch.empty(0))

    def _scale_zp(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.last_scale.numel() == 0:
            raise QtoolError("BNNWeightFakeQuant has seen no weight yet: run forward once first")
        s = torch.where(self.last_scale > 0, self.last_scale, torch.ones_like(self.last_scale))
        return s, torch.zeros_like(s)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "last_scale" in state_dict:
            self.last_scale = torch.empty_like(state_dict[prefix + "last_scale"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        alpha = w.abs().mean(dim=_reduce_dims(w, self.axis))
        self.last_scale = alpha.detach().float()
        a = _per_axis_view(alpha, w, self.axis)
        # An all-zero channel has alpha 0: code 0 keeps it 0 with a valid (positive) scale.
        codes = torch.where(w >= 0, 1.0, -1.0) * (a.detach() > 0)
        exact = codes * _per_axis_view(self._scale_zp()[0], w, self.axis).to(w.dtype)
        return _exact_with_grad_of(exact, F.hardtanh(w) * a)
