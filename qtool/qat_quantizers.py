"""The quantizers `qtool.qat` (and `qtool.dynamic`) need beyond `qtool.fakequant`: weight observers
(minmax), LSQ with a fixed calibrated zero point, pass-through sharing, the int32 bias
rounding the exported DequantizeLinear applies, and the plan entry of a trained quantizer."""
from __future__ import annotations

import torch
import torch.nn as nn

from qtool.errors import QtoolError
from qtool.plan import BIAS_CODE_LIMIT
from qtool.fakequant import FakeQuant, LSQFakeQuant, QParams, fake_quant
from qtool.plan import TensorQuant, range_quant

__all__ = ["lsq_weight", "lsq_activation", "WeightMinMaxFakeQuant", "LSQAffineFakeQuant", "SharedFakeQuant", "BiasFakeQuant",
           "in_quant_delay", "root_quantizer", "tensor_quant"]


def lsq_weight(bits: int, w: torch.Tensor, axis: int | None, quant_delay: int = 0) -> LSQFakeQuant:
    """LSQ weights (symmetric narrow range, zp 0; per channel on `axis`) at the LSQ paper's initial step
    2 mean|w| / sqrt(qmax) of the weight `w`: `qtool qat --algo lsq` and the dynamic trainer."""
    fq = LSQFakeQuant(bits, signed=True, axis=axis, narrow_range=True, quant_delay=quant_delay,
                      num_channels=None if axis is None else w.shape[axis])
    fq.init_from(w)
    return fq


def lsq_activation(bits: int, rmin: float, rmax: float, quant_delay: int = 0,
                   start: tuple[float, int] | None = None) -> FakeQuant:
    """LSQ activations starting from PTQ's calibrated parameters at `bits` (uint8 as PTQ): zp 0 where
    the calibrated range gives it, else the calibrated zero point held fixed (`LSQAffineFakeQuant`), so
    signedness and QDQ types stay PTQ's. `start`: (scale, zero point) to begin at instead (a PTQ plan's).
    `qtool qat --algo lsq` and the dynamic trainer."""
    if start is None:
        tq = range_quant(rmin, rmax, bits)
        start = float(tq.scale), int(tq.zero_point)
    scale, zp = start
    if zp == 0:
        return LSQFakeQuant(bits, signed=False, quant_delay=quant_delay, init_scale=scale)
    return LSQAffineFakeQuant(bits, zp, scale, quant_delay)


class WeightMinMaxFakeQuant(FakeQuant):
    """Symmetric narrow-range scale from the current weight (max|w| / qmax per channel), STE."""

    def __init__(self, bits: int, axis: int | None, quant_delay: int = 0):
        super().__init__(bits, signed=True, axis=axis, narrow_range=True, quant_delay=quant_delay)
        self.register_buffer("last_scale", torch.empty(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "last_scale" in state_dict:
            self.last_scale = torch.empty_like(state_dict[prefix + "last_scale"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _scale_zp(self):
        if self.last_scale.numel() == 0:
            raise QtoolError("weight quantizer has seen no weight yet: run forward once first")
        return self.last_scale, torch.zeros_like(self.last_scale)

    def _quantize(self, w):
        a = w.detach().abs()
        amax = a.amax() if self.axis is None else a.amax(dim=[d for d in range(w.dim()) if d != self.axis])
        # An all-zero channel quantizes to 0 with any scale; 1.0 keeps the plan valid (as PTQ does).
        self.last_scale = torch.where(amax > 0, amax / float(self.qmax), torch.ones_like(amax)).float()
        return fake_quant(w, self.last_scale, torch.zeros_like(self.last_scale), self.qmin, self.qmax, self.axis)


class LSQAffineFakeQuant(LSQFakeQuant):
    """LSQ's learned scale with the calibrated (PTQ) zero point held fixed: asymmetric uint8 tensors."""

    def __init__(self, bits: int, zero_point: int, init_scale: float, quant_delay: int = 0):
        super().__init__(bits, signed=False, quant_delay=quant_delay, init_scale=init_scale)
        self.register_buffer("zp", torch.tensor(float(zero_point)))

    def _scale_zp(self):
        s = self.scale.clamp_min(1e-8)
        return s, self.zp


def in_quant_delay(fq: FakeQuant, stepped: bool) -> bool:
    """Whether `fq` is inside its quant_delay this training step (`stepped`: it already ran)."""
    # quant_delay tested first: without one, no data-dependent branch (a torch.compile graph break)
    return bool(fq.quant_delay) and fq.training and int(fq.step) < fq.quant_delay + int(stepped)


class SharedFakeQuant(nn.Module):
    """A pass-through op's output: quantized with the parameters of the tensor it reads, as
    onnxruntime requires (no observing, no step of its own). The root is held out of the module tree."""

    def __init__(self, root: FakeQuant):
        super().__init__()
        self._root = [root]

    @property
    def root(self) -> FakeQuant:
        return self._root[0]

    def forward(self, x):
        r = self.root
        return x if in_quant_delay(r, stepped=True) else r._quantize(x)


def root_quantizer(fq: nn.Module) -> nn.Module:
    """The quantizer that owns the parameters: a pass-through tensor's `SharedFakeQuant` reads its root's."""
    return fq.root if isinstance(fq, SharedFakeQuant) else fq


def _scale_of(fq: nn.Module) -> torch.Tensor:
    return root_quantizer(fq)._scale_zp()[0].detach().float()


class BiasFakeQuant(nn.Module):
    """int32 bias with scale s_in * s_w, zero point 0, as passes.qdq writes it: round(b / s) in
    float64, dequantized as float32(q) * s (onnxruntime's int32 DequantizeLinear)."""

    def __init__(self, act_fq: nn.Module, weight_fq: FakeQuant):
        super().__init__()
        self._refs = [act_fq, weight_fq]

    def forward(self, b):
        a, w = self._refs
        ra = root_quantizer(a)
        if in_quant_delay(ra, stepped=False) or in_quant_delay(w, stepped=True):
            return b
        s = _scale_of(a) * _scale_of(w)  # float32 product == passes.qdq's rounded float64 product
        q = torch.round(b.detach().double() / s.double()).clamp(-float(BIAS_CODE_LIMIT), float(BIAS_CODE_LIMIT))
        exact = q.float() * s
        return exact + (b - b.detach())  # value exactly `exact`, straight-through gradient


def tensor_quant(kind: str, fq: FakeQuant) -> TensorQuant:
    """The plan entry (`kind`: weight / activation) of a trained quantizer: its qparams as exported."""
    qp: QParams = fq.qparams()
    if qp.axis is None:
        scale, zp = float(qp.scale.reshape(())), int(qp.zero_point.reshape(()))
    else:
        scale, zp = tuple(float(v) for v in qp.scale), tuple(int(v) for v in qp.zero_point)
    # BNN's 1-bit codes +-1 (and 0 for an all-zero channel) are the 2-bit narrow range [-1, 1].
    tq = TensorQuant(kind, max(qp.bits, 2), qp.signed, "per_tensor" if qp.axis is None else "per_channel",
                     qp.axis, scale, zp, bool(fq.narrow_range))
    assert tq.qrange == (qp.qmin, qp.qmax), (tq.qrange, qp)
    return tq
