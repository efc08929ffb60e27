"""A multi-bit fake-quantized network on the fused graph: the supernet, and the per-candidate QAT model.

`QuantNet` lifts the fused graph (`qtool.lift`) and hooks, at every place the exporter puts a QDQ
pair, a `SwitchQuant` holding one quantizer per bit-width that tensor can take in the space:

- weights: per-bit LSQ (learned step per output channel, symmetric narrow range, zp 0);
- activations: per-bit LSQ unsigned (zp 0) where the FP32 tensor is never negative (after ReLU),
  per-bit EMA min/max asymmetric uint8 otherwise (the network input, residual operands): every
  activation stays unsigned, the U8S8 fast path of onnxruntime;
- a tensor the space can leave float (target cpu's float layers, `space.FLOAT`) also holds a
  `PassThrough`: active, the tensor runs unquantized and the exported plan has no entry for it.

BatchNorm: the BN strategy "renorm" (`qtool.bn_strategy`). The fused graph has BN folded into its
Conv/Gemm weights; BN statistics must follow the bit-widths (a 2-bit layer shifts its outputs' mean
and variance), so the supernet keeps a BN *unfolded* at every Conv/Gemm output: a `ChannelNorm` (a
BatchNorm over dim 1) initialized to the identity (gamma = FP32 per-channel std, beta = FP32 mean,
running stats = the same), trained in train mode like ordinary QAT with BN. Scoring a candidate
re-calibrates it: running stats reset, a few calibration batches in train mode (cumulative average),
then eval — the BN re-calibration of one-shot NAS, done on the layers BN was folded from. Export
folds it back exactly: with per-channel symmetric weight quantization, quantize-then-scale equals
scale-then-quantize (codes unchanged, step x |a|), so the fused graph gets W * a, b * a + c and the
plan the step sizes x |a| (`export`). MatMul weights are per-tensor, so MatMul outputs get no
ChannelNorm. Such a layer's weight, bias and output slots hold the strategy's `Renorm` slot modules.

Everything sits in the lifted module's quantizer slots (`LiftedModule.set_quantizer`), at the points
of `qtool.quant_points`; the plan is `LiftedModule.to_plan` of those slots. The FP32 statistics come
from `qtool.quant_slots.Recorder` slots, the switchable quantizer is `qtool.quant_slots.SwitchQuant`.
The `--eval qat` evaluator's candidates inherited from a trained supernet (`init_from`) are this class
too; from the FP32 weights they are `qtool qat`'s model (qtool.qat_model.qat_finetune).
"""
from __future__ import annotations

import copy
import logging

import onnx
import torch
import torch.nn as nn

from qtool.bn_strategy import ChannelNorm, Renorm, fold_renorm, resolve_bn
from qtool.fakequant import EMAFakeQuant, LSQFakeQuant
from qtool.lift import lift
from qtool.plan import QuantPlan
from qtool.quant_points import quant_points
from qtool.quant_slots import PassThrough, Recorder, SwitchQuant
from qtool.bitsearch.space import FLOAT, Candidate, SearchSpace

log = logging.getLogger(__name__)


def _mods(*ms):
    ms = [m for m in ms if m is not None]
    return ms[0] if len(ms) == 1 else nn.Sequential(*ms)


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
        rec: dict[str, Recorder] = {}
        for l in space.layers:
            rec[l.output] = Recorder()
        for root in space.groups:
            rec.setdefault(root, Recorder())
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
            self.wq[f"w{j}"] = SwitchQuant({b: PassThrough() if b == FLOAT else
                                            LSQFakeQuant(b, signed=True, axis=axis, narrow_range=True, num_channels=c)
                                            for b in options[w]})
            self._wq_key[w] = f"w{j}"
        for j, root in enumerate(space.groups):
            nonneg = rec[root].min >= 0.0
            self.aq[f"a{j}"] = SwitchQuant({b: PassThrough() if b == FLOAT else
                                            LSQFakeQuant(b, signed=False) if nonneg else EMAFakeQuant(b, signed=False)
                                            for b in options[root]})
            self._aq_key[root] = f"a{j}"
        self.bn = resolve_bn("supernet")  # renorm: a ChannelNorm at every per-channel Conv/Gemm output
        self.points = quant_points(fused)
        biases = {w: b for b, (_, w) in self.points.biases().items()}
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
            ctl = Renorm(self.norms[key], self.wq[self._wq_key[l.weight]], self.aq[self._aq_key[root_of[l.input]]],
                         l.weight_axis, bias)
            w_slot, b_slot, out_slot = ctl.slots()
            hooks.setdefault(l.output, []).append(out_slot)
            weight_hooks[l.weight] = w_slot
            if b_slot is not None:
                weight_hooks[bias] = b_slot
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
            n.start_recalibration()
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
        nodes = {n.name: n for n in model.graph.node}
        for i, l in enumerate(self.space.layers):
            key = self._norm_key.get(i)
            if key is not None:
                fold_renorm(model, nodes[l.node], l.weight, l.weight_axis, self.norms[key])
        # Every weight and activation group: its slot's active bit-width (a renormed weight: step x |a|).
        return model, self.net.to_plan(self.points, {"producer": "qtool.search", "candidate": c.key})
