"""The K-way quantized network and its bit controller (DQNet, instance-aware bit-widths).

`DynamicNet(fused, bits, ...)` runs on the torch core every quantized trainer shares: the fused graph
lifted (`qtool.lift`; BN strategy "fold", `qtool.bn_strategy`: the BatchNormalizations stay folded)
with quantizer slots at the points of `qtool.quant_points`. Its quantizers are the per-sample kind,
`qtool.quant_slots.SampleQuant`: one fake-quant per bit option, mixed by a per-sample one-hot the
controller sets before the layers run. Every activation group's `SampleQuant` sits in the lifted
module's activation slots (`set_quantizer`); the controller's input tensor's slot first reads the
tensor (`qtool.quant_slots.Tap`) and runs the controller. A weight slot yields one weight for the
whole batch, while here each sample takes its own bit-width, so every quantizable layer (Conv /
ConvTranspose / Gemm / MatMul with a constant weight, the layers of `qtool.bitsearch.SearchSpace`) is
replaced (`replace_nodes`) by `SampleLayer`, the one node-replacement module: it mixes its K weight
branches per sample and declares its weight's `SampleQuant` to the lifted module, so the plan of a
configuration is `LiftedModule.to_plan` like every trainer's. Static layers (one option) go through
the same module, so that a static and a dynamic layer compute alike (bias added after the conv).

- The first layer (the stem) is static at `stem_bits` (8) and the controller reads its output, so its
  bits cannot depend on the controller's decision. With `controller_layers=N` the controller reads the
  input of layer N instead (DQNet's "first layers of the main network", e.g. the end of ResNet's first
  stage); layers 1..N-1 are then static at the middle candidate bit-width, so that a deep tap does not
  eat the budget. Conv and Gemm layers after the tap are *dynamic*:
  K candidate bit-widths, weights and input activation of a layer share the choice. Other anchors
  (MatMul, ConvTranspose) stay static at `stem_bits`.
- Per bit-width quantizers, initialised from calibration: weights LSQ per output channel (symmetric
  narrow range, step 2 mean|w| / sqrt(qmax)); activations LSQ with the calibrated minmax step
  (unsigned, zp 0 for tensors the FP32 graph never makes negative; the calibrated zp held fixed for
  the others: every activation is uint8, the U8S8 path of onnxruntime).
- An activation is one tensor with one QDQ pair in the exported graph, so a group of tensors that
  share parameters (`qtool.quant_points` roots) read by several layers takes, per sample, the
  widest of their choices (as the static search does). With one-hots g_r over sorted bits this is
  `C = prod_r cumsum(g_r)`, onehot(max) = C - shift(C): exact for hard one-hots and differentiable
  for the straight-through gradient. Groups read by a static layer, or by none (residual sums, the
  logits), stay at `stem_bits`.
- int32 biases are simulated as passes.qdq writes them (scale s_in * s_w, per sample from the
  chosen pair), like `qtool.qat_quantizers.BiasFakeQuant`, which is reused.

Controller (`Controller`): the stem's output (the float tensor before its quantizer) -> global
average pool -> FC -> ReLU -> dropout 0.2 -> FC -> K logits per dynamic layer. Training: hard
Gumbel-softmax (tau 1, straight-through); every branch of every dynamic layer is computed and mixed
by the one-hot (about K x the conv cost). Inference: argmax, or the best-scoring configuration of a
capped *codebook* (score = sum over layers of the chosen logits; equals the argmax when the argmax
configuration is in the codebook), which is what the deployed runtime does. With hard one-hots the
mix `sum_k g_k y_k` is exact (0 * finite = 0), so the eval path computes exactly the selected
branch, the one the exported per-configuration QDQ model computes.

`granularity="global"`: the controller picks ONE of the K bit-widths per image for every dynamic layer
(uniform configurations). With a choice per layer (the default) a sample's BitFLOPs average over many
independent choices and barely vary between images: on ResNet-20 every deployed configuration cost
within +-5 % of the others, so no image got many more bits than another (benchmarks/dynamic_routing.py).

BitFLOPs of a sample = sum over layers MACs x b_w x b_a, with the effective (group) activation bits.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from qtool.bn_strategy import resolve_bn
from qtool.errors import QtoolError
from qtool.lift import lift
from qtool.lift_ops import run_op
from qtool.plan import QuantPlan
from qtool.quant_points import quant_points
from qtool.quant_slots import SampleQuant, Tap, mix
from qtool.qat_quantizers import BiasFakeQuant, lsq_activation, lsq_weight
from qtool.bitsearch.space import SearchSpace

DYNAMIC_OPS = ("Conv", "Gemm")
GRANULARITIES = ("layer", "global")  # a choice per layer, or one per image for every layer
DROPOUT = 0.2


@dataclass(frozen=True)
class LayerInfo:
    node: str
    op: str
    weight: str
    input_root: str
    macs: int
    dynamic: int | None  # index among the dynamic layers, None: static at `bits`
    bits: int  # bit-width when static (ignored when dynamic)


class SampleLayer(nn.Module):
    """A quantized Conv/Gemm/... in place of its node: the K weight options of `wq` (a SampleQuant,
    declared to the lifted module as the weight's slot) mixed per sample, and the int32 bias per
    (activation option, weight option) pair. `aq`: the input activation group's SampleQuant."""

    def __init__(self, op: str, attrs: dict, wq: SampleQuant, aq: SampleQuant, bias_quantized: bool):
        super().__init__()
        self.op, self.attrs = op, attrs
        self.wq = wq
        self._aq = (aq,)  # tuple: the activation slot owns it
        self.bias_quantized = bias_quantized
        # bias fake-quant per (activation option j, weight option k): passes.qdq's int32 rounding
        self._bias = [[BiasFakeQuant(a, w) for w in wq.q] for a in aq.q]

    def forward(self, x, w, b=None):
        g = self.wq.onehot(x.shape[0], x.device)
        y = mix(g, [lambda q=q: run_op(self.op, self.attrs, self.training, x, q(w), None) for q in self.wq.q], x.dim())
        if b is None:
            return y
        if self.bias_quantized:
            ga = self._aq[0].onehot(x.shape[0], x.device)
            tab = torch.stack([torch.stack([bq(b) for bq in row]) for row in self._bias])  # Ka x K x C
            bias = torch.einsum("bj,bk,jkc->bc", ga, g, tab)
        else:
            bias = b.expand(x.shape[0], -1)
        if self.op == "Gemm":
            bias = bias * self.attrs.get("beta", 1.0)
        shape = [x.shape[0]] + [1] * (y.dim() - 1)
        shape[1] = -1  # output channels: axis 1 of Conv (NCHW) and Gemm (N x M) outputs
        return y + bias.reshape(shape)


class Controller(nn.Module):
    """[conv 3x3 stride 2 -> ReLU ->] GAP -> FC -> ReLU -> dropout 0.2 -> FC -> (L x K) logits.

    `conv_channels` > 0 adds the conv: the GAP of the stem alone is little more than colour statistics,
    a weak cue to how hard an image is (on ResNet-20 the controller then learned one configuration for
    almost every image). `shared=True` (granularity "global"): ONE choice of K per image for every layer;
    fc2 has K outputs, repeated for the L layers (exported as fc2 tiled L times: the same logits)."""

    def __init__(self, channels: int, layers: int, k: int, hidden: int = 64, conv_channels: int = 0,
                 shared: bool = False):
        super().__init__()
        self.layers, self.k, self.shared = layers, k, shared
        self.conv = nn.Conv2d(channels, conv_channels, 3, stride=2, padding=1) if conv_channels else None
        channels = conv_channels or channels
        self.fc1 = nn.Linear(channels, hidden)
        self.drop = nn.Dropout(DROPOUT)
        self.fc2 = nn.Linear(hidden, k if shared else layers * k)
        nn.init.zeros_(self.fc2.weight)  # start from uniform choices: the penalty and CE shape them
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        if self.conv is not None:
            x = F.relu(self.conv(x))
        f = x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x
        out = self.fc2(self.drop(F.relu(self.fc1(f))))
        if self.shared:
            return out.unsqueeze(1).expand(-1, self.layers, -1)
        return out.reshape(-1, self.layers, self.k)

    def fc2_per_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fc2's weight and bias producing all L x K logits (tiled when shared)."""
        w, b = self.fc2.weight.detach(), self.fc2.bias.detach()
        return (w.repeat(self.layers, 1), b.repeat(self.layers)) if self.shared else (w, b)


def max_onehot(onehots: list[torch.Tensor]) -> torch.Tensor:
    """One-hot of the per-sample max option index of several one-hots (module docstring)."""
    c = None
    for g in onehots:
        cs = torch.cumsum(g, dim=1)
        c = cs if c is None else c * cs
    return c - F.pad(c[:, :-1], (1, 0))


class DynamicNet(nn.Module):
    """See the module docstring. `mode`: gumbel (training default) | argmax | codebook | fixed | scored."""

    def __init__(self, fused: onnx.ModelProto, bits: tuple[int, ...], act_ranges: dict[str, tuple[float, float]],
                 *, stem_bits: int = 8, hidden: int = 64, tau: float = 1.0, controller_conv: int = 0,
                 controller_layers: int = 1, granularity: str = "layer"):
        super().__init__()
        self.fused = fused
        self.choices = tuple(sorted(set(int(b) for b in bits)))
        if len(self.choices) < 2:
            raise QtoolError(f"--bits needs at least two different bit-widths, got {','.join(map(str, bits))}")
        space = SearchSpace.from_model(fused, self.choices, fix_first=stem_bits, fix_last=None, other_bits=stem_bits)
        self.space, self.stem_bits, self.tau = space, stem_bits, tau
        k = len(self.choices)
        points = quant_points(fused)
        for w, readers in space.weight_readers.items():
            if len(readers) > 1:
                raise QtoolError(f"weight {w!r} is shared by {len(readers)} layers: dynamic bit-widths need one "
                                 "weight per layer")
        if not 1 <= controller_layers < len(space.layers):
            raise QtoolError(f"--controller-layers must be in 1..{len(space.layers) - 1} (the model has "
                             f"{len(space.layers)} quantizable layers), got {controller_layers}")
        infos, n_dyn = [], 0
        mid = self.choices[len(self.choices) // 2]
        for i, l in enumerate(space.layers):
            dyn = i >= controller_layers and l.op in DYNAMIC_OPS
            bits = mid if 0 < i < controller_layers and l.op in DYNAMIC_OPS else stem_bits
            infos.append(LayerInfo(l.node, l.op, l.weight, points.root(l.input), l.macs, n_dyn if dyn else None, bits))
            n_dyn += dyn
        if n_dyn == 0:
            raise QtoolError(f"no Conv/Gemm layer after the first {controller_layers}: nothing for a controller to choose")
        self.layers: list[LayerInfo] = infos
        self.n_dynamic = n_dyn
        readers: dict[str, list[int]] = {}
        for i, l in enumerate(infos):
            readers.setdefault(l.input_root, []).append(i)
        # A group is dynamic when every layer reading it is dynamic; one read by static layers only takes
        # their widest bits; the others (mixed readers, none) stay at stem_bits.
        self.group_readers = {r: [infos[i].dynamic for i in rs] for r, rs in readers.items()
                              if all(infos[i].dynamic is not None for i in rs)}
        self.static_group_bits = {r: max(infos[i].bits for i in rs) for r, rs in readers.items()
                                  if all(infos[i].dynamic is None for i in rs)}
        self.tap = infos[controller_layers].input_root
        if self.tap not in self.group_readers:
            raise QtoolError(f"the controller's input {self.tap!r} is read by a static layer: choose another "
                             "--controller-layers")

        self.points = points
        self.bn = resolve_bn("dynamic")  # fold: the fused graph trains as it is (qtool.dynbits.train on the lr)
        self.net = lift(fused)
        self.groups = nn.ModuleDict()
        self._group_key: dict[str, str] = {}
        for j, (root, members) in enumerate(space.groups.items()):
            dyn = root in self.group_readers
            opts = self.choices if dyn else (self.static_bits_of(root),)
            rmin, rmax = act_ranges[root]
            qs = [lsq_activation(b, rmin, rmax) for b in opts]
            self.groups[f"a{j}"] = SampleQuant(qs)
            self._group_key[root] = f"a{j}"
        self.layer_mods = nn.ModuleList()
        nodes = {n.name: n for n in fused.graph.node}
        for i, l in enumerate(infos):
            node = nodes[l.node]
            w = self.net.tensor(l.weight).detach()
            axis = space.weights[l.weight]
            wq = SampleQuant([lsq_weight(b, w, axis) for b in (self.choices if l.dynamic is not None else (l.bits,))])
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            mod = SampleLayer(l.op, self.net.node_attrs(l.node), wq, self.group(l.input_root),
                              bias is not None and points.kind(bias) == "bias")
            self.layer_mods.append(mod)
            self.net.replace_nodes([l.node], mod, list(node.input), list(node.output)[:1], quantizes={l.weight: wq})
        for root, members in space.groups.items():
            for t in members:
                self.net.set_quantizer(t, nn.Sequential(Tap(self._decide), self.group(root)) if t == self.tap
                                       else self.group(root))
        channels = self._tap_channels()
        if controller_conv and len(self.space_shape(self.tap) or []) != 4:
            raise QtoolError("--controller-conv needs a 4-D (N, C, H, W) stem output")
        if granularity not in GRANULARITIES:
            raise QtoolError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        self.controller = Controller(channels, n_dyn, k, hidden, controller_conv, shared=granularity == "global")
        self.mode = "gumbel"
        self.fixed: torch.Tensor | None = None  # L_dyn option indices (mode fixed)
        self.codebook: torch.Tensor | None = None  # C x L_dyn option indices (mode codebook)
        self.last_logits: torch.Tensor | None = None
        self.bits_t = torch.tensor(self.choices, dtype=torch.float32)

    # -- structure ------------------------------------------------------------------------------
    def group(self, root: str) -> SampleQuant:
        return self.groups[self._group_key[root]]

    def static_bits_of(self, root: str) -> int:
        """Bits of a static activation group (module docstring)."""
        return self.static_group_bits.get(root, self.stem_bits)

    def _tap_channels(self) -> int:
        shape = self.space_shape(self.tap)
        if shape is None or len(shape) < 2:
            raise QtoolError(f"cannot infer the channel count of the controller input {self.tap!r}")
        return shape[1]

    def space_shape(self, name: str) -> list[int] | None:
        from qtool.bitsearch.space import shape_map

        return shape_map(self.fused).get(name)

    # -- choices --------------------------------------------------------------------------------
    def set_mode(self, mode: str, fixed=None, codebook=None) -> None:
        if mode not in ("gumbel", "argmax", "codebook", "fixed", "scored"):
            raise ValueError(mode)
        self.mode = mode
        if fixed is not None:
            self.fixed = torch.as_tensor(np.asarray(fixed), dtype=torch.long)
        if codebook is not None:
            self.codebook = torch.as_tensor(np.asarray(codebook), dtype=torch.long)

    def codebook_matrix(self) -> torch.Tensor:
        """(L_dyn * K) x C: logits.reshape(B, -1) @ M = the score of each codebook configuration."""
        k = len(self.choices)
        cb = self.codebook
        m = torch.zeros(self.n_dynamic * k, cb.shape[0])
        for c in range(cb.shape[0]):
            m[torch.arange(self.n_dynamic) * k + cb[c], c] = 1.0
        return m

    def _decide(self, x: torch.Tensor) -> None:
        k = len(self.choices)
        b = x.shape[0]
        if self.mode in ("fixed", "scored"):  # scored: a fixed configuration, the controller's logits beside it
            g = F.one_hot(self.fixed.to(x.device), k).float().unsqueeze(0).expand(b, -1, -1)
            self.last_logits = self.controller(x) if self.mode == "scored" else None
        else:
            logits = self.controller(x)
            self.last_logits = logits
            if self.mode == "gumbel" and self.training:
                if self.controller.shared:  # one draw per image, for every layer
                    g = F.gumbel_softmax(logits[:, :1], tau=self.tau, hard=True, dim=-1).expand(-1, self.n_dynamic, -1)
                else:
                    g = F.gumbel_softmax(logits, tau=self.tau, hard=True, dim=-1)
            elif self.mode == "codebook":
                scores = logits.reshape(b, -1) @ self.codebook_matrix().to(x.device)
                g = F.one_hot(self.codebook.to(x.device)[scores.argmax(1)], k).float()
            else:
                g = F.one_hot(logits.argmax(-1), k).float()
        self._select(g, {r: max_onehot([g[:, j] for j in js]) for r, js in self.group_readers.items()})

    def _select(self, layer: torch.Tensor | None, groups: dict[str, torch.Tensor]) -> None:
        """Set (or, with None and {}, clear) the per-sample selections of the dynamic quantizers."""
        self._choice = (layer, groups)
        for l, mod in zip(self.layers, self.layer_mods):
            if l.dynamic is not None:
                mod.wq.select = None if layer is None else layer[:, l.dynamic]
        for r in self.group_readers:
            self.group(r).select = groups.get(r)

    def forward(self, x):
        self._select(None, {})
        try:
            return self.net(x)
        finally:
            self.last_choice, self.last_groups = self._choice
            self._select(None, {})

    # -- cost -----------------------------------------------------------------------------------
    def bitflops(self, layer: torch.Tensor, groups: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample BitFLOPs (sum MACs x b_w x b_a) of choices (differentiable in the one-hots)."""
        bits = self.bits_t.to(layer.device)
        total = torch.zeros(layer.shape[0], device=layer.device)
        for l in self.layers:
            bw = layer[:, l.dynamic] @ bits if l.dynamic is not None else float(l.bits)
            ba = groups[l.input_root] @ bits if l.input_root in groups else float(self.static_bits_of(l.input_root))
            total = total + l.macs * bw * ba
        return total

    def mean_bits(self, layer: torch.Tensor) -> torch.Tensor:
        """Per-sample mean chosen bit-width over the dynamic layers."""
        return (layer @ self.bits_t.to(layer.device)).mean(1)

    @property
    def total_macs(self) -> int:
        return sum(l.macs for l in self.layers)

    def config_onehots(self, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = F.one_hot(torch.as_tensor(np.asarray(cfg), dtype=torch.long), len(self.choices)).float().unsqueeze(0)
        return g, {r: max_onehot([g[:, j] for j in js]) for r, js in self.group_readers.items()}

    def config_bitflops(self, cfg) -> float:
        return float(self.bitflops(*self.config_onehots(cfg))[0])

    def uniform(self, b: int) -> tuple[int, ...]:
        return (self.choices.index(b),) * self.n_dynamic

    def config_bits(self, cfg) -> list[int]:
        """Bits of every layer (static ones included) for a configuration of the dynamic layers."""
        return [self.choices[cfg[l.dynamic]] if l.dynamic is not None else l.bits for l in self.layers]

    # -- export ---------------------------------------------------------------------------------
    @torch.no_grad()
    def export_config(self, cfg) -> tuple[onnx.ModelProto, QuantPlan]:
        """Fused graph with the fake-quantized weights of configuration `cfg` + its calibrated plan:
        `apply_plan(model, plan)` computes what this module computes in eval mode for that choice."""
        self.eval()
        cfg = [int(c) for c in cfg]
        _, groups = self.config_onehots(cfg)
        for l, mod in zip(self.layers, self.layer_mods):  # the configuration's option in every slot
            mod.wq.active = cfg[l.dynamic] if l.dynamic is not None else 0
        for root in self.space.groups:
            self.group(root).active = int(groups[root][0].argmax()) if root in groups else 0
        model = self.net.write_back(self.fused)
        inits = {t.name: t for t in model.graph.initializer}
        for l, mod in zip(self.layers, self.layer_mods):
            w = mod.wq.plan_quantizer()(self.net.tensor(l.weight))
            inits[l.weight].CopyFrom(numpy_helper.from_array(w.cpu().numpy().astype(np.float32), l.weight))
        return model, self.net.to_plan(self.points, {"producer": "qtool.dynamic", "bits": self.config_bits(cfg)})

    def copy_for_static(self) -> "DynamicNet":
        return copy.deepcopy(self)
