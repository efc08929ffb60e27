"""How BatchNormalization is handled while a quantized graph trains: one choice (`BN_MODES`, decided
by `resolve_bn`) for `qtool qat`, the search's supernet and `qtool dynamic`, and the modules each
mode puts into the lifted graph (`qtool.lift`).

- "fold": train the fused graph as it is, BN folded into the Conv/Gemm weights and nothing
  renormalizing (`qtool dynamic`; `qtool qat` with `bn="fold"`, given a fused model, or when the
  unfused graph does not map onto the fused one).
- "unfold": the unfused model's Conv -> BatchNormalization pairs train as Conv->BN with the
  fake-quant on the folded weight (`unfold_map` finds them, a `ConvBNFold` replaces each pair;
  method and references in `qtool.qat_train`). `qtool qat`'s default; needs the unfused model.
- "renorm": a BatchNorm (`ChannelNorm`) put back at every per-channel Conv/Gemm output of the fused
  graph, initialized to the identity on the FP32 statistics, trained in train mode, re-calibrated per
  bit configuration and folded back exactly at export (`Renorm`, `fold_renorm`). The search's
  supernet: its input is the fused graph, and its bit-widths move the statistics (a 2-bit layer
  shifts its outputs' mean and variance).

Which trainer takes which modes is `SUPPORTED` (dynamic's per-sample layers mix K weight branches,
so neither unfolded scheme applies there; see `qtool.dynbits.train` for why its lr is low). The
defaults keep each trainer's behaviour: qat unfold, supernet renorm, dynamic fold.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from qtool.bn_modes import BN_MODES, DEFAULT, SUPPORTED, check_bn, resolve_bn
from qtool.errors import QtoolError
from qtool.fakequant import QParams
from qtool.lift import LiftedModule, lift
from qtool.lift_ops import run_op
from qtool.quant_slots import PassThrough

__all__ = ["BN_MODES", "SUPPORTED", "DEFAULT", "check_bn", "resolve_bn", "FoldPair", "ConvBNFold", "unfold_map",
           "ChannelNorm", "Renorm", "fold_renorm"]

# -- unfold: Conv -> BN pairs of the unfused model ------------------------------------------------

class ConvBNFold(nn.Module):
    """Conv -> BatchNormalization trained with the fake-quant on the folded weight (qtool.qat_train)."""

    def __init__(self, conv_attrs: dict, eps: float, momentum: float, weight_fq: nn.Module, freeze_step: int):
        super().__init__()
        self.conv_attrs, self.eps, self.momentum = conv_attrs, eps, momentum  # momentum: torch's (1 - ONNX's)
        self.weight_fq = weight_fq
        self.bias_fq: nn.Module | None = None  # a qtool.qat_quantizers.BiasFakeQuant
        self.exact: nn.Module | None = None  # eval-mode onnxruntime kernel emulation (qtool.ortexact)
        self.freeze_step = freeze_step
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def folded(self, w, b, gamma, beta, mean, var):
        std = torch.sqrt(var + self.eps)
        s = gamma / std
        w_fold = w * s.reshape((-1,) + (1,) * (w.dim() - 1))
        b0 = b if b is not None else torch.zeros_like(mean)
        return w_fold, beta + (b0 - mean) * s

    def forward(self, x, w, b, gamma, beta, mean, var):
        w_fold, b_fold = self.folded(w, b, gamma, beta, mean, var)
        wq = self.weight_fq(w_fold)
        if self.training:
            self.step += 1
        if self.training and int(self.step) <= self.freeze_step:
            # Undo the fold factor on the quantized conv and normalize with batch statistics (which
            # updates the running ones): PyTorch's ConvBn QAT approximation, one conv per step.
            s = gamma / torch.sqrt(var + self.eps)
            s = torch.where(s.abs() > 1e-12, s, torch.full_like(s, 1e-12))  # gamma 0: avoid 0 / 0
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = run_op("Conv", self.conv_attrs, True, x, wq, None) / s.reshape(shape)
            if b is not None:
                y = y + b.reshape(shape)
            return F.batch_norm(y, mean, var, gamma, beta, True, self.momentum, self.eps)
        bias = self.bias_fq(b_fold) if self.bias_fq is not None else b_fold
        if self.exact is not None and not self.training:
            return self.exact(x, wq, bias)
        return run_op("Conv", self.conv_attrs, self.training, x, wq, bias)


@dataclass
class FoldPair:
    conv: str  # node name (same in both graphs)
    bn_out: str
    inputs: list[str]  # lifted-graph inputs: x, w, b, gamma, beta, mean, var
    eps: float
    momentum: float


def unfold_map(original: onnx.ModelProto, fused: onnx.ModelProto, tensors, notes: list[str]
               ) -> tuple[LiftedModule, dict[str, FoldPair], dict[str, str]] | None:
    """Lift the unfused graph and map the fused graph's quantized `tensors` (name -> spec with a
    `.kind`) onto it: (lifted, Conv node -> its pair, fused tensor -> lifted tensor), or None (with a
    note) when it does not map one to one."""
    g = original.graph
    readers = defaultdict(list)
    for n in g.node:
        for i, t in enumerate(n.input):
            readers[t].append((n, i))
    outputs = {o.name for o in g.output}
    fused_nodes = {n.name: n for n in fused.graph.node}
    pairs: dict[str, FoldPair] = {}
    for n in g.node:
        if n.op_type != "Conv" or n.name not in fused_nodes or fused_nodes[n.name].op_type != "Conv":
            continue
        r = readers.get(n.output[0], [])
        if len(r) != 1 or r[0][0].op_type != "BatchNormalization" or r[0][1] != 0 or n.output[0] in outputs:
            continue
        bn = r[0][0]
        if any(o for o in bn.output[1:]) or len(bn.input) != 5 or not bn.name or not n.name:
            continue
        if fused_nodes[n.name].input[1] != n.input[1]:
            notes.append(f"bn unfold off: fused Conv {n.name!r} reads another weight; trained on the fused graph")
            return None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bn.attribute}
        pairs[n.name] = FoldPair(n.name, bn.output[0],
                                 [n.input[0], n.input[1], n.input[2] if len(n.input) > 2 else ""] + list(bn.input[1:]),
                                 float(attrs.get("epsilon", 1e-5)), 1.0 - float(attrs.get("momentum", 0.9)))
    if not pairs:
        return None
    try:
        lifted = lift(original)
    except QtoolError as e:
        notes.append(f"bn unfold off: the unfused graph does not lift ({e}); trained on the fused graph")
        return None

    def off(why: str):
        notes.append(f"bn unfold off: {why}; trained on the fused graph")
        return None

    pair_inits = {fused_nodes[c].input[i] for c in pairs for i in (1, 2) if len(fused_nodes[c].input) > i}
    orig_state = lifted.export_weights()
    for t in fused.graph.initializer:
        # New names are constants the simplifier folded; a trainable source would be caught below.
        if t.name in pair_inits or t.name not in orig_state:
            continue
        if not np.array_equal(orig_state[t.name], numpy_helper.to_array(t)):
            return off(f"fused initializer {t.name!r} differs from the unfused graph's")
    fused_init_names = {t.name for t in fused.graph.initializer}
    used_by_pairs = {t for p in pairs.values() for t in p.inputs[1:5] if t}
    for name in lifted.trainable_initializers():
        if name not in used_by_pairs and name not in fused_init_names:
            return off(f"trainable initializer {name!r} of the unfused graph is folded away")
    # Activation names: a pair conv's fused output is the BN output in the unfused graph.
    fused_producer = {o: n for n in fused.graph.node for o in n.output}
    orig_producer = {o: n for n in g.node for o in n.output}
    graph_inputs = {i.name for i in g.input}
    conv_out = {fused_nodes[c].output[0]: p.bn_out for c, p in pairs.items()}
    names: dict[str, str] = {}
    for t, s in tensors.items():
        if s.kind == "weight":
            names[t] = t
        elif t in conv_out:
            names[t] = conv_out[t]
        elif t in graph_inputs:
            names[t] = t
        else:
            fp, op = fused_producer.get(t), orig_producer.get(t)
            if fp is None or op is None or fp.name != op.name or fp.op_type != op.op_type:
                return off(f"tensor {t!r} of the fused graph has no counterpart in the unfused graph")
            names[t] = t
    return lifted, pairs, names


# -- renorm: a BatchNorm put back at the fused graph's Conv/Gemm outputs --------------------------

class ChannelNorm(nn.Module):
    """BatchNorm over dim 1, initialized to the identity on the FP32 statistics (module docstring)."""

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

    @torch.no_grad()
    def start_recalibration(self) -> None:
        """Reset the running statistics; train mode then averages them cumulatively (BN re-calibration)."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        self.momentum = None
        self.train()


class Renorm:
    """One Conv/Gemm layer with its ChannelNorm, seen through three quantizer slots of the lifted graph
    (`slots`: the weight's, the bias's and the output's; a plain object the slots share).

    While the norm trains (QAT steps, BN re-calibration) the layer computes norm(conv(x, Q(W)) + b),
    ordinary QAT with BN. In eval it computes what the exported graph computes: conv(x, DQ(codes of
    W*a, step*|a|)) + int32-quantized (b*a + c), the norm folded (a, c from `ChannelNorm.affine`),
    the bias on onnxruntime's grid s_in * s_w (its rounding is visible at 2-bit activations, so it
    is simulated rather than ignored). `wq` / `aq` are the weight's and the input's switchable
    quantizers (`qtool.quant_slots.SwitchQuant`); `bias`: the bias initializer's name, None when the
    node has none, False for a bias onnxruntime keeps in float (folded unquantized). A `PassThrough`
    active in `wq` (the search's float layers) leaves the folded weight float, and then, as in the
    exported graph, the bias too (it is int32 only where the input and the weight are quantized).
    """

    def __init__(self, norm: ChannelNorm, wq: nn.Module, aq: nn.Module, axis: int, bias):
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

    def float_weight(self) -> bool:
        return isinstance(self.wq.current(), PassThrough)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        q = self.wq.current()
        if self.float_weight():
            return (w.detach().double() * self._view(self.norm.affine_t()[0], w.dim())).float()
        s2, a = self.weight_scale()
        wf = (w.detach().double() * self._view(a, w.dim())).float()
        s2v = self._view(s2, w.dim())
        return torch.round(wf / s2v).clamp(q.qmin, q.qmax) * s2v

    def folded_bias(self, b: torch.Tensor | None, n: int) -> torch.Tensor:
        a, c = self.norm.affine_t()
        bf = ((b.detach().double() * a + c) if b is not None else c).float()
        if self.bias is False or self.float_weight() or isinstance(self.aq.current(), PassThrough):
            return bf
        s_in = self.aq.current()._scale_zp()[0].detach().float().reshape(())
        s_b = (s_in.double() * self.weight_scale()[0].double()).float()
        q = torch.round(bf.double() / s_b.double()).clamp(-(2**31), 2**31 - 1)
        return q.float() * s_b

    def slots(self) -> tuple[nn.Module, nn.Module | None, nn.Module]:
        """(weight slot, bias slot or None, output slot): `LiftedModule.set_quantizer` modules."""
        return _RenormSlot(self, "weight"), (_RenormSlot(self, "bias") if self.bias else None), _RenormSlot(self, "output")


class _RenormSlot(nn.Module):
    """One of a `Renorm` layer's slots (role weight | bias | output)."""

    def __init__(self, ctl: Renorm, role: str):
        super().__init__()
        self._ctl = (ctl,)  # a tuple: not a registered submodule (its modules live in the owning model)
        self.role = role

    def forward(self, t):
        ctl = self._ctl[0]
        if self.role == "weight":
            return ctl.weight(t) if ctl.folded else ctl.wq(t)
        if self.role == "bias":
            return ctl.folded_bias(t, t.shape[0]) if ctl.folded else t
        if not ctl.folded:
            return ctl.norm(t)
        if ctl.bias is None:  # no bias input: the export adds one holding the folded shift
            shape = [1] * t.dim()
            shape[1] = -1
            return t + ctl.folded_bias(None, t.shape[1]).reshape(shape)
        return t

    def plan_quantizer(self):
        """The weight's exported quantizer (qtool.quant_slots.active_quantizer): the active bit-width's
        codes of W*a, step x |a|."""
        if self.role != "weight":
            raise QtoolError(f"a renorm {self.role} slot has no quantizer of its own")
        ctl = self._ctl[0]
        return ctl.wq.current() if ctl.float_weight() else _FoldedWeightQuant(ctl)


class _FoldedWeightQuant:
    """The qparams of a renormed weight as exported (what `qtool.qat_quantizers.tensor_quant` reads)."""

    def __init__(self, ctl: Renorm):
        self.ctl = ctl
        self.narrow_range = ctl.wq.current().narrow_range

    def qparams(self) -> QParams:
        qp = self.ctl.wq.current().qparams()
        s = self.ctl.weight_scale()[0].detach().cpu().numpy().astype(np.float32)  # all-zero channel: step 1
        return QParams(s, np.zeros(s.shape, np.int8), qp.bits, qp.signed, self.ctl.axis, qp.qmin, qp.qmax)


def fold_renorm(model: onnx.ModelProto, node: onnx.NodeProto, weight: str, axis: int, norm: ChannelNorm) -> None:
    """Fold `norm` into `node`'s weight and bias initializers of `model` in place (W * a, b * a + c;
    a node without a bias gets one, `<weight>.search_bias`, holding c)."""
    inits = {t.name: t for t in model.graph.initializer}
    a, cc = norm.affine()
    w = numpy_helper.to_array(inits[weight]).astype(np.float64)
    shape = [1] * w.ndim
    shape[axis] = -1
    inits[weight].CopyFrom(numpy_helper.from_array((w * a.reshape(shape)).astype(np.float32), weight))
    if len(node.input) > 2 and node.input[2]:
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        inits[node.input[2]].CopyFrom(numpy_helper.from_array((b * a + cc).astype(np.float32), node.input[2]))
    else:
        name = f"{weight}.search_bias"
        model.graph.initializer.append(numpy_helper.from_array(cc.astype(np.float32), name))
        while len(node.input) < 2:
            node.input.append("")
        if len(node.input) == 2:
            node.input.append(name)
        else:
            node.input[2] = name
