"""The quantization points of a fused graph: where the exported QDQ model has a Q/DQ pair.

One view, computed once from `passes.mark_tensors` (the same marking the QDQ insertion and PTQ's
plan builder use), that every torch-side quantized model reads to decide where its quantizers go:
`qtool qat`, the search's `QuantNet` (via `SearchSpace`) and the dynamic trainer's `DynamicNet`.
A quantizer placed anywhere else would compute something the exported graph does not.

- weight: a constant weight of Conv / ConvTranspose / Gemm / MatMul, per-channel on `axis` when
  that is unambiguous (None: per tensor);
- activation: a float tensor read or written by a quantized op. Pass-through outputs (MaxPool,
  Flatten, Reshape, ...) share the parameters of the tensor they read: `root` names it (a root is
  its own root), since onnxruntime drops their QDQ only when the parameters are equal;
- bias: the int32 bias of a quantized Conv/Gemm; its scale is s_input * s_weight, so it has no
  parameters of its own (`inputs` = (input activation, weight)).
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

import passes
from passes.qdq import ABSORBED_ACTS
from passes.units import ANCHOR_OPS, unit_activation

__all__ = ["QuantPoint", "QuantPoints", "quant_points", "from_marks", "node_tensors", "first_last_tensors"]

KINDS = ("weight", "activation", "bias")
QUANTIZED = ("weight", "activation")  # the points with parameters of their own (biases follow input and weight)


@dataclass(frozen=True)
class QuantPoint:
    tensor: str
    kind: str  # weight | activation | bias
    root: str  # the tensor whose quantization parameters this one uses (itself unless a pass-through output)
    axis: int | None = None  # weights: the per-channel axis (None: per tensor)
    inputs: tuple[str, ...] = ()  # biases: (input activation, weight)


@dataclass(frozen=True)
class QuantPoints:
    """The points in graph-marking order, with the lookups the quantized models need."""
    points: tuple[QuantPoint, ...]

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {p.tensor: p for p in self.points})

    def __contains__(self, tensor: str) -> bool:
        return tensor in self._by_name

    def __getitem__(self, tensor: str) -> QuantPoint:
        return self._by_name[tensor]

    def __iter__(self):
        return iter(self.points)

    def __len__(self) -> int:
        return len(self.points)

    def kind(self, tensor: str) -> str | None:
        """weight | activation | bias, None where the QDQ graph leaves the tensor float."""
        p = self._by_name.get(tensor)
        return None if p is None else p.kind

    def of_kind(self, kind: str) -> list[QuantPoint]:
        return [p for p in self.points if p.kind == kind]

    def root(self, tensor: str) -> str:
        return self._by_name[tensor].root

    def weights(self) -> dict[str, int | None]:
        """Weight -> per-channel axis (None: per tensor)."""
        return {p.tensor: p.axis for p in self.of_kind("weight")}

    def activation_roots(self) -> list[str]:
        return list(dict.fromkeys(p.root for p in self.of_kind("activation")))

    def groups(self) -> dict[str, list[str]]:
        """Activation root -> the tensors sharing its parameters, root first (one QDQ parameter set each)."""
        out: dict[str, list[str]] = {}
        for p in self.of_kind("activation"):
            out.setdefault(p.root, []).append(p.tensor)
        for root, members in out.items():
            members.sort(key=lambda n: n != root)
        return out

    def biases(self) -> dict[str, tuple[str, str]]:
        """Bias -> (input activation, weight)."""
        return {p.tensor: p.inputs for p in self.of_kind("bias")}

    def sharing(self, tensor: str) -> list[str]:
        """The tensors that must take `tensor`'s bits: its activation group, or the weight alone."""
        p = self._by_name[tensor]
        if p.kind != "activation":
            return [tensor]
        return [q.tensor for q in self.of_kind("activation") if q.root == p.root]


def from_marks(marks) -> QuantPoints:
    """The points of a `passes.mark_tensors` result (for callers that already hold the IR graph)."""
    pts = []
    for name, role in marks.tensors.items():
        root = marks.root(name) if role.kind == "activation" else name
        pts.append(QuantPoint(name, role.kind, root, role.axis if role.kind == "weight" else None))
    pts += [QuantPoint(b, "bias", b, None, (inp, w)) for b, (inp, w) in marks.biases.items()]
    return QuantPoints(tuple(pts))


def quant_points(fused: onnx.ModelProto) -> QuantPoints:
    """The quantization points of a fused model (module docstring)."""
    return from_marks(passes.mark_tensors(passes.to_ir(fused).graph))


def node_tensors(graph, points: QuantPoints) -> list[tuple[object, dict[str, list[str]]]]:
    """(node, {weight|input|output: [quantized tensor names]}) for every node of the IR graph touching the
    placement; an anchor's output is that of its unit (the fused activation's)."""
    out = []
    for node in graph:
        ins = [v.name for v in node.inputs if v is not None]
        weight = [n for n in ins if points.kind(n) == "weight"]
        inputs = [n for n in ins if points.kind(n) == "activation"]
        act = unit_activation(node) if node.op_type in ANCHOR_OPS + ("Add", "Mul") else None
        if node.op_type in ANCHOR_OPS:
            o = (act or node).outputs[0]
        elif act is not None and act.op_type in ABSORBED_ACTS:
            o = act.outputs[0]
        else:
            o = node.outputs[0]
        outputs = [o.name] if o is not None and points.kind(o.name) in QUANTIZED else []
        if weight or inputs or outputs:
            out.append((node, {"weight": weight, "input": inputs, "output": outputs}))
    return out


def first_last_tensors(entries) -> list[str]:
    """What the first/last-layer policy keeps at higher bits, from `node_tensors`: the first weighted
    Conv/Gemm/MatMul's weight and input, the last one's weight, input and output (the model's most
    quantization-sensitive tensors: the raw image and the logits). Empty without a weighted anchor."""
    anchors = [t for n, t in entries if n.op_type in ANCHOR_OPS and t["weight"]]
    if not anchors:
        return []
    tf, tl = anchors[0], anchors[-1]
    return tf["weight"] + tf["input"] + tl["weight"] + tl["input"] + tl["output"]
