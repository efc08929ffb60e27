"""Lowering a fused float graph + QuantPlan to integer operators (QOperator and integer-only formats).

The walk follows the fused graph in order and keeps, per source tensor, either its float name or a
`QTensor` (the name of its integer codes in the new graph plus the plan's scale / zero point). The
input is quantized once; a quantized tensor stays in codes through every op that has an integer
lowering; graph outputs are dequantized under their original names. What each op becomes is a
`Backend` method (exporters.qoperator, exporters.integer).

Lowered patterns (what passes.qdq marks, so the numbers equal the QDQ model's up to rounding):

- quantization units: Conv / Gemm / MatMul with a constant weight, optionally followed by the
  sole-consumer Relu / Clip whose output the plan quantizes. Relu and Clip become bounds on the output
  codes: Q(relu(y)) = clip(Q(y), z, qmax) and Q(clip(y, a, b)) = clip(Q(y), Q(a), Q(b)) exactly,
  because rounding is monotonic.
- Add of two quantized tensors (+ sole-consumer Relu / Clip), GlobalAveragePool.
- elementwise activations between two quantized tensors (LeakyRelu, Sigmoid, HardSwish, HardSigmoid, Tanh,
  Elu, Relu; `LOOKUP_OPS`): a 256-entry table of output codes indexed by the input codes (Cast -> Gather),
  integer-only. Entry c is Q_out(f(DQ_in(c))) with f evaluated by onnxruntime's own float kernel of the
  node, so it equals the QDQ model's DQ -> f -> Q on every code (what ORT's QLinearSigmoid does too).
- data movement (Slice, Pad with constant 0 -> code z, MaxPool, Reshape, Flatten, Transpose,
  Squeeze, Unsqueeze, Identity) on codes: exact, the output keeps the input's scale / zero point;
  where the plan gives the output its own parameters the codes are requantized.
- sub-8-bit activations live in 8-bit containers, their codes clipped to the b-bit range.

Input preprocessing. A chain of Sub / Div / Mul / Add by float constants that starts at a graph input and
ends at the first quantized tensor (an input normalization `(x - mean) / std` kept in the graph, per
channel or not) stays float and runs before the input QuantizeLinear, exactly as in the QDQ model. It is
not folded into the QuantizeLinear: Q((x - m) / s) = round(x / (s s_q) - m / (s s_q)) + z needs a
non-integer zero point m / (s s_q), and any rounding of it changes codes, whereas float32 Sub / Div
before the same QuantizeLinear give the QDQ model's codes bit for bit. Everything after the input
QuantizeLinear is still integer-only; the report's notes list these nodes.

Anything else is a float island (DequantizeLinear -> float op -> QuantizeLinear) where the backend
allows it (QOperator), or a QtoolError naming the node (integer-only).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.common import Builder, bias_int32, source_constants
from passes.qdq import quantize_array
from qtool.errors import QtoolError
from qtool.plan import QuantPlan, TensorQuant

log = logging.getLogger(__name__)

ANCHORS = ("Conv", "Gemm", "MatMul")
LOOKUP_OPS = ("LeakyRelu", "Sigmoid", "HardSwish", "HardSigmoid", "Tanh", "Elu", "Relu")
PREPROCESS_OPS = ("Sub", "Div", "Mul", "Add")  # by constants, between a graph input and its quantizer
DATA_MOVEMENT = ("Slice", "Pad", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
CONTAINER = {np.uint8: (0, 255), np.int8: (-128, 127)}
ONNX_TYPE = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}


@dataclass(frozen=True)
class QTensor:
    """Integer codes of one tensor in the exported graph: real = scale * (code - zp)."""
    codes: str
    scale: float
    zp: int  # in the container type
    dtype: type  # np.uint8 | np.int8
    lo: int  # valid code range (the plan's b-bit range, activation bounds applied)
    hi: int

    @property
    def narrowed(self) -> bool:
        return (self.lo, self.hi) != CONTAINER[self.dtype]


@dataclass(frozen=True)
class Weight:
    codes: np.ndarray  # int8, the source layout
    scale: np.ndarray  # float32, () or (C,)
    axis: int | None


class Backend:
    """Integer lowerings of one output format. Every method returns the name of the output codes."""

    allow_float = True  # may fall back to float islands
    name = "?"

    def container(self, tq: TensorQuant) -> tuple[type, int]:
        """(container dtype, code shift) for an activation of the plan."""
        return (np.int8, 0) if tq.signed else (np.uint8, 0)

    def quantize_input(self, b: Builder, x: str, t: QTensor, base: str) -> str:
        s = b.const(np.float32(t.scale), f"{base}_scale")
        z = b.const(t.dtype(t.zp), f"{base}_zero_point")
        return b.node("QuantizeLinear", [x, s, z], f"{base}_quantized")

    def dequantize(self, b: Builder, q: QTensor, base: str, out: str | None = None) -> str:
        s = b.const(np.float32(q.scale), f"{base}_scale")
        z = b.const(q.dtype(q.zp), f"{base}_zero_point")
        return b.node("DequantizeLinear", [q.codes, s, z], f"{base}_dequantized", out=out)

    def clip_codes(self, b: Builder, codes: str, t: QTensor, base: str) -> str:
        lo, hi = b.const(t.dtype(t.lo), f"{base}_lo"), b.const(t.dtype(t.hi), f"{base}_hi")
        return b.node("Clip", [codes, lo, hi], f"{base}_clipped")

    def conv(self, b, node, x: QTensor, w: Weight, bias, t: QTensor, base) -> str: raise NotImplementedError
    def gemm(self, b, node, x: QTensor, w: Weight, bias, t: QTensor, trans_b: bool, base) -> str: raise NotImplementedError
    def add(self, b, a: QTensor, c: QTensor, t: QTensor, base) -> str: raise NotImplementedError
    def global_avg_pool(self, b, x: QTensor, t: QTensor, shape: list | None, base) -> str: raise NotImplementedError
    def requantize(self, b, x: QTensor, t: QTensor, base) -> str: raise NotImplementedError


def _code(value: float, t: QTensor) -> int:
    """QuantizeLinear of a float constant with t's parameters (float32 division, half to even)."""
    return int(np.clip(np.rint(np.float32(value) / np.float32(t.scale)) + t.zp, *CONTAINER[t.dtype]))


def _lookup_table(node: onnx.NodeProto, x: QTensor, t: QTensor) -> np.ndarray:
    """Output code for every input code of an elementwise node: Q_t(f(DQ_x(c))), f run by onnxruntime."""
    import onnxruntime as ort

    lo, hi = CONTAINER[x.dtype]
    codes = np.arange(lo, hi + 1)
    real = (codes - x.zp).astype(np.float32) * np.float32(x.scale)  # DequantizeLinear, float32
    one = helper.make_node(node.op_type, ["x"], ["y"], **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    g = helper.make_graph([one], "lookup", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(codes)])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(codes)])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    y = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": real})[0]
    q = np.rint(y.astype(np.float32) / np.float32(t.scale)) + t.zp  # QuantizeLinear: float32 division, half to even
    return np.clip(q, t.lo, t.hi).astype(t.dtype)


class _Lowering:
    def __init__(self, model: onnx.ModelProto, plan: QuantPlan, backend: Backend):
        self.src, self.plan, self.be = model, plan, backend
        g = model.graph
        self.g = g
        self.b = Builder(g)
        self.consts = source_constants(g)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self.env: dict[str, QTensor] = {}  # source tensor -> codes
        self.float_cache: dict[str, str] = {}  # source tensor -> float name in the new graph
        self.done: set[int] = set()
        self.notes: list[str] = []
        self.float_nodes: list[str] = []
        self.graph_inputs = {i.name for i in g.input if i.name not in self.consts}
        self.pre = set(self.graph_inputs)  # float tensors computed from graph inputs by preprocessing only
        self.preprocess: list[str] = []
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
                       for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}

    # -- tensors ---------------------------------------------------------------------------------
    def target(self, name: str, codes: str = "") -> QTensor:
        tq = self.plan.tensors[name]
        dtype, shift = self.be.container(tq)
        lo, hi = tq.qrange
        return QTensor(codes, float(np.float32(tq.scale)), int(tq.zero_point) + shift, dtype, lo + shift, hi + shift)

    def q(self, name: str) -> QTensor | None:
        """Codes of a source tensor, quantizing a float one the plan covers (graph input or float island)."""
        if name in self.env:
            return self.env[name]
        tq = self.plan.tensors.get(name)
        if tq is None or tq.kind != "activation":
            return None
        if not self.be.allow_float and name not in self.pre:
            raise QtoolError(f"integer export: tensor {name!r} is float (produced by an op without an integer lowering)")
        t = self.target(name)
        codes = self.be.quantize_input(self.b, self.f(name), t, name)
        if t.narrowed:
            codes = self.be.clip_codes(self.b, codes, t, name)
        self.env[name] = replace(t, codes=codes)
        return self.env[name]

    def f(self, name: str) -> str:
        """Float value of a source tensor in the new graph."""
        if name not in self.env:
            if name in self.consts and name not in self.b.inits:
                self.b.add_init(numpy_helper.from_array(self.consts[name], name))
            return name
        if name not in self.float_cache:
            if not self.be.allow_float:
                raise QtoolError(f"integer export: tensor {name!r} would be dequantized inside the graph")
            self.float_cache[name] = self.be.dequantize(self.b, self.env[name], name)
        return self.float_cache[name]

    def bind(self, name: str, t: QTensor, codes: str) -> None:
        self.env[name] = replace(t, codes=codes)

    # -- patterns --------------------------------------------------------------------------------
    def unit_output(self, node: onnx.NodeProto) -> tuple[str, onnx.NodeProto | None] | None:
        y = node.output[0]
        if y in self.plan.tensors:
            return y, None
        users = self.consumers.get(y, [])
        if y in self.outputs or len(users) != 1:
            return None
        act = users[0]
        if act.op_type in ("Relu", "Clip") and act.domain in ("", "ai.onnx") and act.input[0] == y \
                and act.output[0] in self.plan.tensors:
            if act.op_type == "Clip" and any(i and i not in self.consts for i in act.input[1:]):
                return None
            return act.output[0], act
        return None

    def bounded(self, t: QTensor, act: onnx.NodeProto | None) -> QTensor:
        if act is None:
            return t
        lo, hi = t.lo, t.hi
        if act.op_type == "Relu":
            lo = max(lo, _code(0.0, t))
        else:
            ins = list(act.input) + ["", ""]
            if ins[1]:
                lo = max(lo, _code(float(self.consts[ins[1]]), t))
            if ins[2]:
                hi = min(hi, _code(float(self.consts[ins[2]]), t))
        return replace(t, lo=lo, hi=min(max(hi, lo), t.hi))

    def weight(self, name: str) -> Weight | None:
        tq = self.plan.tensors.get(name)
        if tq is None or tq.kind != "weight" or name not in self.consts:
            return None
        zps = np.atleast_1d(np.asarray(tq.zero_point))
        if np.any(zps != 0) or not tq.signed:
            self.notes.append(f"weight {name}: non-symmetric weights have no integer lowering here")
            return None
        axis = tq.axis if tq.granularity == "per_channel" else None
        lo, hi = tq.qrange
        codes = quantize_array(self.consts[name], tq.scale, tq.zero_point, axis, lo, hi, np.int8)
        return Weight(codes, np.asarray(tq.scale, np.float32), axis)

    def try_anchor(self, node: onnx.NodeProto) -> bool:
        if len(node.input) < 2:
            return False
        uo = self.unit_output(node)
        x = self.q(node.input[0]) if uo is not None else None
        w = self.weight(node.input[1]) if x is not None else None
        if w is None:
            return False
        out, act = uo
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        bias = None
        if bias_name is not None:
            if bias_name not in self.consts:
                return False
            bias = self.consts[bias_name]
        t = self.bounded(self.target(out), act)
        if node.op_type == "Conv":
            if w.axis not in (None, 0):
                return False
            if bias is not None:
                bias = bias_int32(bias, x.scale, w.scale)
            codes = self.be.conv(self.b, node, x, w, bias, t, out)
        elif node.op_type == "Gemm":
            trans_b = bool(attrs.get("transB", 0))
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                return False
            if w.axis not in (None, 0 if trans_b else 1) or (bias is not None and bias.ndim != 1):
                return False
            if bias is not None:
                bias = bias_int32(bias, x.scale, w.scale)
            codes = self.be.gemm(self.b, node, x, w, bias, t, trans_b, out)
        else:  # MatMul with a constant 2-D right operand
            if w.codes.ndim != 2 or w.axis not in (None, 1):
                return False
            codes = self.be.gemm(self.b, node, x, w, None, t, False, out)
        self.bind(out, t, codes)
        if act is not None:
            self.done.add(id(act))
        return True

    def try_add(self, node: onnx.NodeProto) -> bool:
        if len(node.input) != 2 or any(i in self.consts for i in node.input):
            return False
        uo = self.unit_output(node)
        if uo is None:
            return False
        a, c = self.q(node.input[0]), self.q(node.input[1])
        if a is None or c is None:
            return False
        out, act = uo
        t = self.bounded(self.target(out), act)
        self.bind(out, t, self.be.add(self.b, a, c, t, out))
        if act is not None:
            self.done.add(id(act))
        return True

    def try_gap(self, node: onnx.NodeProto) -> bool:
        y = node.output[0]
        x = self.q(node.input[0]) if y in self.plan.tensors else None
        if x is None:
            return False
        shape = self.shapes.get(node.input[0])
        t = self.target(y)
        self.bind(y, t, self.be.global_avg_pool(self.b, x, t, shape, y))
        return True

    def try_lookup(self, node: onnx.NodeProto) -> bool:
        x = self.env.get(node.input[0])
        y = node.output[0]
        if x is None or y not in self.plan.tensors or len(node.input) != 1:
            return False
        t = self.target(y)
        table = _lookup_table(node, x, t)
        idx = self.b.node("Cast", [x.codes], f"{y}_index", to=TensorProto.INT32)
        if x.dtype is np.int8:  # codes -128..127 -> rows 0..255
            idx = self.b.node("Add", [idx, self.b.const(np.int32(128), f"{y}_index_offset")], f"{y}_row")
        self.bind(y, t, self.b.node("Gather", [self.b.const(table, f"{y}_table"), idx], f"{y}_quantized", axis=0))
        return True

    def try_data_movement(self, node: onnx.NodeProto) -> bool:
        x = self.env.get(node.input[0])
        if x is None or len(node.output) != 1:
            return False
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = [self.f(i) if i else "" for i in node.input[1:]]
        y = node.output[0]
        if node.op_type == "Pad":
            if attrs.get("mode", b"constant") not in (b"constant", "constant"):
                return False
            if len(node.input) > 3 and node.input[3]:
                return False  # axes input: keep it simple
            value = float(self.consts[node.input[2]]) if len(node.input) > 2 and node.input[2] else 0.0
            if value != 0.0:
                return False
            ins = ins[:1] + [self.b.const(x.dtype(x.zp), f"{y}_pad_value")]
        codes = self.b.fresh(f"{y}_quantized")
        self.b.copy(node, [x.codes] + ins, [codes])
        moved = replace(x, codes=codes)
        if y in self.plan.tensors:
            t = self.target(y)
            if (t.scale, t.zp, t.dtype) != (x.scale, x.zp, x.dtype):
                codes = self.be.requantize(self.b, moved, t, y)
                moved = replace(t, codes=codes)
            elif (t.lo, t.hi) != (x.lo, x.hi):
                moved = replace(t, codes=self.be.clip_codes(self.b, codes, t, y) if t.narrowed else codes)
        self.env[y] = moved
        return True

    def try_preprocess(self, node: onnx.NodeProto) -> bool:
        """Sub / Div / Mul / Add of one preprocessing tensor (a graph input, or such a node's output, still
        float) and float constants: kept float, ahead of the input QuantizeLinear (module docstring)."""
        if len(node.input) != 2 or len(node.output) != 1:
            return False
        data = [i for i in node.input if i not in self.consts]
        if len(data) != 1 or data[0] not in self.pre or data[0] in self.env:
            return False
        const = self.consts[next(i for i in node.input if i in self.consts)]
        if const.dtype != np.float32:
            return False
        self.b.copy(node, [self.f(i) for i in node.input], list(node.output))
        self.pre.add(node.output[0])
        self.preprocess.append(f"{node.name} ({node.op_type})")
        return True

    def shape_error(self, node: onnx.NodeProto) -> QtoolError:
        """fuse folds every Shape whose dims are static (passes.shapes); one left here reads a symbolic dim."""
        x = node.input[0]
        vi = next((v for v in list(onnx.shape_inference.infer_shapes(self.src).graph.value_info) + list(self.g.input)
                   if v.name == x), None)
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim] \
            if vi is not None and vi.type.tensor_type.HasField("shape") else "unknown"
        return QtoolError(f"integer export: node {node.name or node.op_type!r} (Shape) reads the run-time shape of {x!r} "
                          f"(dims {dims}: not all static), which the integer-only format cannot compute; export the "
                          "model with static input shapes (e.g. a fixed batch size)")

    def float_node(self, node: onnx.NodeProto) -> None:
        if not self.be.allow_float and node.op_type == "Shape" and node.domain in ("", "ai.onnx"):
            raise self.shape_error(node)
        if not self.be.allow_float:
            supported = ", ".join(ANCHORS + ("Add", "GlobalAveragePool") + LOOKUP_OPS + DATA_MOVEMENT)
            raise QtoolError(f"integer export: node {node.name or node.op_type!r} ({node.op_type}) has no integer "
                             f"lowering with this plan (supported: {supported}; every input must be quantized, "
                             "except Sub/Div/Mul/Add by constants on a graph input before its quantizer)")
        self.b.copy(node, [self.f(i) if i else "" for i in node.input], list(node.output))
        self.float_nodes.append(f"{node.name} ({node.op_type})")
        for y in node.output:
            if y in self.plan.tensors and y not in self.outputs:
                self.q(y)

    # -- driver ----------------------------------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        for i in self.g.input:
            if i.name in self.plan.tensors:
                self.q(i.name)
        for node in self.g.node:
            if id(node) in self.done or (node.op_type == "Constant" and node.output[0] in self.consts):
                continue
            op = node.op_type if node.domain in ("", "ai.onnx") else None
            ok = ((op in PREPROCESS_OPS and self.try_preprocess(node))
                  or (op in ANCHORS and self.try_anchor(node)) or (op == "Add" and self.try_add(node))
                  or (op == "GlobalAveragePool" and self.try_gap(node))
                  or (op in LOOKUP_OPS and self.try_lookup(node))
                  or (op in DATA_MOVEMENT and self.try_data_movement(node)))
            if not ok:
                self.float_node(node)
        for o in self.g.output:
            if o.name in self.env:
                self.be.dequantize(self.b, self.env[o.name], o.name, out=o.name)
            elif not self.be.allow_float and o.name not in self.graph_inputs:
                raise QtoolError(f"integer export: graph output {o.name!r} is not quantized by the plan")
        if self.preprocess:
            self.notes.append("input preprocessing kept in float before the input QuantizeLinear: "
                              + ", ".join(self.preprocess))
        if self.float_nodes:
            self.notes.append(f"{len(self.float_nodes)} node(s) left in float: " + ", ".join(self.float_nodes[:8]))
        graph = helper.make_graph(self.b.nodes, self.g.name or "qtool", list(self.g.input), list(self.g.output),
                                  list(self.b.inits.values()))
        out = helper.make_model(graph, opset_imports=list(self.src.opset_import), ir_version=self.src.ir_version,
                                producer_name="qtool", doc_string=self.src.doc_string)
        for p in self.src.metadata_props:
            out.metadata_props.add(key=p.key, value=p.value)
        return out


def lower(model: onnx.ModelProto, plan: QuantPlan, backend: Backend) -> tuple[onnx.ModelProto, list[str]]:
    lw = _Lowering(model, plan, backend)
    out = lw.run()
    return out, lw.notes
