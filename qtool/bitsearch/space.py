"""The search space: per quantizable layer of the fused graph, what it computes with.

Layers are the Conv / ConvTranspose / Gemm / MatMul nodes of the fused graph whose weight
`passes.mark_tensors` quantizes, in node order. The first and the last layer are fixed (int8 by
default); every other layer has genes (pymoo's integer encoding, `xl = 0`, `xu = levels - 1`) that
depend on the target:

- "grid": two genes per layer, indices into the sorted `bits` choices, `[w_0, a_0, w_1, a_1, ...]`:
  any weight and activation bit-width, for hardware with sub-8-bit kernels;
- "cpu": one gene per layer choosing among `qtool.control_config.TARGET_CHOICES["cpu"]`, the choices of
  the accuracy control: float (weight and input left out of the plan: the layer runs float), int8
  (W8A8), w4a8 (4-bit weights in int8 containers, 8-bit activations). In `Candidate.bits` float is
  (FLOAT, FLOAT), FLOAT = 32 standing for "not quantized" (so FLOPs / BitOps / packed sizes count 32 bits).

From layer choices to tensor bits (what a QuantPlan holds, one QDQ pair per tensor; FLOAT: no entry):
- a layer's weight gets its `w` bits (a weight shared by several layers: the widest quantized one;
  float only if every layer reading it is float);
- a layer's `a` bits apply to its input activation. Tensors that share quantization parameters
  (a pass-through MaxPool/Flatten output and its source, `Marks.root`) form one group, and a group
  read by several layers (a residual block's input feeding a conv and the shortcut) gets the widest
  quantized `a` of its readers: one tensor cannot have two bit-widths, and a quantized reader needs its
  input quantized, so the group is float only if every layer reading it is float (then a quantized
  layer writing it has no output Q: onnxruntime runs it as a float kernel on dequantized values, which
  the measured latency shows, and so does the Add of a residual operand left float);
- a float Conv / ConvTranspose / Gemm whose input group is quantized all the same (by a quantized
  co-reader) still runs float: the QDQ exporter feeds it through its own per-channel DequantizeLinear
  of the same codes, which keeps onnxruntime's WeightBiasQuantization from quantizing its float
  weight itself (passes.qdq);
- activation groups no layer reads (residual Add operands, the logits) stay at `other_bits` (8) where
  another op quantizes them (Add / Concat / pooling: `pinned`) or a quantized layer writes them (its
  integer kernel needs its output quantized); written only by float layers they stay float.
The *effective* bits (`effective()`) are what FLOPs/BitOps are computed from, so the objectives
describe the plan that is really exported.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

import passes
from qtool.control_config import TARGET_CHOICES
from qtool.errors import QtoolError
from qtool.quant_points import quant_points

ANCHORS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
TARGETS = ("cpu", "grid")
FLOAT = 32  # the bit-width that stands for "not quantized" (float32) in Candidate.bits and tensor_bits


def target_options(target: str) -> tuple[tuple[str, tuple[int, int]], ...]:
    """A target's per-layer choices as (name, (w, a)), least aggressive first; () for the grid."""
    if target == "grid":
        return ()
    if target not in TARGET_CHOICES:
        raise QtoolError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    # TARGET_CHOICES gives weight bits (None: float); activations are 8-bit wherever the layer is quantized.
    return tuple((name, (FLOAT, FLOAT) if b is None else (b, 8)) for name, b in TARGET_CHOICES[target])


def _widest(bits) -> int:
    """The bits of a tensor several layers ask for: the widest quantized one, FLOAT if all are float."""
    q = [b for b in bits if b != FLOAT]
    return max(q) if q else FLOAT


@dataclass(frozen=True)
class Layer:
    node: str
    op: str
    input: str  # activation tensor the layer reads (its input group decides the effective a-bits)
    weight: str
    weight_axis: int | None  # per-channel (output-channel) axis of the weight, None: per-tensor
    output: str  # the anchor node's own output (before a fused activation)
    macs: int  # multiply-accumulates per sample (batch 1)


@dataclass(frozen=True)
class Candidate:
    """Bits of every layer (fixed ones included), in layer order: ((w, a), ...); (FLOAT, FLOAT) = float."""
    bits: tuple[tuple[int, int], ...]

    @property
    def key(self) -> str:
        return "-".join("f" if (w, a) == (FLOAT, FLOAT) else f"w{w}a{a}" for w, a in self.bits)

    @classmethod
    def from_key(cls, key: str) -> "Candidate":
        try:
            parts = [(FLOAT, FLOAT) if p == "f" else tuple(p[1:].split("a")) for p in key.split("-")]
            return cls(tuple((int(w), int(a)) for w, a in parts))
        except (ValueError, IndexError):
            raise QtoolError(f"malformed candidate key {key!r}") from None

    def seed(self, base: int) -> int:
        """A per-candidate seed: the same candidate gets the same fine-tune whatever its order."""
        return (zlib.crc32(self.key.encode()) ^ (base * 2654435761)) & 0x7FFFFFFF


def shape_map(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes with the batch dimension set to 1 (MACs are per sample)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = 1
    del m.graph.value_info[:]
    m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    out = {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = [d.dim_value for d in dims]
    for t in m.graph.initializer:
        out[t.name] = list(t.dims)
    return out


def layer_macs(node: onnx.NodeProto, shapes: dict[str, list[int]], weight_shape: list[int]) -> int:
    """MACs per sample: Conv = out elements x (C_in / group x kernel area); Gemm/MatMul = M x K x N."""
    out = shapes.get(node.output[0])
    if out is None:
        raise QtoolError(f"cannot infer the output shape of {node.op_type} node {node.name!r}: the search needs "
                         "static shapes (except the batch dimension)")
    n_out = int(np.prod(out[1:])) if node.op_type in ("Conv", "ConvTranspose") else int(np.prod(out))
    if node.op_type == "Conv":
        return n_out * int(np.prod(weight_shape[1:]))  # weight: C_out x C_in/group x k...
    if node.op_type == "ConvTranspose":
        x = shapes.get(node.input[0])
        if x is None:
            raise QtoolError(f"cannot infer the input shape of ConvTranspose node {node.name!r}")
        return int(np.prod(x[1:])) * int(np.prod(weight_shape[1:]))  # each input pixel scatters C_out/g x k
    if node.op_type == "Gemm":
        trans_a = any(a.name == "transA" and a.i for a in node.attribute)
        x = shapes.get(node.input[0])
        k = (x[0] if trans_a else x[1]) if x else None
        if k is None:
            raise QtoolError(f"cannot infer the input shape of Gemm node {node.name!r}")
        return n_out * int(k)  # output M x N (M = 1 per sample), K multiplies each
    # MatMul: output [..., M, N], inner dimension K = the weight's first dim of its last two
    return n_out * int(weight_shape[-2] if len(weight_shape) >= 2 else weight_shape[0])


@dataclass
class SearchSpace:
    layers: list[Layer]
    choices: tuple[int, ...]  # grid: the bit-widths of every gene; cpu: () (the genes pick `options`)
    fixed: dict[int, tuple[int, int]]  # layer index -> (w, a)
    weight_readers: dict[str, list[int]]  # weight tensor -> layer indices
    groups: dict[str, list[str]]  # activation root -> tensors sharing its parameters (root first)
    group_readers: dict[str, list[int]]  # activation root -> layer indices reading the group
    other_bits: int = 8
    weights: dict[str, int | None] = field(default_factory=dict)  # weight -> per-channel axis
    target: str = "grid"
    options: tuple[tuple[str, tuple[int, int]], ...] = ()  # cpu: (name, (w, a)) of one gene, least aggressive first
    group_writers: dict[str, list[int]] = field(default_factory=dict)  # root -> layers whose unit output is in it
    pinned: frozenset[str] = frozenset()  # roots other ops (Add, Concat, pooling) quantize whatever the layers do

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_model(cls, fused: onnx.ModelProto, bits: tuple[int, ...] | None = None, *, fix_first: int | None = 8,
                   fix_last: int | None = 8, other_bits: int = 8, target: str = "grid") -> "SearchSpace":
        """`fused`: a graph after `qtool.fusion.fuse`. bits: the grid's choices [2, 4, 8] (target grid only).
        fix_first/fix_last: bits of those layers (weights and input activations), or None to search them too."""
        options = target_options(target)
        if options:
            if bits is not None:
                raise QtoolError(f"bit-width choices apply to target grid; target {target!r} chooses among "
                                 f"{', '.join(n for n, _ in options)} per layer")
            for what, v in (("fixed first-layer bits", fix_first), ("fixed last-layer bits", fix_last)):
                if v is not None and v != 8:
                    raise QtoolError(f"{what} must be 8 (int8) on target {target!r}, got {v}")
        bits = (2, 4, 8) if bits is None else bits
        choices = () if options else tuple(sorted(set(int(b) for b in bits)))
        if not options and (not choices or any(not 2 <= b <= 8 for b in choices)):
            raise QtoolError(f"--bits must be integers in 2..8, got {','.join(map(str, bits)) or '(none)'}")
        for what, v in (("fixed first-layer bits", fix_first), ("fixed last-layer bits", fix_last),
                        ("other activation bits", other_bits)):
            if v is not None and not 2 <= v <= 8:
                raise QtoolError(f"{what} must be in 2..8, got {v}")
        points = quant_points(fused)
        shapes = shape_map(fused)
        inits = {t.name: list(t.dims) for t in fused.graph.initializer}
        layers: list[Layer] = []
        for node in fused.graph.node:
            if node.op_type not in ANCHORS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
                continue
            w = node.input[1]
            if points.kind(w) != "weight" or points.kind(node.input[0]) not in ("weight", "activation"):
                continue  # left float by mark_tensors (non-constant weight, transA, ...): not searchable
            layers.append(Layer(node.name, node.op_type, node.input[0], w, points[w].axis, node.output[0],
                                layer_macs(node, shapes, inits[w])))
        if not layers:
            raise QtoolError("the model has no quantizable Conv/Gemm/MatMul layer to search")
        fixed: dict[int, tuple[int, int]] = {}
        if fix_first is not None:
            fixed[0] = (fix_first, fix_first)
        if fix_last is not None:
            fixed[len(layers) - 1] = (fix_last, fix_last)
        if len(fixed) == len(layers):
            raise QtoolError(f"the model has {len(layers)} quantizable layer(s), all fixed: nothing to search "
                             "(search the first/last layers too)")
        weight_readers: dict[str, list[int]] = {}
        for i, l in enumerate(layers):
            weight_readers.setdefault(l.weight, []).append(i)
        groups = points.groups()
        group_readers: dict[str, list[int]] = {}
        for i, l in enumerate(layers):
            group_readers.setdefault(points.root(l.input), []).append(i)
        weights = points.weights()
        # Who else asks for an activation: the unit outputs the layers write (passes.units, what the
        # marking quantizes after a layer) and what the marking quantizes with every layer left out.
        graph = passes.to_ir(fused).graph
        names = {l.node: i for i, l in enumerate(layers)}
        group_writers: dict[str, list[int]] = {}
        for u in passes.find_units(graph):
            if u.anchor in names and points.kind(u.output) == "activation":
                group_writers.setdefault(points.root(u.output), []).append(names[u.anchor])
        others = passes.mark_tensors(graph, lambda n: n.name in names)
        pinned = frozenset(points.root(t) for t in others.tensors if points.kind(t) == "activation")
        return cls(layers, choices, fixed, weight_readers, groups, group_readers, other_bits, weights, target, options,
                   group_writers, pinned)

    # -- encoding --------------------------------------------------------------------------------
    @property
    def searched(self) -> list[int]:
        return [i for i in range(len(self.layers)) if i not in self.fixed]

    @property
    def genes_per_layer(self) -> int:
        return 1 if self.options else 2

    @property
    def levels(self) -> int:
        """Values of one gene (0 .. levels - 1)."""
        return len(self.options) if self.options else len(self.choices)

    @property
    def n_var(self) -> int:
        return self.genes_per_layer * len(self.searched)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """The (w, a) a searched layer can take."""
        if self.options:
            return [p for _, p in self.options]
        return [(w, a) for w in self.choices for a in self.choices]

    def option_name(self, pair: tuple[int, int]) -> str:
        """A layer's choice as people read it: float / int8 / w4a8 (cpu), w4a2 (grid)."""
        return next((n for n, p in self.options if p == tuple(pair)), f"w{pair[0]}a{pair[1]}")

    def decode(self, x) -> Candidate:
        x = np.asarray(x).astype(int).reshape(-1)
        if x.size != self.n_var or x.min(initial=0) < 0 or x.max(initial=0) >= self.levels:
            raise QtoolError(f"genes {x.tolist()} do not fit the space ({self.n_var} genes in 0..{self.levels - 1})")
        bits = dict(self.fixed)
        for j, i in enumerate(self.searched):
            if self.options:
                bits[i] = self.options[x[j]][1]
            else:
                bits[i] = (self.choices[x[2 * j]], self.choices[x[2 * j + 1]])
        return Candidate(tuple(bits[i] for i in range(len(self.layers))))

    def encode(self, c: Candidate) -> np.ndarray:
        self.check(c)
        if self.options:
            idx = {p: k for k, (_, p) in enumerate(self.options)}
            return np.array([idx[c.bits[i]] for i in self.searched], dtype=int)
        idx = {b: k for k, b in enumerate(self.choices)}
        return np.array([idx[c.bits[i][k]] for i in self.searched for k in (0, 1)], dtype=int)

    def check(self, c: Candidate) -> None:
        if len(c.bits) != len(self.layers):
            raise QtoolError(f"candidate has {len(c.bits)} layers, the model {len(self.layers)}")
        pairs = self.pairs
        for i, (w, a) in enumerate(c.bits):
            allowed = [self.fixed[i]] if i in self.fixed else pairs
            if (w, a) not in allowed:
                raise QtoolError(f"layer {i} ({self.layers[i].node}): {self.option_name((w, a))} is not in the space")

    def uniform(self, b: int) -> Candidate:
        """All searched layers at w=b, a=b (fixed layers keep their bits): the grid's uniform baselines."""
        return self.uniform_pair((b, b))

    def uniform_pair(self, pair: tuple[int, int]) -> Candidate:
        return Candidate(tuple(self.fixed.get(i, tuple(pair)) for i in range(len(self.layers))))

    def uniform_members(self) -> list[tuple[str, Candidate]]:
        """The uniform baselines, least aggressive first: cpu float, int8, w4a8; grid w8a8, w4a4, w2a2 (each choice)."""
        if self.options:
            return [(n, self.uniform_pair(p)) for n, p in self.options]
        return [(f"w{b}a{b}", self.uniform(b)) for b in sorted(self.choices, reverse=True)]

    def uniform_pairs(self) -> list[Candidate]:
        """Every searched layer at the same (w, a), for each pair of choices: W8A8, W4A8, ..., W2A2 (grid);
        the uniform members (cpu)."""
        if self.options:
            return [c for _, c in self.uniform_members()]
        return [Candidate(tuple(self.fixed.get(i, (w, a)) for i in range(len(self.layers))))
                for w in sorted(self.choices, reverse=True) for a in sorted(self.choices, reverse=True)]

    def ends(self, low: int | None = None) -> tuple[Candidate, Candidate]:
        """(largest, smallest) configuration of the supernet's sandwich; `low`: the grid's small-end bits."""
        if self.options:
            if low is not None:
                raise QtoolError(f"sandwich_low applies to target grid; target {self.target!r}'s small end is "
                                 f"uniform {self.options[-1][0]}")
            return self.uniform_pair(self.options[0][1]), self.uniform_pair(self.options[-1][1])
        low = min(self.choices) if low is None else low
        if low not in self.choices:
            raise QtoolError(f"supernet evaluator: sandwich_low {low} is not one of the bit-widths {list(self.choices)}")
        return self.uniform(max(self.choices)), self.uniform(low)

    def random_genes(self, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.levels, self.n_var)

    def random(self, n: int, seed: int) -> list[Candidate]:
        rng = np.random.default_rng(seed)
        return [self.decode(self.random_genes(rng)) for _ in range(n)]

    # -- what a candidate means for the graph ----------------------------------------------------
    def tensor_bits(self, c: Candidate) -> dict[str, int]:
        """Bits of every tensor the QDQ graph can quantize (weights, every activation incl. sharers);
        FLOAT where it stays float (the rules: module docstring)."""
        self.check(c)
        read = {root: _widest(c.bits[i][1] for i in readers) for root, readers in self.group_readers.items()}
        w_bits = [w for w, _ in c.bits]
        out: dict[str, int] = {}
        for w, readers in self.weight_readers.items():
            out[w] = _widest(w_bits[i] for i in readers)
        for w in self.weights:
            out.setdefault(w, self.other_bits)  # a weight of a layer that is not an anchor (none today)
        for root, members in self.groups.items():
            if root in read:
                b = read[root]
            else:
                writers = self.group_writers.get(root, [])
                asked = root in self.pinned or not writers or any(w_bits[i] != FLOAT for i in writers)
                b = self.other_bits if asked else FLOAT
            for t in members:
                out[t] = b
        return out

    def quantized_bits(self, c: Candidate) -> dict[str, int]:
        """`tensor_bits` without the float tensors: what the candidate's QuantPlan holds."""
        return {t: b for t, b in self.tensor_bits(c).items() if b != FLOAT}

    def group_bit_options(self) -> dict[str, tuple[int, ...]]:
        """The bit-widths (FLOAT included) each weight / activation root can take over the whole space
        (a superset where float layers interact: the supernet holds a quantizer for each)."""
        def layer_pairs(i: int) -> list[tuple[int, int]]:
            return [self.fixed[i]] if i in self.fixed else self.pairs

        def can_float(i: int) -> bool:
            return any(w == FLOAT for w, _ in layer_pairs(i))

        def reachable(readers: list[int], kind: int) -> set[int]:
            vals, floor = set(), 0
            for i in readers:
                vs = {p[kind] for p in layer_pairs(i)} - {FLOAT}
                vals |= vs
                if not can_float(i):
                    floor = max(floor, min(vs))
            out = {max(floor, b) for b in vals}
            if all(can_float(i) for i in readers):
                out.add(FLOAT)
            return out

        opts = {w: reachable(r, 0) for w, r in self.weight_readers.items()}
        for root in self.groups:
            readers = self.group_readers.get(root)
            if readers:
                opts[root] = reachable(readers, 1)
                continue
            writers = self.group_writers.get(root, [])
            opts[root] = {self.other_bits}  # every layer has a quantized choice
            if root not in self.pinned and writers and all(can_float(i) for i in writers):
                opts[root].add(FLOAT)
        for w in self.weights:
            opts.setdefault(w, {self.other_bits})
        return {k: tuple(sorted(v)) for k, v in opts.items()}

    def effective(self, c: Candidate) -> list[tuple[int, int]]:
        """(w, a) each layer really computes with, after group resolution (see the module docstring)."""
        tb = self.tensor_bits(c)
        return [(tb[l.weight], tb.get(l.input, FLOAT)) for l in self.layers]

    def describe(self) -> dict:
        """What the logged numbers depend on (the resume check); a grid space describes itself as before."""
        out = {"choices": [n for n, _ in self.options] if self.options else list(self.choices),
               "fixed": {self.layers[i].node: list(v) for i, v in self.fixed.items()},
               "other_bits": self.other_bits,
               "layers": [{"node": l.node, "op": l.op, "weight": l.weight, "input": l.input, "macs": l.macs}
                          for l in self.layers]}
        if self.options:
            out["target"] = self.target
        return out


def weight_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise QtoolError(f"initializer {name!r} not found")
