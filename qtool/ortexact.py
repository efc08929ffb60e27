"""Eval-mode emulation of onnxruntime's integer kernels, for the fake-quant model of QAT.

A fake-quant layer computes `conv(dq(x), dq(w)) + dq(b)` in float32 and rounds the result to the
output grid. onnxruntime's CPU kernels for the same QDQ group accumulate the integer codes exactly
and requantize once in float32. Both round the same real number, but float error breaks rounding
ties differently now and then (about once per image on ResNet-20); at 4 bits one flipped code is a
whole step, and it cascades: W4A4 ResNet-20 logits were 22 output steps apart on 5k images.

So in eval mode the quantized Conv / Gemm / Add / GlobalAveragePool of a `LiftedModule` compute what
the onnxruntime kernel computes (MLAS, x86; checked against onnxruntime on random and exhaustive
inputs in tests/test_ortexact.py):

- QLinearConv, QGemm:  acc = sum (x_q - z_x) w_q + b_q (exact);
  y_q = clamp(rne(float32(acc) * M) + z_y),  M = float32(float32(s_x s_w) / s_y) per output channel.
- QLinearAdd (the AVX2 kernel):  r_a = s_a / s_c, r_b = s_b / s_c,  f = z_c - fma(r_a, z_a, r_b z_b),
  y_q = clamp(rne(fma(a_q, r_a, fma(b_q, r_b, f)))), every step rounded to float32.
- QLinearGlobalAveragePool:  y_q = clamp(rne(float32(sum (x_q - z_x)) * s_x / (s_y N)) + z_y).

Each override returns the dequantized output `(y_q - z_y) s_y`, which the layer's output fake-quant
maps back to exactly `y_q` (and narrows to its b-bit range, as the exported Clip does). Training is
untouched: overrides run only when the module is in eval mode. A group onnxruntime would not fuse
(an output that is not quantized, a Relu before a Q with a zero point above the container minimum,
other activations) keeps the float fake-quant path. The overrides snapshot the scales and zero points
at install time (qtool.qat installs them once training is over); after training a module further,
install them again.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qtool.lift_ops import run_op
from qtool.plan import TensorQuant

__all__ = ["ExactConv", "ExactAdd", "ExactGlobalAveragePool", "install_exact_eval"]

_FLOAT32_EXACT = 2.0**24  # integers up to this magnitude are exact in float32
_CONTAINER = {True: (-128, 127), False: (0, 255)}


def _scalar(tq: TensorQuant) -> tuple[np.float32, int]:
    return np.float32(tq.scale), int(tq.zero_point)


def _dequantized(codes: torch.Tensor, z: int, s: np.float32) -> torch.Tensor:
    return (codes - z) * torch.tensor(s)


def _channel(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Per-channel values shaped to broadcast along `axis`."""
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _round_clamp(v: torch.Tensor, z: int, signed: bool) -> torch.Tensor:
    lo, hi = _CONTAINER[signed]
    return (torch.round(v) + z).clamp(lo, hi)


class ExactConv(nn.Module):
    """QLinearConv / QGemm in place of a fake-quant Conv or Gemm (x, w, b are fake-quant values)."""

    def __init__(self, op: str, attrs: dict, x: TensorQuant, w: TensorQuant, y: TensorQuant):
        super().__init__()
        self.op, self.attrs = op, attrs
        self.s_x, self.z_x = _scalar(x)
        self.s_y, self.z_y = _scalar(y)
        self.y_signed = y.signed
        s_w = np.asarray(w.scale, np.float32).reshape(-1)
        self.register_buffer("s_w", torch.from_numpy(s_w), persistent=False)
        s_b = (self.s_x * s_w).astype(np.float32)
        self.register_buffer("s_b", torch.from_numpy(s_b), persistent=False)
        self.register_buffer("m", torch.from_numpy((s_b / self.s_y).astype(np.float32)), persistent=False)
        self.x_span = max(abs(lo - self.z_x) for lo in _CONTAINER[x.signed])

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        cx = torch.round(x / torch.tensor(self.s_x))  # x_q - z_x
        cw = torch.round(w / _channel(self.s_w, w.dim(), 0))
        # float32 sums of integers are exact below 2^24; beyond that accumulate in float64
        bound = cw.abs().reshape(cw.shape[0], -1).sum(1).max() * self.x_span
        dtype = torch.float32 if float(bound) < _FLOAT32_EXACT else torch.float64
        if self.op == "Conv":
            acc = run_op("Conv", self.attrs, False, cx.to(dtype), cw.to(dtype), None)
            axis = 1
        else:
            acc = F.linear(cx.to(dtype), cw.to(dtype))
            axis = acc.dim() - 1
        acc = acc.double()
        if b is not None:
            q_b = torch.round(b.double() / self.s_b.double())
            acc = acc + _channel(q_b, acc.dim(), axis)
        v = acc.float() * _channel(self.m, acc.dim(), axis)
        return _dequantized(_round_clamp(v, self.z_y, self.y_signed), self.z_y, self.s_y)


def _fma(a: torch.Tensor, b, c) -> torch.Tensor:
    """float32 fused multiply-add: the float64 result is exact for these operands, rounded once."""
    return (a.double() * float(b) + (c.double() if isinstance(c, torch.Tensor) else float(c))).float()


class ExactAdd(nn.Module):
    """QLinearAdd of two quantized tensors (same shape)."""

    def __init__(self, a: TensorQuant, b: TensorQuant, y: TensorQuant):
        super().__init__()
        self.s_a, self.z_a = _scalar(a)
        self.s_b, self.z_b = _scalar(b)
        self.s_y, self.z_y = _scalar(y)
        self.y_signed = y.signed
        self.r_a = np.float32(self.s_a / self.s_y)
        self.r_b = np.float32(self.s_b / self.s_y)
        rb_zb = np.float32(self.r_b * np.float32(self.z_b))
        fma_a = np.float32(np.float64(self.r_a) * self.z_a + np.float64(rb_zb))
        self.fixed = np.float32(np.float32(self.z_y) - fma_a)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:  # broadcasting runs other MLAS loops: keep the float path
            return a + b
        qa = torch.round(a / torch.tensor(self.s_a)) + self.z_a
        qb = torch.round(b / torch.tensor(self.s_b)) + self.z_b
        v = _fma(qa, self.r_a, _fma(qb, self.r_b, self.fixed))  # z_y is already inside `fixed`
        return _dequantized(_round_clamp(v, 0, self.y_signed), self.z_y, self.s_y)


class ExactGlobalAveragePool(nn.Module):
    """QLinearGlobalAveragePool."""

    def __init__(self, x: TensorQuant, y: TensorQuant):
        super().__init__()
        self.s_x, self.z_x = _scalar(x)
        self.s_y, self.z_y = _scalar(y)
        self.y_signed = y.signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(np.prod(x.shape[2:]))
        acc = torch.round(x / torch.tensor(self.s_x)).double().sum(dim=tuple(range(2, x.dim())), keepdim=True)
        scale = np.float32(self.s_x / np.float32(self.s_y * np.float32(n)))
        v = acc.float() * torch.tensor(scale)
        return _dequantized(_round_clamp(v, self.z_y, self.y_signed), self.z_y, self.s_y)


def _absorbs(tq: TensorQuant) -> bool:
    """onnxruntime drops a Relu before a Q only when the Q's zero point is the container minimum."""
    return tq.zero_point == _CONTAINER[tq.signed][0]


def install_exact_eval(lifted, quant_of: Callable[[str], TensorQuant | None],
                       weight_quant_of: Callable[[nn.Module], TensorQuant | None]) -> list[str]:
    """Give the quantized Conv/Gemm/Add/GlobalAveragePool steps of `lifted` their exact eval path.

    `quant_of(tensor)` is the TensorQuant a tensor is fake-quantized with (None: float);
    `weight_quant_of(module)` the weight TensorQuant of a replaced Conv+BN group that has an `exact`
    slot (qtool.qat's folded Conv->BatchNormalization). Returns the output tensors now emulated.
    """
    steps = lifted.step_table()
    readers: dict[str, list[tuple[str, tuple, tuple]]] = {}
    for op, _, ins, outs in steps:
        for t in ins:
            readers.setdefault(t, []).append((op, ins, outs))

    def output_quant(y: str) -> TensorQuant | None:
        tq = quant_of(y)
        if tq is not None:
            return tq
        r = readers.get(y, [])
        if len(r) == 1 and r[0][0] == "Relu" and y not in lifted.output_names:
            tq = quant_of(r[0][2][0])
            return tq if tq is not None and _absorbs(tq) else None
        return None

    done = []
    for op, attrs, ins, outs in steps:
        y = output_quant(outs[0])
        if y is None:
            continue
        if op in ("Conv", "Gemm") and len(ins) >= 2:
            if op == "Gemm" and not (attrs.get("transB", 0) and not attrs.get("transA", 0)
                                     and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0):
                continue
            x, w = quant_of(ins[0]), quant_of(ins[1])
            b_ok = len(ins) < 3 or lifted.quantizer(ins[2]) is not None  # int32 bias, as exported
            if x is not None and w is not None and b_ok:
                lifted.set_eval_override(outs[0], ExactConv(op, attrs, x, w, y))
                done.append(outs[0])
        elif op == "Replaced" and hasattr(attrs["module"], "exact"):
            x, w = quant_of(ins[0]), weight_quant_of(attrs["module"])
            if x is not None and w is not None:
                attrs["module"].exact = ExactConv("Conv", attrs["module"].conv_attrs, x, w, y)
                done.append(outs[0])
        elif op == "Add" and len(ins) == 2:
            a, b = quant_of(ins[0]), quant_of(ins[1])
            if a is not None and b is not None and ins[0] != ins[1]:
                lifted.set_eval_override(outs[0], ExactAdd(a, b, y))
                done.append(outs[0])
        elif op == "GlobalAveragePool":
            x = quant_of(ins[0])
            if x is not None:
                lifted.set_eval_override(outs[0], ExactGlobalAveragePool(x, y))
                done.append(outs[0])
    return done
