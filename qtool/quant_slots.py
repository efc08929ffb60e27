"""Quantizer slots: what sits at a quantization point (`qtool.quant_points`) of a lifted module, and
the QuantPlan entries it implies.

`LiftedModule.set_quantizer(tensor, q)` / `set_weight_quantizer` hold one quantizer per point (one
QDQ pair per tensor in the exported graph). Three kinds of quantizer go there:

- single bit-width: a `qtool.fakequant.FakeQuant` (`qtool qat`); a pass-through tensor holds a
  `SharedFakeQuant` that quantizes with its root's parameters;
- switchable multi-bit: `SwitchQuant`, one FakeQuant per bit-width, `active` picks the one forward
  uses (the search's supernet and candidate models);
- per-sample: `qtool.dynbits.controller.GroupQuant`, each sample of a batch at its own bit-width
  (the dynamic trainer); a deployed configuration fixes one of its options.

Whatever the kind, the exported QDQ pair is that of one single-bit quantizer, `active_quantizer`
(a slot module may name it with a `plan_quantizer()` method, as the BN strategy's renorm slots do,
`qtool.bn_strategy`; of a chain of slot modules, an `nn.Sequential`, the last one quantizes), and
`plan_of` turns a set of slots into the plan every producer exports (`LiftedModule.to_plan` reads
them off a lifted module), so the trainers share the step from trained quantizers to a QuantPlan.
`Recorder` is the slot of a statistics pass: it watches a tensor and leaves it unchanged.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn

from qtool.plan import QuantPlan
from qtool.qat_quantizers import SharedFakeQuant, tensor_quant

__all__ = ["SwitchQuant", "Recorder", "active_quantizer", "plan_of"]


class SwitchQuant(nn.Module):
    """One fake-quant per bit-width; `active` picks the one forward uses."""

    def __init__(self, quants: dict[int, nn.Module]):
        super().__init__()
        self.q = nn.ModuleDict({str(b): q for b, q in quants.items()})
        self.active = max(quants)

    @property
    def bits(self) -> tuple[int, ...]:
        return tuple(sorted(int(b) for b in self.q))

    def current(self) -> nn.Module:
        return self.q[str(self.active)]

    def forward(self, x):
        return self.q[str(self.active)](x)


class Recorder(nn.Module):
    """Collects per-channel sums and the minimum of a tensor (an FP32 statistics pass; identity)."""

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


def active_quantizer(slot: nn.Module) -> nn.Module:
    """The single-bit quantizer whose parameters the exported QDQ pair of `slot` takes now."""
    if hasattr(slot, "plan_quantizer"):
        return slot.plan_quantizer()
    if isinstance(slot, nn.Sequential):
        return active_quantizer(slot[len(slot) - 1])
    if isinstance(slot, SharedFakeQuant):
        return slot.root
    if isinstance(slot, SwitchQuant):
        return slot.current()
    return slot


def plan_of(slots: Mapping[str, tuple[str, nn.Module]], meta: dict | None = None) -> QuantPlan:
    """A plan with one entry per tensor: `slots` maps tensor -> (kind weight|activation, its quantizer)."""
    plan = QuantPlan(meta=dict(meta or {}))
    for t, (kind, q) in slots.items():
        plan.tensors[t] = tensor_quant(kind, active_quantizer(q))
    return plan
