"""A multi-bit fake-quantized network on the fused graph: the supernet, and the per-candidate QAT model.

`QuantNet` lifts the fused graph (`qtool.lift`) and hooks, at every place the exporter puts a QDQ
pair, a `SwitchQuant` holding one quantizer per bit-width that tensor can take in the space:

- weights: per-bit LSQ (learned step per output channel, symmetric narrow range, zp 0);
- activations: per-bit LSQ unsigned (zp 0) where the FP32 tensor is never negative (after ReLU),
  per-bit EMA min/max asymmetric uint8 otherwise (the network input, residual operands): every
  activation stays unsigned, the U8S8 fast path of onnxruntime.

BatchNorm: the fused graph has BN folded into its Conv/Gemm weights. BN statistics must follow the
bit-widths (a 2-bit layer shifts its outputs' mean and variance), so the supernet keeps a BN *unfolded*
at every Conv/Gemm output: a `ChannelNorm` (a BatchNorm over dim 1) initialized to the identity
(gamma = FP32 per-channel std, beta = FP32 mean, running stats = the same), trained in train mode like
ordinary QAT with BN. Scoring a candidate re-calibrates it: running stats reset, a few calibration
batches in train mode (cumulative average), then eval — the BN re-calibration of one-shot NAS, done
on the layers BN was folded from. Export folds it back exactly: with per-channel symmetric weight
quantization, quantize-then-scale equals scale-then-quantize (codes unchanged, step x |a|), so the
fused graph gets W * a, b * a + c and the plan the step sizes x |a| (`export`). MatMul weights are
per-tensor, so MatMul outputs get no ChannelNorm.

The `--eval qat` evaluator's candidates inherited from a trained supernet (`init_from`) are this class
too; from the FP32 weights they are `qtool qat`'s model (qtool.qat_model.qat_finetune). Quantization
points come from `qtool.quant_points` (via SearchSpace), the switchable quantizer and the activation
plan entries from `qtool.quant_slots`.
"""
from __future__ import annotations

import copy
import logging
import math

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from qtool.fakequant import EMAFakeQuant, LSQFakeQuant
from qtool.lift import lift
from qtool.plan import QuantPlan, TensorQuant
from qtool.quant_points import quant_points
from qtool.quant_slots import SwitchQuant, plan_of
from qtool.bitsearch.space import Candidate, SearchSpace

log = logging.getLogger(__name__)


class ChannelNorm(nn.Module):
    """BatchNorm over dim 1, initialized to the identity on the FP32 statistics (see module doc)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.momentum: float | None = 0.1
        self.weight = nn.Parameter(torch.sqrt(std.double() ** 2 + eps).float())
        self.bias = nn.Parameter(mean.clone().float())
        self.register_buffer("running_mean", mean.clone().float())
        self.register_buffer("running_var", (std.double() ** 2).float())
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.num_batches_tracked += 1
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, m, self.eps)

    def affine_t(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode y = a * x + c, in float64 (folded into the fused weights at export)."""
        rv = self.running_var.detach().double()
        a = self.weight.detach().double() / torch.sqrt(rv + self.eps)
        c = self.bias.detach().double() - self.running_mean.detach().double() * a
        return a, c

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        a, c = self.affine_t()
        return a.numpy(), c.numpy()


class _Recorder(nn.Module):
    """Collects per-channel sums and the minimum of a tensor (FP32 statistics pass)."""

    def __init__(self):
        super().__init__()
        self.n, self.s, self.s2, self.min = 0, None, None, math.inf

    def forward(self, x):
        xd = x.detach().double()
        dims = [d for d in range(xd.dim()) if d != 1] if xd.dim() >= 2 else [0]
        s, s2 = xd.sum(dims), (xd * xd).sum(dims)
        self.s = s if self.s is None else self.s + s
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += xd.numel() // max(1, s.numel())
        self.min = min(self.min, float(xd.min()))
        return x

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        var = (self.s2 / self.n - mean * mean).clamp_min(0)
        return mean.float(), var.sqrt().float()


def _mods(*ms):
    ms = [m for m in ms if m is not None]
    return ms[0] if len(ms) == 1 else nn.Sequential(*ms)


class _Folded:
    """One Conv/Gemm layer with its ChannelNorm, seen two ways (a plain object: the hooks share it).

    While the norm trains (supernet/QAT steps, BN re-calibration) the layer computes
    norm(conv(x, Q(W)) + b), ordinary QAT with BN. In eval it computes what the exported graph
    computes: conv(x, DQ(codes of W*a, step*|a|)) + int32-quantized (b*a + c), the norm folded
    (a, c from `ChannelNorm.affine`), the bias on onnxruntime's grid s_in * s_w (its rounding is
    visible at 2-bit activations, so it is simulated rather than ignored).
    """

    def __init__(self, norm, wq, aq, axis: int, bias):
        self.norm, self.wq, self.aq, self.axis, self.bias = norm, wq, aq, axis, bias

    @property
    def folded(self) -> bool:
        return not self.norm.training

    def _view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[self.axis] = -1
        return t.reshape(shape)

    def weight_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, c = self.norm.affine_t()
        s = self.wq.current()._scale_zp()[0].detach().double()
        s2 = (s * a.abs()).float()
        return torch.where((s2 > 0) & torch.isfinite(s2), s2, torch.ones_like(s2)), a

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        q = self.wq.current()
        s2, a = self.weight_scale()
        wf = (w.detach().double() * self._view(a, w.dim())).float()
        s2v = self._view(s2, w.dim())
        return torch.round(wf / s2v).clamp(q.qmin, q.qmax) * s2v

    def folded_bias(self, b: torch.Tensor | None, n: int) -> torch.Tensor:
        a, c = self.norm.affine_t()
        bf = ((b.detach().double() * a + c) if b is not None else c).float()
        if self.bias is False:
            return bf
        s_in = self.aq.current()._scale_zp()[0].detach().float().reshape(())
        s_b = (s_in.double() * self.weight_scale()[0].double()).float()
        q = torch.round(bf.double() / s_b.double()).clamp(-(2**31), 2**31 - 1)
        return q.float() * s_b


class _WeightHook(nn.Module):
    def __init__(self, ctl: _Folded):
        super().__init__()
        self._ctl = (ctl,)  # a tuple: not a registered submodule (the SwitchQuant lives in QuantNet.wq)

    def forward(self, w):
        ctl = self._ctl[0]
        if ctl.folded:
            return ctl.weight(w)
        return ctl.wq(w)


class _BiasHook(nn.Module):
    def __init__(self, ctl: _Folded):
        super().__init__()
        self._ctl = (ctl,)

    def forward(self, b):
        ctl = self._ctl[0]
        return ctl.folded_bias(b, b.shape[0]) if ctl.folded else b


class _OutputHook(nn.Module):
    def __init__(self, ctl: _Folded):
        super().__init__()
        self._ctl = (ctl,)

    def forward(self, y):
        ctl = self._ctl[0]
        if not ctl.folded:
            return ctl.norm(y)
        if ctl.bias is None:  # no bias input: the export adds one holding the folded shift
            shape = [1] * y.dim()
            shape[1] = -1
            return y + ctl.folded_bias(None, y.shape[1]).reshape(shape)
        return y


class QuantNet(nn.Module):
    def __init__(self, fused: onnx.ModelProto, space: SearchSpace, calib_x: torch.Tensor,
                 options: dict[str, tuple[int, ...]] | None = None):
        """options: weight / activation-root name -> bit-widths to hold (default: the whole space)."""
        super().__init__()
        self.fused = fused
        self.space = space
        self.net = lift(fused)
        options = options or space.group_bit_options()
        # FP32 statistics: per-channel mean/std of every Conv/Gemm output, minimum of every activation root.
        rec: dict[str, _Recorder] = {}
        for l in space.layers:
            rec[l.output] = _Recorder()
        for root in space.groups:
            rec.setdefault(root, _Recorder())
        for t, r in rec.items():
            self.net.set_quantizer(t, r)
        self.net.eval()
        with torch.no_grad():
            for i in range(0, len(calib_x), 256):
                self.net(calib_x[i:i + 256])
        for t in rec:
            self.net.set_quantizer(t, None)

        self.norms = nn.ModuleDict()
        self.wq = nn.ModuleDict()
        self.aq = nn.ModuleDict()
        self._norm_key: dict[int, str] = {}
        self._wq_key: dict[str, str] = {}
        self._aq_key: dict[str, str] = {}
        root_of = {t: r for r, members in space.groups.items() for t in members}
        for j, (w, axis) in enumerate(space.weights.items()):
            c = self.net.tensor(w).shape[axis] if axis is not None else None
            self.wq[f"w{j}"] = SwitchQuant({b: LSQFakeQuant(b, signed=True, axis=axis, narrow_range=True, num_channels=c)
                                            for b in options[w]})
            self._wq_key[w] = f"w{j}"
        for j, root in enumerate(space.groups):
            nonneg = rec[root].min >= 0.0
            self.aq[f"a{j}"] = SwitchQuant({b: LSQFakeQuant(b, signed=False) if nonneg else EMAFakeQuant(b, signed=False)
                                            for b in options[root]})
            self._aq_key[root] = f"a{j}"
        biases = {w: b for b, (_, w) in quant_points(fused).biases().items()}
        node_bias = {n.name: (n.input[2] if len(n.input) > 2 and n.input[2] else None) for n in fused.graph.node}
        hooks: dict[str, list[nn.Module]] = {}
        weight_hooks: dict[str, nn.Module] = {}
        for i, l in enumerate(space.layers):
            # A ChannelNorm needs a per-output-channel weight scale (exact fold) and an unshared weight.
            if l.weight_axis is None or l.op == "MatMul" or len(space.weight_readers[l.weight]) > 1:
                continue
            mean, std = rec[l.output].mean_std()
            key = f"n{i}"
            self.norms[key] = ChannelNorm(mean, std)
            self._norm_key[i] = key
            bias = node_bias[l.node]
            if bias is not None and biases.get(l.weight) != bias:
                bias = False  # a bias ORT keeps in float (Gemm with alpha/beta): fold it unquantized
            ctl = _Folded(self.norms[key], self.wq[self._wq_key[l.weight]], self.aq[self._aq_key[root_of[l.input]]],
                          l.weight_axis, bias)
            hooks.setdefault(l.output, []).append(_OutputHook(ctl))
            weight_hooks[l.weight] = _WeightHook(ctl)
            if bias:
                weight_hooks[bias] = _BiasHook(ctl)
        for w, k in self._wq_key.items():
            self.net.set_weight_quantizer(w, weight_hooks.pop(w, self.wq[k]))
        for b, h in weight_hooks.items():
            self.net.set_weight_quantizer(b, h)
        for root, k in self._aq_key.items():
            hooks.setdefault(root, []).append(self.aq[k])
        for t, ms in hooks.items():
            self.net.set_quantizer(t, _mods(*ms))

    # -- configuration ---------------------------------------------------------------------------
    def set_candidate(self, c: Candidate) -> None:
        bits = self.space.tensor_bits(c)
        for w, k in self._wq_key.items():
            self.wq[k].active = bits[w]
        for r, k in self._aq_key.items():
            self.aq[k].active = bits[r]

    def forward(self, x):
        return self.net(x)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def quant_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.startswith(("wq.", "aq."))]

    def model_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith(("wq.", "aq."))]

    @torch.no_grad()
    def init_quantizers(self, x: torch.Tensor, candidates: list[Candidate]) -> None:
        """One forward per candidate in train mode: LSQ steps and EMA ranges start from data (BN running
        stats are put back afterwards)."""
        norms_state = copy.deepcopy(self.norms.state_dict())
        self.train()
        x = x.to(self.device)
        for c in candidates:
            self.set_candidate(c)
            self.net(x)
        self.norms.load_state_dict(norms_state)

    @torch.no_grad()
    def recalibrate(self, batches: list[torch.Tensor]) -> None:
        """BN re-calibration: reset running stats, cumulative average over `batches` in train mode."""
        self.eval()
        for n in self.norms.values():
            n.running_mean.zero_()
            n.running_var.fill_(1.0)
            n.num_batches_tracked.zero_()
            n.momentum = None
            n.train()
        for x in batches:
            self.net(x.to(self.device))
        for n in self.norms.values():
            n.momentum = 0.1
        self.eval()

    # -- export ----------------------------------------------------------------------------------
    def export(self, c: Candidate) -> tuple[onnx.ModelProto, QuantPlan]:
        """The fused graph with this model's weights (ChannelNorms folded in) and the calibrated plan
        that makes `apply_plan(model, plan)` compute what this module computes in eval mode."""
        self.set_candidate(c)
        self.eval()
        model = self.net.write_back(self.fused)
        inits = {t.name: t for t in model.graph.initializer}
        nodes = {n.name: n for n in model.graph.node}
        plan = QuantPlan(meta={"producer": "qtool.search", "candidate": c.key})
        gain: dict[str, np.ndarray] = {}
        for i, l in enumerate(self.space.layers):
            key = self._norm_key.get(i)
            if key is None:
                continue
            a, cc = self.norms[key].affine()
            w = numpy_helper.to_array(inits[l.weight]).astype(np.float64)
            shape = [1] * w.ndim
            shape[l.weight_axis] = -1
            inits[l.weight].CopyFrom(numpy_helper.from_array((w * a.reshape(shape)).astype(np.float32), l.weight))
            node = nodes[l.node]
            bias_idx = 2 if l.op != "MatMul" else None
            if len(node.input) > bias_idx and node.input[bias_idx]:
                b = numpy_helper.to_array(inits[node.input[bias_idx]]).astype(np.float64)
                inits[node.input[bias_idx]].CopyFrom(
                    numpy_helper.from_array((b * a + cc).astype(np.float32), node.input[bias_idx]))
            else:
                name = f"{l.weight}.search_bias"
                model.graph.initializer.append(numpy_helper.from_array(cc.astype(np.float32), name))
                while len(node.input) < 2:
                    node.input.append("")
                if len(node.input) == 2:
                    node.input.append(name)
                else:
                    node.input[2] = name
            gain[l.weight] = np.abs(a)
        for w, key in self._wq_key.items():
            q = self.wq[key].current()
            qp = q.qparams()
            s = np.asarray(qp.scale, np.float64).reshape(-1)
            if w in gain:
                s = s * gain[w]
            s = np.where((s > 0) & np.isfinite(s), s, 1.0).astype(np.float32)  # all-zero channel: codes 0
            if qp.axis is None:
                plan.tensors[w] = TensorQuant("weight", q.bits, True, "per_tensor", None, float(s[0]), 0, True)
            else:
                plan.tensors[w] = TensorQuant("weight", q.bits, True, "per_channel", qp.axis,
                                              tuple(float(v) for v in s), (0,) * len(s), True)
        # Activations: the active bit-width's quantizer, shared by the root's group (quant_slots.plan_of).
        plan.tensors.update(plan_of({t: ("activation", self.aq[key]) for root, key in self._aq_key.items()
                                     for t in self.space.groups[root]}).tensors)
        return model, plan
