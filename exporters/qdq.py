"""QDQ format: exporters.qdq.apply_plan (QuantizeLinear/DequantizeLinear pairs around float ops),
optionally with packed 4-bit weights.

Sub-8-bit weights. A b-bit weight (2..7) is stored as int8 codes in the narrowed b-bit range (int4:
[-7, 7], int2: [-1, 1]) with an int8 DequantizeLinear: exact, runs everywhere, but takes 1 byte per
weight. With `int4="on"|"auto"` weights of <= 4 bits are instead written as packed INT4 / UINT4
initializers (2 per byte) with an INT4 zero point, which needs DequantizeLinear-21 (the model is
converted to opset 21 by onnx's version converter, IR version raised to 10; the checker verifies the
result). Whether onnxruntime then still runs the layer as an integer kernel depends on the EP; `int4="auto"` measures it with qtool.ortgraph and keeps the int8 containers when the
int4 graph loses integer kernels (logged and written into the report's notes).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import passes
from qtool.errors import QtoolError
from qtool.io import check_model, default_opset
from qtool.plan import QuantPlan

log = logging.getLogger(__name__)

INT4_OPSET = 21
INT4_IR_VERSION = 10
INT4_MODES = ("auto", "on", "off")


def pack_4bit(codes: np.ndarray, signed: bool) -> bytes:
    """ONNX 4-bit layout: element 2i in the low nibble, 2i+1 in the high nibble, zero-padded."""
    flat = codes.astype(np.int16).ravel()
    if signed and (flat.min(initial=0) < -8 or flat.max(initial=0) > 7):
        raise ValueError("int4 codes out of [-8, 7]")
    if not signed and (flat.min(initial=0) < 0 or flat.max(initial=0) > 15):
        raise ValueError("uint4 codes out of [0, 15]")
    nib = (flat & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_4bit(raw: bytes, n: int, signed: bool) -> np.ndarray:
    b = np.frombuffer(raw, np.uint8)
    nib = np.empty(b.size * 2, np.int16)
    nib[0::2], nib[1::2] = b & 0xF, b >> 4
    nib = nib[:n]
    return np.where(nib > 7, nib - 16, nib).astype(np.int8) if signed else nib.astype(np.uint8)


def _tensor_4bit(array: np.ndarray, name: str, signed: bool) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT4 if signed else TensorProto.UINT4, list(array.shape),
                              pack_4bit(array, signed), raw=True)


def pack_int4_weights(qdq: onnx.ModelProto, plan: QuantPlan) -> tuple[onnx.ModelProto, list[str]]:
    """Copy of a QDQ model with the weights of <= 4 bits as packed INT4/UINT4 initializers."""
    out = _at_least_opset(qdq, INT4_OPSET)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    packed = []
    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.output[0] not in plan.tensors:
            continue
        tq = plan.tensors[n.output[0]]
        if tq.kind != "weight" or tq.bits > 4 or len(n.input) < 3:
            continue
        for k in (0, 2):
            src = inits.get(n.input[k])
            if src is None:
                break
            name = n.input[k]
            if uses.get(name, 0) > 1:  # shared zero point: give this DQ its own
                name = f"{name}_{n.output[0]}_4bit"
            t = _tensor_4bit(numpy_helper.to_array(src), name, tq.signed)
            if name == n.input[k]:
                src.CopyFrom(t)
            else:
                g.initializer.append(t)
                n.input[k] = name
        else:
            packed.append(n.output[0])
    # value_info still typing the repacked initializers as int8 would contradict them.
    retyped = {n.input[k] for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] in packed for k in (0, 2)}
    keep = [vi for vi in g.value_info if vi.name not in retyped]
    del g.value_info[:]
    g.value_info.extend(keep)
    out.ir_version = max(out.ir_version, INT4_IR_VERSION)
    return out, packed


def _at_least_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """A copy of `model` at default-domain opset >= `opset`, converted by onnx's version converter: ops whose
    signature changed on the way (ReduceMean's axes became an input at 18, ...) are rewritten, not relabelled."""
    from onnx import version_converter

    now = default_opset(model)
    if now >= opset:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    try:
        return version_converter.convert_version(model, opset)
    except Exception as e:
        raise QtoolError(f"packed int4 weights need opset {opset}; onnx cannot convert this opset-{now} model: "
                         f"{str(e).strip().splitlines()[0][:200]} (export with int4 weights off)") from None


def apply_plan(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """The QDQ model of a calibrated plan: one shared Q/DQ pair per planned tensor of its fused model
    (passes.InsertQDQPass). Every stage that turns a plan into a QDQ graph comes through here."""
    return _run_plan_pass(model, plan, passes.InsertQDQPass(plan), "QDQ insertion")


def _run_plan_pass(model: onnx.ModelProto, plan: QuantPlan, qpass, what: str) -> onnx.ModelProto:
    """A calibrated plan's pass applied to a copy of `model`, the result checked."""
    plan.validate(model)
    if not plan.calibrated:
        missing = [k for k, t in plan.tensors.items() if not t.calibrated][:5]
        raise QtoolError(f"plan has tensors without scale/zero_point (calibrate first): {missing}")
    m = passes.to_ir(model)
    try:
        qpass(m)
    except Exception as e:
        raise RuntimeError(f"{what} failed: {e}") from e
    out = passes.to_proto(m)
    check_model(out, "quantized")
    return out


def apply_dynamic_plan(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """The dynamically quantized model of a weights-only plan: each planned MatMul / Gemm weight int8,
    its input quantized at run time (passes.DynamicQuantPass)."""
    acts = [k for k, t in plan.tensors.items() if t.kind != "weight"][:5]
    if acts:
        raise QtoolError(f"a dynamic plan holds weights only; it names activations {acts}")
    return _run_plan_pass(model, plan, passes.DynamicQuantPass(plan), "dynamic quantization")
