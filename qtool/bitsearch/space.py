"""The search space: one weight and one activation bit-width per quantizable layer of the fused graph.

Layers are the Conv / ConvTranspose / Gemm / MatMul nodes of the fused graph whose weight
`passes.mark_tensors` quantizes, in node order. The first and the last layer are fixed (8 bits by
default); every other layer has two integer genes, indices into the sorted `bits` choices:
`[w_0, a_0, w_1, a_1, ...]` (pymoo's integer encoding, `xl = 0`, `xu = len(bits) - 1`).

From layer bits to tensor bits (what a QuantPlan holds, one QDQ pair per tensor):
- a layer's weight gets its `w` bits (a weight shared by several layers: the widest of them);
- a layer's `a` bits apply to its input activation. Tensors that share quantization parameters
  (a pass-through MaxPool/Flatten output and its source, `Marks.root`) form one group, and a group
  read by several layers (a residual block's input feeding a conv and the shortcut) gets the widest
  of their `a` bits: one tensor cannot have two bit-widths. The *effective* bits (`effective()`) are
  what FLOPs/BitOps are computed from, so the objectives describe the plan that is really exported.
- activation groups no layer reads (residual Add operands, the logits) stay at `other_bits` (8).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from qtool.errors import QtoolError
from qtool.quant_points import quant_points

ANCHORS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


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
    """Bits of every layer (fixed ones included), in layer order: ((w, a), ...)."""
    bits: tuple[tuple[int, int], ...]

    @property
    def key(self) -> str:
        return "-".join(f"w{w}a{a}" for w, a in self.bits)

    @classmethod
    def from_key(cls, key: str) -> "Candidate":
        try:
            parts = [p[1:].split("a") for p in key.split("-")]
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
    choices: tuple[int, ...]
    fixed: dict[int, tuple[int, int]]  # layer index -> (w, a)
    weight_readers: dict[str, list[int]]  # weight tensor -> layer indices
    groups: dict[str, list[str]]  # activation root -> tensors sharing its parameters (root first)
    group_readers: dict[str, list[int]]  # activation root -> layer indices reading the group
    other_bits: int = 8
    weights: dict[str, int | None] = field(default_factory=dict)  # weight -> per-channel axis

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_model(cls, fused: onnx.ModelProto, bits: tuple[int, ...] = (2, 4, 8), *, fix_first: int | None = 8,
                   fix_last: int | None = 8, other_bits: int = 8) -> "SearchSpace":
        """`fused`: a graph after `qtool.fusion.fuse`. fix_first/fix_last: bits of those layers
        (weights and input activations), or None to search them too."""
        choices = tuple(sorted(set(int(b) for b in bits)))
        if not choices or any(not 2 <= b <= 8 for b in choices):
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
        return cls(layers, choices, fixed, weight_readers, groups, group_readers, other_bits, weights)

    # -- encoding --------------------------------------------------------------------------------
    @property
    def searched(self) -> list[int]:
        return [i for i in range(len(self.layers)) if i not in self.fixed]

    @property
    def n_var(self) -> int:
        return 2 * len(self.searched)

    def decode(self, x) -> Candidate:
        x = np.asarray(x).astype(int).reshape(-1)
        if x.size != self.n_var or x.min(initial=0) < 0 or x.max(initial=0) >= len(self.choices):
            raise QtoolError(f"genes {x.tolist()} do not fit the space ({self.n_var} genes in 0..{len(self.choices) - 1})")
        bits = dict(self.fixed)
        for j, i in enumerate(self.searched):
            bits[i] = (self.choices[x[2 * j]], self.choices[x[2 * j + 1]])
        return Candidate(tuple(bits[i] for i in range(len(self.layers))))

    def encode(self, c: Candidate) -> np.ndarray:
        self.check(c)
        idx = {b: k for k, b in enumerate(self.choices)}
        return np.array([idx[c.bits[i][k]] for i in self.searched for k in (0, 1)], dtype=int)

    def check(self, c: Candidate) -> None:
        if len(c.bits) != len(self.layers):
            raise QtoolError(f"candidate has {len(c.bits)} layers, the model {len(self.layers)}")
        for i, (w, a) in enumerate(c.bits):
            allowed = [self.fixed[i]] if i in self.fixed else [(x, y) for x in self.choices for y in self.choices]
            if (w, a) not in allowed:
                raise QtoolError(f"layer {i} ({self.layers[i].node}): w{w}a{a} is not in the space")

    def uniform(self, b: int) -> Candidate:
        """All searched layers at w=b, a=b (fixed layers keep their bits): the uniform baselines."""
        return Candidate(tuple(self.fixed.get(i, (b, b)) for i in range(len(self.layers))))

    def uniform_pairs(self) -> list[Candidate]:
        """Every searched layer at the same (w, a), for each pair of choices: W8A8, W4A8, ..., W2A2."""
        return [Candidate(tuple(self.fixed.get(i, (w, a)) for i in range(len(self.layers))))
                for w in sorted(self.choices, reverse=True) for a in sorted(self.choices, reverse=True)]

    def random(self, n: int, seed: int) -> list[Candidate]:
        rng = np.random.default_rng(seed)
        return [self.decode(rng.integers(0, len(self.choices), self.n_var)) for _ in range(n)]

    # -- what a candidate means for the graph ----------------------------------------------------
    def tensor_bits(self, c: Candidate) -> dict[str, int]:
        """Bits of every tensor the QDQ graph quantizes (weights, every activation incl. sharers)."""
        self.check(c)
        out: dict[str, int] = {}
        for w, readers in self.weight_readers.items():
            out[w] = max(c.bits[i][0] for i in readers)
        for w in self.weights:
            out.setdefault(w, self.other_bits)  # a weight of a layer that is not an anchor (none today)
        for root, members in self.groups.items():
            readers = self.group_readers.get(root)
            b = max(c.bits[i][1] for i in readers) if readers else self.other_bits
            for t in members:
                out[t] = b
        return out

    def group_bit_options(self) -> dict[str, tuple[int, ...]]:
        """The bit-widths each weight / activation root can really take over the whole space."""
        def reachable(readers: list[int] | None, kind: int) -> set[int]:
            if not readers:
                return {self.other_bits}
            fixed = [self.fixed[i][kind] for i in readers if i in self.fixed]
            if len(fixed) == len(readers):
                return {max(fixed)}
            floor = max(fixed, default=0)
            return {max(floor, b) for b in self.choices}

        opts = {w: reachable(r, 0) for w, r in self.weight_readers.items()}
        opts.update({root: reachable(self.group_readers.get(root), 1) for root in self.groups})
        for w in self.weights:
            opts.setdefault(w, {self.other_bits})
        return {k: tuple(sorted(v)) for k, v in opts.items()}

    def effective(self, c: Candidate) -> list[tuple[int, int]]:
        """(w, a) each layer really computes with, after group resolution (see the module docstring)."""
        tb = self.tensor_bits(c)
        return [(tb[l.weight], tb[l.input]) for l in self.layers]

    def describe(self) -> dict:
        return {"choices": list(self.choices), "fixed": {self.layers[i].node: list(v) for i, v in self.fixed.items()},
                "other_bits": self.other_bits,
                "layers": [{"node": l.node, "op": l.op, "weight": l.weight, "input": l.input, "macs": l.macs}
                           for l in self.layers]}


def weight_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise QtoolError(f"initializer {name!r} not found")
