"""Which tensors `qtool qat` quantizes at which bits (`resolve_bits`): the uniform bits with the first/last
policy, NNI-style rules, or a plan's per-tensor bits, over the quantization points of the fused graph
(`qtool.quant_points`); see `qtool.qat_config` for the rule syntax."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx

import passes
from qtool.errors import QtoolError
from qtool.qat_config import OP_TYPE_ALIASES, QATConfig, QuantRule
from qtool.quant_points import QUANTIZED, QuantPoints, first_last_tensors, from_marks, node_tensors

__all__ = ["TensorSpec", "resolve_bits"]


@dataclass(frozen=True)
class TensorSpec:
    kind: str  # activation | weight
    bits: int
    quant_delay: int
    uniform: bool = True  # bits from the uniform setting (not the first/last policy, a rule or a plan)


def _rule_nodes(rule: QuantRule, index: int, entries) -> list:
    types = set()
    for t in rule.op_types:
        expanded = OP_TYPE_ALIASES.get(t, (t,))
        if not any(n.op_type in expanded for n, _ in entries):
            raise QtoolError(f"config rule {index}: op type {t!r} is not a quantized op of the graph")
        types.update(expanded)
    hits = []
    for name in rule.op_names:
        found = [n for n, tens in entries if n.name == name or any(
            w == name or w == name + ".weight" for w in tens["weight"])]
        if not found:
            raise QtoolError(f"config rule {index}: op name {name!r} is not in the graph "
                             "(use a node name of the fused graph or its weight's name without '.weight')")
        hits += found
    return [n for n, _ in entries if n.op_type in types or any(n is h for h in hits)]


def resolve_bits(fused: onnx.ModelProto, config: QATConfig) -> dict[str, TensorSpec]:
    """Bits and start step of every tensor the QDQ placement quantizes (left-out tensors stay float)."""
    m = passes.to_ir(fused)
    points = from_marks(passes.mark_tensors(m.graph))
    tensors = [p for p in points if p.kind in QUANTIZED]  # biases follow their input and weight
    groups: dict[str, list[str]] = defaultdict(list)  # root -> tensors sharing its QDQ parameters
    for p in tensors:
        groups[p.root].append(p.tensor)

    def group(t: str) -> list[str]:
        return groups[points.root(t)]

    spec: dict[str, TensorSpec] = {}
    if config.plan_bits:
        given: dict[str, int] = {}
        for name, b in config.plan_bits:
            if points.kind(name) not in QUANTIZED:
                raise QtoolError(f"plan tensor {name!r} is not a quantization point of the fused graph "
                                 "(not an input, weight or output of a quantized op)")
            for t in group(name):
                if given.setdefault(t, b) != b:
                    raise QtoolError(f"plan gives {name!r} {b} bits but {t!r}, which must share its "
                                     f"parameters, {given[t]} bits")
        for t, b in given.items():
            spec[t] = TensorSpec(points[t].kind, b, config.quant_delay, uniform=False)
        _check_float_weights(m.graph, points, spec)
        return spec

    for p in tensors:
        spec[p.tensor] = TensorSpec(p.kind, config.weight_bits if p.kind == "weight" else config.act_bits,
                                    config.quant_delay)
    entries = node_tensors(m.graph, points)

    def assign(t: str, bits: int | None = None, delay: int | None = None) -> None:
        for u in group(t):
            if u in spec:
                s = spec[u]
                spec[u] = TensorSpec(s.kind, bits if bits is not None else s.bits,
                                     delay if delay is not None else s.quant_delay, s.uniform and bits is None)

    if config.first_last_bits is not None:
        for t in first_last_tensors(entries):
            assign(t, config.first_last_bits)
    for i, rule in enumerate(config.rules):
        tensors = dict(entries)
        for node in _rule_nodes(rule, i, entries):
            for qt in rule.quant_types:
                for t in tensors[node][qt]:
                    if rule.exclude:
                        for u in group(t):
                            spec.pop(u, None)
                    else:
                        assign(t, rule.bits_for(qt), rule.quant_start_step)
    _check_float_weights(m.graph, points, spec)
    return spec


def _check_float_weights(graph, points: QuantPoints, spec: dict[str, TensorSpec]) -> None:
    """onnxruntime quantizes a float Conv/ConvTranspose/Gemm weight itself (int8 per-tensor, its
    WeightBiasQuantization transformer) when the input comes from a DequantizeLinear: the exported
    model would then compute something the fake-quant model did not. Refuse that combination."""
    for node in graph:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if w is not None and points.kind(w.name) in QUANTIZED and w.name not in spec and x is not None and x.name in spec:
            raise QtoolError(f"weight {w.name!r} of {node.op_type} {node.name!r} is left float while its input is "
                             "quantized; onnxruntime would quantize it itself (int8 per-tensor): leave the input "
                             "float too (quant_types: [weight, input]) or quantize the weight")
