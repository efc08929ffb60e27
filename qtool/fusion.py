"""`qtool fuse`: simplify, fold BatchNormalization and constant Mul/Add into
Conv/Gemm/MatMul, and record quantization units (docs/DESIGN.md, "passes").

    fused, summary = fuse(model)
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx_ir.passes.common import NameFixPass

import passes
from passes.core import Refusal
from qtool.errors import QtoolError
from qtool.io import upgrade_ir_version

log = logging.getLogger(__name__)

MAX_FUSE_ROUNDS = 8


# -- fuse ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FuseConfig:
    use_onnxsim: bool = True  # onnxsim's simplification before and between the folds

    def __post_init__(self):
        if not isinstance(self.use_onnxsim, bool):
            raise QtoolError(f"use_onnxsim must be true or false, got {self.use_onnxsim!r}")


@dataclass
class FuseSummary:
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    fused: list[str]
    refusals: list[Refusal]
    units: int
    rounds: int

    def lines(self) -> list[str]:
        out = [f"nodes: {self.nodes_before} -> {self.nodes_after} ({self.rounds} pass rounds), "
               f"{self.units} quantization units"]
        ops = sorted(set(self.ops_before) | set(self.ops_after))
        changed = [f"{op} {self.ops_before.get(op, 0)}->{self.ops_after.get(op, 0)}" for op in ops
                   if self.ops_before.get(op, 0) != self.ops_after.get(op, 0)]
        if changed:
            out.append("op counts: " + ", ".join(changed))
        out += [f"fused: {f.what}" for f in self.fused]
        out += [f"refused: {r.node}: {r.reason}" for r in self.refusals]
        return out


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def fuse(model: onnx.ModelProto, *, use_onnxsim: bool = True) -> tuple[onnx.ModelProto, FuseSummary]:
    """Simplify, fold BN and per-channel Mul/Add into Conv/Gemm, record quantization units.

    The input proto is not modified. Metadata (qtool.preprocess and others) is kept.
    """
    # A proto handed to the API directly has not been through load_model: an IR-3 graph lists its
    # initializers as inputs, which the folds would treat as overridable inputs.
    m = passes.to_ir(upgrade_ir_version(model))
    meta = dict(m.metadata_props)
    NameFixPass()(m)
    result = passes.run_to_fixpoint(m, passes.fuse_pipeline(use_onnxsim), max_iterations=MAX_FUSE_ROUNDS)
    m = result.model
    NameFixPass()(m)  # rewrites may add unnamed nodes; units are keyed by node name
    # After the fixpoint: onnxsim would merge the copies again inside the loop.
    untie = passes.UntieBiasesPass()
    untie(m)
    for k, v in meta.items():
        m.metadata_props.setdefault(k, v)
    units = passes.record_units(m)
    out = passes.to_proto(m)
    summary = FuseSummary(len(model.graph.node), len(out.graph.node), op_counts(model), op_counts(out),
                          list(result.fired) + untie.fired, list(result.refusals), len(units), result.iterations)
    return out, summary


def untie_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every Conv/Gemm bias its own initializer (see passes.untie); `fuse` does this
    already, this serves graphs fused before or elsewhere."""
    m = passes.to_ir(model)
    return passes.to_proto(m) if passes.UntieBiasesPass()(m).modified else model


WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization")


def check_finite_weights(model: onnx.ModelProto) -> None:
    """Refuse NaN/Inf in the constant inputs of Conv/Gemm/MatMul/BatchNormalization (exit 2, naming the
    tensor): folding or quantizing them would spread NaN through the model or give a NaN scale.
    Other initializers may legitimately hold -inf (attention masks) and are not checked."""
    inits = {t.name: t for t in model.graph.initializer}
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        for name in node.input:
            if name not in inits or name in seen:
                continue
            seen.add(name)
            a = onnx.numpy_helper.to_array(inits[name])
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
                raise QtoolError(f"weight {name!r} of {node.op_type} {node.name or '(unnamed)'!r} has {bad} NaN/Inf "
                                 "values; fix the model before fusing or quantizing")


def is_fused(model: onnx.ModelProto) -> bool:
    """True when `fuse` produced the model (it carries the quantization units)."""
    return any(p.key == passes.UNITS_KEY for p in model.metadata_props)
