"""Quantizer slots: what sits at a quantization point (`qtool.quant_points`) of a lifted module, and
the QuantPlan entries it implies.

`LiftedModule.set_quantizer(tensor, q)` / `set_weight_quantizer` hold one quantizer per point (one
QDQ pair per tensor in the exported graph). Three kinds of quantizer go there:

- single bit-width: a `qtool.fakequant.FakeQuant` (`qtool qat`); a pass-through tensor holds a
  `SharedFakeQuant` that quantizes with its root's parameters;
- switchable multi-bit: `SwitchQuant`, one FakeQuant per bit-width, `active` picks the one forward
  uses (the search's supernet and candidate models); an option may be `PassThrough`: the tensor
  stays float, and the plan takes no entry for it (the search's float layers);
- per-sample: `SampleQuant`, one FakeQuant per option mixed by a per-sample one-hot `select` (the
  dynamic trainer's activations; its layers hold their K weight options in one too, inside the
  node-replacement module `qtool.dynbits.controller.SampleLayer`); `active` names the option a
  deployed configuration exports.

Whatever the kind, the exported QDQ pair is that of one single-bit quantizer, `active_quantizer`
(a slot module may name it with a `plan_quantizer()` method, as the BN strategy's renorm slots do,
`qtool.bn_strategy`; of a chain of slot modules, an `nn.Sequential`, the last one quantizes), and
`plan_of` turns a set of slots into the plan every producer exports (`LiftedModule.to_plan` reads
them off a lifted module), so the trainers share the step from trained quantizers to a QuantPlan.
A slot may also sit inside a module that `LiftedModule.replace_nodes` put in place of nodes (a
folded Conv->BN weight, K weight branches): the module declares it (`replace_nodes(..., quantizes=)`)
and `to_plan` reads it like any other. `Recorder` is the slot of a statistics pass and `Tap` that of
a feature read (the dynamic controller's input): both watch a tensor and leave it unchanged.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn as nn

from qtool.errors import QtoolError
from qtool.plan import QuantPlan
from qtool.qat_quantizers import SharedFakeQuant, tensor_quant

__all__ = ["PassThrough", "SwitchQuant", "SampleQuant", "Recorder", "Tap", "mix", "active_quantizer", "plan_of"]


class PassThrough(nn.Identity):
    """The float option of a switchable slot: the tensor is not quantized (`plan_of` leaves it out)."""


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


def mix(onehot: torch.Tensor, fns, x_dim: int) -> torch.Tensor:
    """sum_k onehot[:, k] * fns[k]() (a B x K one-hot); branches no sample uses are skipped unless a
    gradient needs them. With hard one-hots the sum is exact (0 * finite = 0): each sample gets
    exactly its branch."""
    ks = range(onehot.shape[1]) if onehot.requires_grad else \
        [k for k in range(onehot.shape[1]) if bool(onehot[:, k].any())]
    y = None
    for k in ks:
        yk = fns[k]()
        term = onehot[:, k].reshape((-1,) + (1,) * (x_dim - 1)) * yk
        y = term if y is None else y + term
    return y


class SampleQuant(nn.Module):
    """One fake-quant per option, each sample of a batch at its own: `select` (B x K one-hot), set by
    the owner before each forward and cleared after it, mixes them (`mix`). A single option needs no
    selection. `active`: the option index the exported QDQ pair takes (`plan_quantizer`)."""

    def __init__(self, quants: list[nn.Module]):
        super().__init__()
        self.q = nn.ModuleList(quants)
        self.select: torch.Tensor | None = None
        self.active = 0

    def onehot(self, batch: int, device) -> torch.Tensor:
        """The B x K selection (ones for a single option)."""
        if self.select is not None:
            return self.select
        if len(self.q) == 1:
            return torch.ones(batch, 1, device=device)
        raise QtoolError("a per-sample quantizer ran without a selection (qtool dynamic: the controller's input "
                         "must be computed before every dynamic layer)")

    def plan_quantizer(self) -> nn.Module:
        return self.q[self.active]

    def forward(self, x):
        if self.select is None and len(self.q) == 1:
            return self.q[0](x)
        return mix(self.onehot(x.shape[0], x.device), [lambda q=q: q(x) for q in self.q], x.dim())


class Tap(nn.Module):
    """Calls `fn(x)` where the tensor is produced and returns it unchanged (a feature read)."""

    def __init__(self, fn: Callable[[torch.Tensor], None]):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        self.fn(x)
        return x


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
    """A plan with one entry per quantized tensor: `slots` maps tensor -> (kind weight|activation, its
    quantizer); a slot whose active quantizer is a `PassThrough` leaves its tensor float."""
    plan = QuantPlan(meta=dict(meta or {}))
    for t, (kind, q) in slots.items():
        fq = active_quantizer(q)
        if not isinstance(fq, PassThrough):
            plan.tensors[t] = tensor_quant(kind, fq)
    return plan
