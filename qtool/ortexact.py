"""Eval-mode emulation of onnxruntime's integer kernels, for the fake-quant model of QAT.

A fake-quant layer computes `conv(dq(x), dq(w)) + dq(b)` in float32 and rounds the result to the
output grid. onnxruntime's CPU kernels for the same QDQ group accumulate the integer codes exactly
and requantize once in float32. Both round the same real number, but float error breaks rounding
ties differently now and then (about once per image on ResNet-20); at 4 bits one flipped code is a
whole step, and it cascades: W4A4 ResNet-20 logits were 22 output steps apart on 5k images.

So in eval mode the quantized Conv / Gemm / MatMul / Add / Mul / Sigmoid / GlobalAveragePool / Softmax of a
`LiftedModule` compute what
the onnxruntime kernel computes (MLAS, x86; checked against onnxruntime on random and exhaustive
inputs in tests/test_ortexact.py):

- QLinearConv, QGemm:  acc = sum_k (x_q - z_x) w_q + b_q, exact on CPUs with VNNI and in depthwise
  QLinearConv. Without VNNI, MLAS reads raw uint8 codes u (int8 activations: x_q + 128, z_u = z_x + 128;
  padding: z_u) and sums products in pairs along K, each pair saturated to int16:
  acc = sum_j sat16(u_2j w_2j + u_2j+1 w_2j+1) - z_u sum_k w_q + b_q, K = (kernel offsets, c) within
  a group for QLinearConv, e.g. (kh, kw, c) (an odd K pairs its last element with 0). qtool.ortkernels
  probes which, once per process; the emulation is the exact sum plus sat16(p) - p for the few pairs
  whose (|w_a| + |w_b|) max(u) can exceed 32767.
  y_q = clamp(rne(float32(acc) * M) + z_y),  M = float32(float32(s_x s_w) / s_y) per output channel.
- QLinearAdd (the AVX2 kernel):  r_a = s_a / s_c, r_b = s_b / s_c,  f = z_c - fma(r_a, z_a, r_b z_b),
  y_q = clamp(rne(fma(a_q, r_a, fma(b_q, r_b, f)))), every step rounded to float32.
- QLinearGlobalAveragePool:  y_q = clamp(rne(float32(sum (x_q - z_x)) * s_x / (s_y N)) + z_y).
- QLinearSoftmax: run by onnxruntime on the codes (ExactSoftmax: its exp table, float32 row sum and
  floor(1 / s_y) for 1 / s_y; a formula of those matched but for near-ties, which LayerNorm amplifies).
- QLinearMul: the exact product of the codes, then float32 multiply and add (ExactMul).
- QLinearSigmoid: onnxruntime's own 256-entry table (ExactLookup: MLAS's logistic is an
  approximation of its own; on the inputs tested torch's sigmoid gave the same codes).
- Float ops whose torch result can differ in the last bits (FLOAT_ON_ORT: LayerNorm, softmax,
  erf, reductions, ...) run on onnxruntime's kernels (OrtFloatOp).

Each override returns the dequantized output `(y_q - z_y) s_y`, which the layer's output fake-quant
maps back to exactly `y_q` (and narrows to its b-bit range, as the exported Clip does). Training is
untouched: overrides run only when the module is in eval mode. A group onnxruntime would not fuse
(an output that is not quantized, a Relu before a Q with a zero point above the container minimum,
a Clip (ReLU6) whose range does not hold the Q's whole range, other activations) keeps the float
fake-quant path. The overrides snapshot the scales and zero points at install time (qtool.qat
installs them once training is over); after training a module further, install them again.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qtool.lift_ops import conv_window, run_op
from qtool.ortkernels import (INT16_MAX, PAIRS, PAIRS_CHW, PAIRS_HWC, accumulation, pair_saturation,
                              saturable_pairs)
from qtool.plan import TensorQuant

__all__ = ["ExactConv", "ExactMatMul", "ExactAdd", "ExactMul", "ExactLookup", "ExactGlobalAveragePool", "ExactSoftmax",
           "OrtFloatOp", "install_exact_eval"]

_FLOAT32_EXACT = 2.0**24  # integers up to this magnitude are exact in float32
_GATHER_LIMIT = 2**22  # input codes gathered at once to emulate saturating pairs (16 MiB of float32)
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
    """QLinearConv / QGemm in place of a fake-quant Conv or Gemm (x, w, b are fake-quant values).

    `saturate`: None sums the way onnxruntime's kernel does on this CPU (qtool.ortkernels' probe),
    False exactly, True as MLAS without VNNI does whatever the CPU (int16-saturated pairs; a depthwise
    conv stays exact, as measured there).
    """

    def __init__(self, op: str, attrs: dict, x: TensorQuant, w: TensorQuant, y: TensorQuant,
                 saturate: bool | None = None):
        super().__init__()
        self.op, self.attrs = op, attrs
        self.s_x, self.z_x = _scalar(x)
        self.s_y, self.z_y = _scalar(y)
        self.x_signed, self.y_signed = x.signed, y.signed
        self.saturate = saturate
        s_w = np.asarray(w.scale, np.float32).reshape(-1)
        self.register_buffer("s_w", torch.from_numpy(s_w), persistent=False)
        s_b = (self.s_x * s_w).astype(np.float32)
        self.register_buffer("s_b", torch.from_numpy(s_b), persistent=False)
        self.register_buffer("m", torch.from_numpy((s_b / self.s_y).astype(np.float32)), persistent=False)
        self.x_span = max(abs(lo - self.z_x) for lo in _CONTAINER[x.signed])
        # MLAS reads uint8 codes: int8 activations are shifted by 128 (codes and zero point)
        self.u_zero = self.z_x + (128 if x.signed else 0)

    def pair_order(self, cw: torch.Tensor) -> str | None:
        """The K order of the int16-saturated pairs this layer's kernel sums (None: exact sums)."""
        if self.saturate is False:
            return None
        if self.op == "Gemm":
            kernel, pairs = "QGemm", PAIRS
        else:  # onnxruntime's depthwise test: one input and one output channel per group
            depthwise = cw.shape[1] == 1 and cw.shape[0] == self.attrs.get("group", 1)
            kernel, pairs = ("QLinearConv depthwise", None) if depthwise else ("QLinearConv", PAIRS_HWC)
        if self.saturate:
            return pairs
        found = accumulation(kernel, self.x_signed)
        return found if found in (PAIRS, PAIRS_HWC, PAIRS_CHW) else None

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self.op == "Gemm" and not self.attrs.get("transB", 0):
            w = w.t()  # (K, N), per-channel on axis 1 -> (N, K) as F.linear takes it
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
        order = self.pair_order(cw)
        if order is not None:
            u = cx + self.u_zero  # the raw codes the kernel reads
            if self.op == "Conv":
                _add_conv_saturation(acc, u, cw, self.attrs, self.u_zero, order)
            else:
                _add_gemm_saturation(acc, u, cw)
        if b is not None:
            q_b = torch.round(b.double() / self.s_b.double())
            acc = acc + _channel(q_b, acc.dim(), axis)
        v = acc.float() * _channel(self.m, acc.dim(), axis)
        return _dequantized(_round_clamp(v, self.z_y, self.y_signed), self.z_y, self.s_y)


class ExactMatMul(nn.Module):
    """QLinearMatMul in place of a fake-quant MatMul: B is a quantized activation (attention's Q K^T
    and P V: uint8 x uint8, exact sums) or a constant weight (uint8 x int8: int16-saturated pairs along
    K on CPUs without VNNI, as QGemm, with a per-column scale allowed).
    acc = sum_k (a_q - z_a)(b_q - z_b),  y_q = clamp(rne(float32(acc) * M) + z_y),  M = float32(float32(s_a s_b) / s_y).
    """

    def __init__(self, a: TensorQuant, b: TensorQuant, y: TensorQuant, b_is_weight: bool):
        super().__init__()
        self.s_a, self.z_a = _scalar(a)
        self.s_y, self.z_y = _scalar(y)
        self.y_signed, self.a_signed = y.signed, a.signed
        s_b = np.asarray(b.scale, np.float32).reshape(-1)
        self.register_buffer("s_b", torch.from_numpy(s_b), persistent=False)
        self.register_buffer("m", torch.from_numpy(((self.s_a * s_b).astype(np.float32) / self.s_y).astype(np.float32)),
                             persistent=False)
        self.b_is_weight = b_is_weight
        self.u_zero = self.z_a + (128 if a.signed else 0)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ca = torch.round(a / torch.tensor(self.s_a)).double()  # a_q - z_a
        cb = torch.round(b / self.s_b).double()  # b_q - z_b (per column: the last axis)
        acc = torch.matmul(ca, cb)  # float64: exact for these integer sums
        if self.b_is_weight and cb.dim() == 2 and accumulation("QGemm", self.a_signed) == PAIRS:
            _add_gemm_saturation(acc, ca + self.u_zero, cb.T.contiguous())
        v = acc.float() * self.m
        return _dequantized(_round_clamp(v, self.z_y, self.y_signed), self.z_y, self.s_y)


def _saturable(cw: torch.Tensor, group: int, order: str, u_max: int):
    """qtool.ortkernels.saturable_pairs grouped by pair of input rows (several output channels share one):
    per candidate its output channel, pair index and weights (torch, cw's device); the distinct pairs'
    rows (numpy). None when no pair can saturate."""
    out, row_a, row_b, w_a, w_b = saturable_pairs(cw.detach().cpu().numpy().astype(np.int64), group, order, u_max)
    if out.size == 0:
        return None
    rows, pair = np.unique(np.stack([row_a, row_b], 1), axis=0, return_inverse=True)
    dev = cw.device
    return (torch.from_numpy(out).to(dev), torch.from_numpy(pair.reshape(-1)).to(dev), rows[:, 0], rows[:, 1],
            torch.from_numpy(w_a).to(dev, torch.float32), torch.from_numpy(w_b).to(dev, torch.float32))


def _saturated(code_a: torch.Tensor, code_b: torch.Tensor, pair: torch.Tensor, w_a: torch.Tensor,
               w_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(candidate, position, sat16(p) - p) wherever a candidate's pair sum p saturates.

    code_a, code_b: (pairs, positions) input codes of each pair's two elements; pair, w_a, w_b: each
    candidate's pair and weights. Sums are formed only at the positions where the pair's largest weights
    could saturate: with real activations both codes of a pair are rarely large at once.
    """
    n = code_a.shape[0]
    top_a = torch.zeros(n, device=w_a.device).scatter_reduce(0, pair, w_a.abs(), "amax")
    top_b = torch.zeros(n, device=w_b.device).scatter_reduce(0, pair, w_b.abs(), "amax")
    j, pos = (code_a * top_a[:, None] + code_b * top_b[:, None] > INT16_MAX).nonzero(as_tuple=True)  # j sorted
    count = torch.bincount(j, minlength=n)
    reps = count[pair]  # positions to evaluate per candidate: its pair's
    cand = torch.repeat_interleave(torch.arange(pair.numel(), device=pair.device), reps)
    k = (torch.cumsum(count, 0) - count)[pair][cand] + torch.arange(cand.numel(), device=pair.device) \
        - (torch.cumsum(reps, 0) - reps)[cand]
    jj, pp = j[k], pos[k]
    corr = pair_saturation(code_a[jj, pp] * w_a[cand] + code_b[jj, pp] * w_b[cand])  # exact in float32
    hit = corr != 0
    return cand[hit], pp[hit], corr[hit]


def _add_saturation(found, codes: Callable, scatter: Callable, positions: int) -> None:
    """For the pairs `found` (_saturable): codes(rows) -> (len(rows), positions) input codes,
    scatter(position, output channel, correction) adds into the accumulator."""
    out, pair, rows_a, rows_b, w_a, w_b = found
    step = max(1, _GATHER_LIMIT // max(positions, 1))
    for lo in range(0, len(rows_a), step):
        sel = ((pair >= lo) & (pair < lo + step)).nonzero(as_tuple=True)[0]
        cand, pos, corr = _saturated(codes(rows_a[lo:lo + step]), codes(rows_b[lo:lo + step]), pair[sel] - lo,
                                     w_a[sel], w_b[sel])
        if corr.numel():
            scatter(pos, out[sel[cand]], corr.double())


def _add_conv_saturation(acc: torch.Tensor, u: torch.Tensor, cw: torch.Tensor, attrs: dict, u_zero: int,
                         order: str) -> None:
    """acc += the int16 saturation of the pairs that saturate (acc: N, M, *out float64, contiguous)."""
    kernel = tuple(cw.shape[2:])
    pad, strides, dilations = conv_window(attrs, u, kernel)
    u = F.pad(u, pad, value=float(u_zero))  # onnxruntime pads with the zero point's code
    found = _saturable(cw, attrs.get("group", 1), order, int(u.max()))
    if found is None:
        return
    nd, n = len(kernel), u.shape[0]
    u = u.permute(1, *range(2, 2 + nd), 0).contiguous()  # C, *padded, N: the batch is gathered contiguously
    for d, (k, s, dl) in enumerate(zip(kernel, strides, dilations)):
        u = u.unfold(1 + d, (k - 1) * dl + 1, s)  # windows go last: C, *out, N, *window
    u = u[(Ellipsis,) + tuple(slice(None, None, dl) for dl in dilations)]
    u = u.permute(0, *range(2 + nd, 2 + 2 * nd), *range(1, 2 + nd))  # C, *kernel, *out, N
    patch = (u.shape[0],) + kernel  # a row indexes the flattened (C, *kernel) patch

    def codes(rows):
        at = tuple(torch.from_numpy(i).to(u.device) for i in np.unravel_index(rows, patch))
        return u[at].reshape(len(rows), -1)  # position = output pixel * N + image

    flat = acc.view(n, acc.shape[1], -1)

    def scatter(pos, out, corr):
        flat.index_put_((pos % n, out, pos // n), corr, accumulate=True)

    _add_saturation(found, codes, scatter, int(np.prod(u.shape[1 + nd:])))


def _add_gemm_saturation(acc: torch.Tensor, u: torch.Tensor, cw: torch.Tensor) -> None:
    """acc += the int16 saturation of the pairs that saturate (acc: ..., N float64 contiguous; u: ..., K)."""
    found = _saturable(cw, 1, PAIRS, int(u.max()))
    if found is None:
        return
    cols = u.reshape(-1, u.shape[-1]).T  # K, positions
    flat = acc.view(-1, acc.shape[-1])
    _add_saturation(found, lambda rows: cols[torch.from_numpy(rows).to(u.device)],
                    lambda pos, out, corr: flat.index_put_((pos, out), corr, accumulate=True), cols.shape[1])


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


class ExactMul(nn.Module):
    """QLinearMul (MLAS's SSE2 kernel; broadcasting as onnxruntime broadcasts): the int32 product of the
    codes, then float32 steps:  y_q = clamp(rne(float32(float32(r M) + z_y))),  r = (a_q - z_a)(b_q - z_b),
    M = float32(float32(s_a s_b) / s_y)."""

    def __init__(self, a: TensorQuant, b: TensorQuant, y: TensorQuant):
        super().__init__()
        self.s_a, _ = _scalar(a)
        self.s_b, _ = _scalar(b)
        self.s_y, self.z_y = _scalar(y)
        self.y_signed = y.signed
        self.ratio = np.float32(np.float32(self.s_a * self.s_b) / self.s_y)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        r = torch.round(a / torch.tensor(self.s_a)) * torch.round(b / torch.tensor(self.s_b))  # exact: |r| < 2^17
        v = (r * torch.tensor(self.ratio)) + torch.tensor(np.float32(self.z_y))  # two float32 roundings, no fma
        return _dequantized(_round_clamp(v, 0, self.y_signed), self.z_y, self.s_y)


class ExactLookup(nn.Module):
    """An elementwise op onnxruntime runs as a 256-entry table over the input codes (QLinearSigmoid:
    MLAS's logistic approximation, not torch's sigmoid, then quantized). The table is onnxruntime's own:
    the 256 codes run once through DQ -> op -> Q on the CPU execution provider."""

    def __init__(self, op: str, x: TensorQuant, y: TensorQuant):
        super().__init__()
        self.s_x, self.z_x = _scalar(x)
        self.s_y, self.z_y = _scalar(y)
        self.x_signed = x.signed
        lo, _ = _CONTAINER[x.signed]
        codes = np.arange(lo, lo + 256)
        dt = np.int8 if x.signed else np.uint8
        sess = _qdq_session(op, {}, self.s_x, self.z_x, x.signed, self.s_y, self.z_y, y.signed, 1)
        table = sess.run(None, {"x": codes.astype(dt)})[0].astype(np.float32)
        self.register_buffer("table", torch.from_numpy(table), persistent=False)
        self.lo = lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = (torch.round(x / torch.tensor(self.s_x)) + self.z_x - self.lo).long().clamp(0, 255)
        return _dequantized(self.table.to(x.device)[idx], self.z_y, self.s_y)


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


class _RunsOnnxruntime(nn.Module):
    """An eval-mode override that runs onnxruntime sessions, built on first use and cached by `key`;
    sessions do not pickle or deepcopy, so a copy starts without them."""

    def __init__(self):
        super().__init__()
        self._sessions: dict = {}

    def session(self, key, build: Callable):
        if key not in self._sessions:
            self._sessions[key] = build()
        return self._sessions[key]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_sessions"] = {}
        return state


class ExactSoftmax(_RunsOnnxruntime):
    """com.microsoft QLinearSoftmax, which onnxruntime fuses DQ -> Softmax -> Q into (opset >= 13), run
    by onnxruntime itself on the input codes (a one-node QDQ session with this layer's scales, built once).

    The kernel exponentiates through a table over the 256 code differences, sums the row in float32 and
    scales by floor(1 / s_y), not 1 / s_y: a calibrated output scale of 0.9 / 255 runs as 1 / 283, not
    1 / 283.3, which moves about one element in seventy by a code against a float softmax. A formula
    of those steps (float32 table exp((x_q - max x_q + shift) s_x), a sequential float32 sum) matched
    onnxruntime 1.32 except at near-ties, 2e-5 of the elements of the zoo ViT after QAT, and one
    flipped code grew to 4-7 output steps through the next LayerNormalization; so it is not emulated
    but run. Eval only (no gradient), on the CPU.
    """

    def __init__(self, axis: int, x: TensorQuant, y: TensorQuant):
        super().__init__()
        self.axis = axis
        self.s_x, self.z_x = _scalar(x)
        self.s_y, self.z_y = _scalar(y)
        self.x_signed, self.y_signed = x.signed, y.signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = _CONTAINER[self.x_signed]
        codes = (torch.round(x / torch.tensor(self.s_x)) + self.z_x).clamp(lo, hi)
        dt = np.int8 if self.x_signed else np.uint8
        sess = self.session(x.dim(), lambda: _qdq_session("Softmax", {"axis": self.axis}, self.s_x, self.z_x,
                                                          self.x_signed, self.s_y, self.z_y, self.y_signed, x.dim()))
        out = sess.run(None, {"x": codes.detach().cpu().numpy().astype(dt)})[0]
        return _dequantized(torch.from_numpy(out.astype(np.float32)).to(x.device), self.z_y, self.s_y)


class OrtFloatOp(_RunsOnnxruntime):
    """A float op run by onnxruntime's own CPU kernel in eval mode (FLOAT_ON_ORT).

    Reductions and transcendental functions are computed in each library's own order and
    approximation: torch's LayerNormalization differs from onnxruntime's in the last bit on about a
    third of the elements, and so do softmax and erf now and then. Where such a value sits on a rounding
    tie of a Q after it (directly, or through exact ops such as BERT's Where after its float Softmax) the
    code flips: one code on ~1e-5 of the elements of the zoo ViT's LayerNorm outputs and of BERT's masked
    attention probabilities after QAT, three output steps at the end. Eval only (no gradient), on the
    CPU; one session per input ranks and types.
    """

    def __init__(self, op: str, attrs: dict, opset: int = 17):
        super().__init__()
        self.op, self.attrs, self.opset = op, dict(attrs), opset

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        arrays = [x.detach().cpu().numpy() for x in xs]
        sess = self.session(tuple((a.ndim, a.dtype.str) for a in arrays),
                            lambda: _float_session(self.op, self.attrs, arrays, self.opset))
        out = sess.run(None, {f"x{i}": a for i, a in enumerate(arrays)})[0]
        return torch.from_numpy(out).to(xs[0].device)


# Float ops whose torch result can differ from onnxruntime's in the last bits (reductions, transcendental
# functions); in eval mode they run on onnxruntime (OrtFloatOp). Elementwise + - * / and sqrt are IEEE
# exact in both and stay in torch.
FLOAT_ON_ORT = frozenset({"LayerNormalization", "Softmax", "LogSoftmax", "Erf", "Exp", "Log", "Tanh", "Sigmoid",
                          "Pow", "ReduceMean", "ReduceSum", "InstanceNormalization", "GroupNormalization"})


def _float_session(op: str, attrs: dict, arrays: list[np.ndarray], opset: int):
    from onnx import helper

    names = [f"x{i}" for i in range(len(arrays))]
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), [f"{n}_{d}" for d in range(a.ndim)])
              for n, a in zip(names, arrays)]
    return _session(helper.make_graph([helper.make_node(op, names, ["y"], **attrs)], op.lower(), inputs,
                                      [helper.make_empty_tensor_value_info("y")]), opset)


def _session(graph, opset: int = 17):
    """A one-thread CPU onnxruntime session of `graph`."""
    import onnxruntime as ort
    from onnx import helper

    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _qdq_session(op: str, attrs: dict, s_x, z_x: int, x_signed: bool, s_y, z_y: int, y_signed: bool, rank: int):
    """An onnxruntime session of DQ -> op -> Q on integer codes of any shape of `rank` dimensions: what
    onnxruntime fuses the group into (QLinearSigmoid, QLinearSoftmax) runs on them."""
    from onnx import TensorProto, helper, numpy_helper

    dt = {True: (np.int8, TensorProto.INT8), False: (np.uint8, TensorProto.UINT8)}
    inits = [numpy_helper.from_array(np.array(s_x, np.float32), "sx"),
             numpy_helper.from_array(np.array(z_x, dt[x_signed][0]), "zx"),
             numpy_helper.from_array(np.array(s_y, np.float32), "sy"),
             numpy_helper.from_array(np.array(z_y, dt[y_signed][0]), "zy")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xd"]), helper.make_node(op, ["xd"], ["f"], **attrs),
             helper.make_node("QuantizeLinear", ["f", "sy", "zy"], ["y"])]
    dims = [f"d{i}" for i in range(rank)]
    return _session(helper.make_graph(nodes, op.lower(), [helper.make_tensor_value_info("x", dt[x_signed][1], dims)],
                                      [helper.make_tensor_value_info("y", dt[y_signed][1], dims)], inits))


def _absorbs(tq: TensorQuant) -> bool:
    """onnxruntime drops a Relu before a Q only when the Q's zero point is the container minimum."""
    return tq.zero_point == _CONTAINER[tq.signed][0]


def _clip_absorbed(tq: TensorQuant, lo: torch.Tensor | None, hi: torch.Tensor | None) -> bool:
    """onnxruntime drops a Clip before a Q (ClipQuantFusion) when the Clip's range holds the Q's whole
    container range [s (q_min - z), s (q_max - z)], within float32 epsilon (float32 arithmetic)."""
    f32 = np.float32
    if np.asarray(tq.scale).size != 1:
        return False
    q_min, q_max = _CONTAINER[tq.signed]
    s, z = f32(tq.scale), tq.zero_point
    lower, upper = s * f32(q_min - z), s * f32(q_max - z)
    mn = f32(lo.reshape(-1)[0].item()) if lo is not None else f32(-np.inf)
    mx = f32(hi.reshape(-1)[0].item()) if hi is not None else f32(np.inf)
    eps = np.finfo(np.float32).eps
    return not (eps < mn - lower or eps < upper - mx)


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
        if len(r) != 1 or y in lifted.output_names:
            return None
        op, r_ins, r_outs = r[0]
        if op == "Relu":
            tq = quant_of(r_outs[0])
            return tq if tq is not None and _absorbs(tq) else None
        if op == "Clip" and r_ins[0] == y:  # ReLU6: the kernel's saturation does the clipping
            tq = quant_of(r_outs[0])
            bounds = [lifted.constant(t) if t else None for t in (list(r_ins[1:]) + ["", ""])[:2]]
            if tq is not None and all(b is not None for b, t in zip(bounds, r_ins[1:3]) if t) \
                    and _clip_absorbed(tq, *bounds):
                return tq
        return None

    done = []
    for op, attrs, ins, outs in steps:
        y = output_quant(outs[0])
        # A quantized Softmax / Sigmoid of a quantized input is onnxruntime's QLinear kernel (below);
        # any other of these ops runs in float there, quantized after or not.
        qlinear = op in ("Softmax", "Sigmoid") and y is not None and quant_of(ins[0]) is not None
        if op in FLOAT_ON_ORT and not qlinear and all(ins) and len(outs) == 1 and "_onnx_attrs" in attrs:
            lifted.set_eval_override(outs[0], OrtFloatOp(op, attrs["_onnx_attrs"], lifted.opset))
            done.append(outs[0])
            continue
        if y is None:
            continue
        if op in ("Conv", "Gemm") and len(ins) >= 2:
            if op == "Gemm" and not (not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0
                                     and attrs.get("beta", 1.0) == 1.0):
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
        elif op == "MatMul":
            a, b = quant_of(ins[0]), quant_of(ins[1])
            w = lifted.constant(ins[1])  # a weight (initializer), else None: an activation
            per_column = w is not None and w.dim() == 2 and b is not None and b.axis in (-1, 1)
            if a is not None and b is not None and np.asarray(a.scale).size == 1 \
                    and (np.asarray(b.scale).size == 1 or per_column):
                lifted.set_eval_override(outs[0], ExactMatMul(a, b, y, b_is_weight=w is not None))
                done.append(outs[0])
        elif op == "Mul" and len(ins) == 2:
            a, b = quant_of(ins[0]), quant_of(ins[1])
            if a is not None and b is not None and all(np.asarray(t.scale).size == 1 for t in (a, b)) \
                    and lifted.constant(ins[1]) is None and lifted.constant(ins[0]) is None:
                lifted.set_eval_override(outs[0], ExactMul(a, b, y))
                done.append(outs[0])
        elif op == "Sigmoid":
            x = quant_of(ins[0])
            if x is not None and np.asarray(x.scale).size == 1:
                lifted.set_eval_override(outs[0], ExactLookup(op, x, y))
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
        elif op == "Softmax":
            x = quant_of(ins[0])
            if x is not None and np.asarray(x.scale).size == 1:
                lifted.set_eval_override(outs[0], ExactSoftmax(attrs.get("axis", -1), x, y))
                done.append(outs[0])
    return done
