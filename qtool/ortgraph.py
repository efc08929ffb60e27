"""What onnxruntime actually runs: integer kernels vs float fallbacks in the optimized graph.

A QDQ model is only a promise. onnxruntime's graph optimizer fuses `DequantizeLinear -> Conv ->
QuantizeLinear` into `QLinearConv` (and MatMul/Gemm into `QLinearMatMul`/`QGemm`, ...) only when
the whole group is quantized: a Conv whose output has no `QuantizeLinear` stays a float Conv fed by
`DequantizeLinear` nodes, i.e. it runs in fp32 with extra dequantization cost. This module builds a
session, lets ORT save the graph it optimized (into a temporary directory, never the cwd) and counts:

- compute nodes (Conv, ConvTranspose, Gemm, MatMul and ORT's fused/layout variants such as
  `FusedConv` or `com.microsoft.nchwc:Conv`) that run as integer kernels vs in float,
- "float fallbacks": float compute nodes that a `DequantizeLinear` still feeds (possibly through
  pure data-movement ops such as Transpose/Reshape/ReorderInput), i.e. a QDQ group ORT did not fuse,
- other QLinear* ops, remaining Q/DQ nodes and a histogram of all op types.

Matching is done on the optimized graph itself because ORT renames the nodes it rewrites
(`conv0` becomes `r1_nchwc`, `_token_2`, ...): names cannot be used to pair input and output nodes.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from qtool.errors import QtoolError
import qtool.io
from qtool.io import load_model

log = logging.getLogger(__name__)

# Compute ops that run on integer (or low-bit weight) kernels, in any domain (default or com.microsoft).
INTEGER_COMPUTE_OPS = frozenset({
    "QLinearConv", "QLinearConvTranspose", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "QOrderedMatMul",
    # weight-only low-bit kernels: not fp32 compute, so not a fallback either
    "MatMulNBits", "MatMulBnb4", "MatMulFpQ4",
})
# Float compute ops, including ORT's fused and layout-transformed variants (FusedConv from
# Conv+Relu, com.microsoft.nchwc:Conv, NHWC convs of GPU EPs, FusedMatMul from MatMul+Transpose).
FLOAT_COMPUTE_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul",
    "TransposeMatMul", "NhwcConv", "NhwcFusedConv",
})
QUANTIZE_OPS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear"})
DEQUANTIZE_OPS = frozenset({"DequantizeLinear"})
# Ops that only move data: a DequantizeLinear behind them still "feeds" the compute node.
_PASSTHROUGH_OPS = frozenset({
    "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "ReorderInput", "ReorderOutput",
})

_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


@dataclass(frozen=True)
class IntegerKernelReport:
    """Counts over the graph onnxruntime optimized for `providers` at `optimization` level."""

    providers: tuple[str, ...]
    optimization: str
    integer_compute: int  # compute nodes running integer kernels
    float_compute: int  # compute nodes running in float (fallbacks included)
    float_fallbacks: int  # float compute nodes still fed by a DequantizeLinear
    fallback_nodes: tuple[str, ...]  # "name (op_type)" of each fallback, optimized-graph names
    qdq_compute_in_input: int  # compute nodes of the input model that a DequantizeLinear feeds
    quantize_linear: int  # QuantizeLinear / DynamicQuantizeLinear left in the optimized graph
    dequantize_linear: int
    integer_ops: dict[str, int] = field(default_factory=dict, hash=False)
    other_qlinear: dict[str, int] = field(default_factory=dict, hash=False)  # QLinearAdd, ...
    op_histogram: dict[str, int] = field(default_factory=dict, hash=False)  # "domain:Op" outside ai.onnx

    @property
    def compute_nodes(self) -> int:
        return self.integer_compute + self.float_compute

    def to_dict(self) -> dict:
        return {
            "providers": list(self.providers),
            "optimization": self.optimization,
            "compute_nodes": self.compute_nodes,
            "integer_compute": self.integer_compute,
            "float_compute": self.float_compute,
            "float_fallbacks": self.float_fallbacks,
            "fallback_nodes": list(self.fallback_nodes),
            "qdq_compute_in_input": self.qdq_compute_in_input,
            "quantize_linear": self.quantize_linear,
            "dequantize_linear": self.dequantize_linear,
            "integer_ops": dict(self.integer_ops),
            "other_qlinear": dict(self.other_qlinear),
            "op_histogram": dict(self.op_histogram),
        }



def tap_session(model: onnx.ModelProto, tensors: Iterable[str], purpose: str) -> ort.InferenceSession:
    """An unoptimized CPU session of `model` that also outputs `tensors` (intermediate values, read by
    calibration, GPTQ's Hessians, the rescalings' activation maxima and the error report): unoptimized
    so that no fusion removes a tensor asked for. A model onnxruntime cannot load is a QtoolError naming
    `purpose` ("calibration", ...)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in dict.fromkeys(tensors) if t not in have)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise QtoolError(f"onnxruntime cannot load the model for {purpose}: {str(e).splitlines()[0]}") from None

def tap_runs(model: onnx.ModelProto, batches: Iterable[dict], tensors: Iterable[str], purpose: str,
             max_batches: int | None = None) -> Iterator[tuple[dict, dict]]:
    """(feed, {tensor: value}) for each of `batches` (at most `max_batches`) run through `tap_session`:
    `tensors` may name graph inputs (taken from the feed), intermediate tensors and graph outputs. A batch
    that is not a dict of the model's inputs, or that onnxruntime refuses, is a QtoolError naming `purpose`."""
    tensors = list(dict.fromkeys(tensors))
    inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    fetch = [t for t in tensors if t not in inputs]
    sess = tap_session(model, fetch, purpose)
    feed_names = [i.name for i in sess.get_inputs()]
    for n, batch in enumerate(batches):
        if max_batches is not None and n >= max_batches:
            return
        if not isinstance(batch, dict):
            raise QtoolError(f"{purpose} batches must be dicts of input name -> array, got {type(batch).__name__}")
        missing = [k for k in feed_names if k not in batch]
        if missing:
            raise QtoolError(f"{purpose} batch lacks model inputs {missing}")
        feed = {k: np.asarray(batch[k]) for k in feed_names}
        try:
            values = dict(zip(fetch, sess.run(fetch, feed)))
        except Exception as e:
            raise QtoolError(f"{purpose} run failed: {str(e).splitlines()[0]}") from None
        values.update({t: feed[t] for t in tensors if t in inputs})
        yield feed, values


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Nodes of the graph and of every nested subgraph (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _float_compute_fed_by_dequantize(nodes: Iterable[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Float compute nodes with a DequantizeLinear behind one of their inputs (an unfused QDQ group)."""
    nodes = list(nodes)
    producer = {out: n for n in nodes for out in n.output if out}

    def from_dq(tensor: str, depth: int = 0) -> bool:
        n = producer.get(tensor)
        if n is None or depth > 16:  # graph input / initializer, or a pathological chain
            return False
        if n.op_type in DEQUANTIZE_OPS:
            return True
        return n.op_type in _PASSTHROUGH_OPS and bool(n.input) and from_dq(n.input[0], depth + 1)

    return [n for n in nodes if n.op_type in FLOAT_COMPUTE_OPS and any(from_dq(t) for t in n.input if t)]


def _hist_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


def _check_providers(providers: Iterable[str]) -> tuple[str, ...]:
    if isinstance(providers, str):  # a bare string would otherwise be iterated char by char
        providers = (providers,)
    providers = tuple(providers)
    if not providers:
        raise QtoolError("no execution provider given")
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise QtoolError(f"execution provider {missing[0]} is not available here (available: {', '.join(available)})")
    return providers


def optimized_graph(source: bytes | str, providers: tuple[str, ...], optimization: str = "all") -> onnx.ModelProto:
    """Let ORT optimize a model (bytes or file path) for `providers` and return the saved graph.

    Initializers go to an external file that is never read: only the graph structure matters here,
    and it keeps models near the 2 GiB protobuf limit loadable.
    """
    if optimization not in _LEVELS:
        raise QtoolError(f"unknown optimization level {optimization!r} (use one of: {', '.join(_LEVELS)})")
    with tempfile.TemporaryDirectory(prefix="qtool-ortgraph-") as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = _LEVELS[optimization]
        so.optimized_model_filepath = out
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        # ORT warns that a saved ENABLE_ALL graph is hardware specific: true, and irrelevant here.
        so.log_severity_level = 3
        try:
            sess = ort.InferenceSession(source, so, providers=list(providers))
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QtoolError(f"onnxruntime cannot build a session with {', '.join(providers)}: {msg}") from None
        # ORT silently replaces a provider it cannot create with CPU: never count the wrong graph.
        if sess.get_providers()[0] != providers[0]:
            raise QtoolError(f"onnxruntime fell back from {providers[0]} to {sess.get_providers()[0]}")
        del sess
        if not Path(out).is_file():
            raise QtoolError(f"onnxruntime did not save the optimized graph for {', '.join(providers)} "
                             "(compiling EPs such as TensorRT cannot serialize it)")
        return onnx.load(out, load_external_data=False)


def integer_kernel_report(model: onnx.ModelProto | str | os.PathLike,
                          providers: Iterable[str] = ("CPUExecutionProvider",), *,
                          optimization: str = "all") -> IntegerKernelReport:
    """Count integer kernels and float fallbacks in the graph ORT runs for `model` on `providers`.

    `model` is a ModelProto or a path (read with qtool.io.load_model). `optimization` is "all"
    (ORT_ENABLE_ALL, what a default session runs, layout transforms included) or "extended".
    """
    providers = _check_providers(providers)
    if optimization not in _LEVELS:
        raise QtoolError(f"unknown optimization level {optimization!r} (use one of: {', '.join(_LEVELS)})")
    if isinstance(model, onnx.ModelProto):
        proto = model
        if proto.ByteSize() >= qtool.io.EXTERNAL_DATA_THRESHOLD:
            raise QtoolError("model is over the 2 GiB protobuf limit: pass its file path instead")
        source: bytes | str = proto.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        proto = load_model(model)
        # Bytes carry an upgraded opset; a path is only needed when protobuf cannot hold the model.
        source = proto.SerializeToString() if proto.ByteSize() < qtool.io.EXTERNAL_DATA_THRESHOLD else str(model)
    else:
        raise QtoolError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")

    qdq_in_input = len(_float_compute_fed_by_dequantize(_all_nodes(proto.graph)))
    opt_nodes = list(_all_nodes(optimized_graph(source, providers, optimization).graph))
    fallbacks = _float_compute_fed_by_dequantize(opt_nodes)
    ops = Counter(n.op_type for n in opt_nodes)
    report = IntegerKernelReport(
        providers=providers,
        optimization=optimization,
        integer_compute=sum(c for op, c in ops.items() if op in INTEGER_COMPUTE_OPS),
        float_compute=sum(c for op, c in ops.items() if op in FLOAT_COMPUTE_OPS),
        float_fallbacks=len(fallbacks),
        fallback_nodes=tuple(f"{n.name or '<unnamed>'} ({n.op_type})" for n in fallbacks),
        qdq_compute_in_input=qdq_in_input,
        quantize_linear=sum(ops[op] for op in QUANTIZE_OPS),
        dequantize_linear=sum(ops[op] for op in DEQUANTIZE_OPS),
        integer_ops={op: c for op, c in sorted(ops.items()) if op in INTEGER_COMPUTE_OPS},
        other_qlinear={op: c for op, c in sorted(ops.items())
                       if op.startswith("QLinear") and op not in INTEGER_COMPUTE_OPS},
        op_histogram=dict(sorted(Counter(_hist_key(n) for n in opt_nodes).items())),
    )
    if fallbacks:
        log.debug("float fallbacks (QDQ groups ORT did not fuse): %s", ", ".join(report.fallback_nodes))
    return report
