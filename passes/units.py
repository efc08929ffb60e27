"""Quantization units: a Conv / ConvTranspose / Gemm / MatMul and the activation that alone reads it.

Inside a unit there is no Q/DQ: the activation's output is the unit's quantized output. This is what
onnxruntime needs to form QLinearConv (Relu/Clip are absorbed by the output Q when its range starts at
0) and what QAT's fake-quant placement mirrors. The units of a fused graph are recorded as JSON in the
model's metadata under `qtool.units`, in graph order:

    [{"anchor": node name, "op": "Conv", "act": node name | null, "act_op": "Relu" | null,
      "input": tensor, "weight": tensor, "bias": tensor | null, "output": tensor}, ...]
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import onnx_ir as ir

from passes.core import sole_consumer

UNITS_KEY = "qtool.units"
ANCHOR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Only what the output Q absorbs (Q(relu(y)) is a clamp of Q(y)). onnxruntime fuses DQ -> Conv -> Q into
# QLinearConv only with nothing between Conv and Q: a LeakyRelu / HardSwish / Sigmoid inside the unit
# left the Conv in float (measured: FusedConv / Conv fallbacks). Those activations get their own Q / DQ.
UNIT_ACTIVATIONS = ("Relu", "Clip")


@dataclass(frozen=True)
class Unit:
    anchor: str
    op: str
    act: str | None
    act_op: str | None
    input: str
    weight: str
    bias: str | None
    output: str


def unit_activation(node: ir.Node) -> ir.Node | None:
    """The activation fused into `node`'s unit, if one alone reads its output."""
    nxt = sole_consumer(node.outputs[0])
    if nxt is None or nxt.op_type not in UNIT_ACTIVATIONS or nxt.domain not in ("", "ai.onnx"):
        return None
    if nxt.inputs[0] is not node.outputs[0]:
        return None
    # Clip's bounds must be constants (or absent) or the unit has a second data input.
    if nxt.op_type == "Clip" and any(v is not None and v.const_value is None for v in nxt.inputs[1:]):
        return None
    return nxt


def find_units(graph: ir.Graph) -> list[Unit]:
    units = []
    for node in graph:
        if node.op_type not in ANCHOR_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        act = unit_activation(node)
        out = (act or node).outputs[0]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        units.append(Unit(anchor=node.name, op=node.op_type, act=act.name if act else None,
                          act_op=act.op_type if act else None, input=node.inputs[0].name,
                          weight=node.inputs[1].name, bias=bias.name if bias is not None else None,
                          output=out.name))
    return units


def record_units(model: ir.Model) -> list[Unit]:
    units = find_units(model.graph)
    model.metadata_props[UNITS_KEY] = json.dumps([asdict(u) for u in units])
    return units


def read_units(metadata: dict[str, str]) -> list[Unit] | None:
    raw = metadata.get(UNITS_KEY)
    if raw is None:
        return None
    return [Unit(**d) for d in json.loads(raw)]
