"""QDQ insertion driven by a QuantPlan: mark tensors per op, then emit one shared Q/DQ per tensor.

Marking (`mark_tensors`) walks the fused graph in order and asks a small registry of per-op
handlers which tensors the op wants quantized:

- Conv / ConvTranspose / Gemm / MatMul with a constant weight (a quantization unit, see units.py):
  input activation, weight (per-channel on the output-channel axis), bias (int32, derived), and the
  unit's output, i.e. after its activation. onnxruntime forms QLinearConv / QGemm only when that
  output is quantized too.
- Add / Mul of two activations (residuals; not the x * (1 + erf) inside a decomposed GELU, which stays
  float like the Gelu op), Concat, AveragePool, GlobalAveragePool: inputs and output,
  so onnxruntime forms QLinearAdd / QLinearConcat / QLinearGlobalAveragePool. An Add or Mul followed by
  a sole-consumer Relu/Clip is quantized after the Relu/Clip, which the Q then absorbs exactly.
- MaxPool / Reshape / Flatten / Transpose / Squeeze / Unsqueeze: pass-through; when either side is
  quantized both are, and the output shares the input's parameters (`share_with`), which is what lets
  onnxruntime drop the DQ -> op -> Q around them instead of leaving a requantize chain.

Emission (`insert_qdq`): activations get Q -> DQ right after their producer and every reader is
pointed at the DQ, so each tensor has exactly one pair. Weights are stored quantized (int8/uint8
initializer + DequantizeLinear, `axis` for per-channel); the DQ output keeps the weight's name so
the plan's names stay valid in the result. Biases become int32 with scale s_in * s_w and zero point 0.
Activations narrower than their 8-bit container get an integer Clip on their codes, Q -> Clip -> DQ,
so the graph computes exactly what a b-bit fake-quant computes while onnxruntime still fuses the
producer into an integer kernel. A float Clip before the Q would block that fusion and run the
producer in float (measured 4x slower on W4A4 ResNet-20). A quantized graph output keeps its name (its
float producer is renamed `<name>_float`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from passes.core import PassResult, QPass, names_in, new_initializer, unique_name
from qtool.plan import BIAS_CODE_LIMIT
from passes.units import ANCHOR_OPS, unit_activation

log = logging.getLogger(__name__)

PASS_THROUGH = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")
ABSORBED_ACTS = ("Relu", "Clip")  # a following Q represents these exactly


@dataclass(frozen=True)
class Role:
    kind: str  # "activation" | "weight"
    axis: int | None = None  # per-channel axis of a weight (None: per-tensor only)
    share_with: str | None = None  # activation reusing another tensor's parameters


@dataclass
class Marks:
    tensors: dict[str, Role] = field(default_factory=dict)
    biases: dict[str, tuple[str, str]] = field(default_factory=dict)  # bias -> (input, weight)
    skipped: list[str] = field(default_factory=list)

    def activations(self) -> list[str]:
        return [k for k, r in self.tensors.items() if r.kind == "activation"]

    def root(self, name: str) -> str:
        seen = set()
        while (r := self.tensors[name]).share_with is not None and name not in seen:
            seen.add(name)
            name = r.share_with
        return name


class _Marker:
    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.marks = Marks()

    def act(self, v: ir.Value | None) -> None:
        if v is None or v.const_value is not None or not v.name:
            return
        if v.type is not None and v.type.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            return
        self.marks.tensors.setdefault(v.name, Role("activation"))

    def weight(self, v: ir.Value, axis: int | None) -> None:
        prev = self.marks.tensors.get(v.name)
        if prev is not None and prev.axis != axis:
            axis = None  # shared by nodes with different channel axes: per-tensor is right for both
        self.marks.tensors[v.name] = Role("weight", axis)

    def output(self, node: ir.Node) -> None:
        """Mark the node's effective output: after a sole-consumer Relu/Clip that the Q absorbs."""
        act = unit_activation(node)
        if node.op_type in ANCHOR_OPS:
            self.act((act or node).outputs[0])
        elif act is not None and act.op_type in ABSORBED_ACTS:
            self.act(act.outputs[0])
        else:
            self.act(node.outputs[0])


Handler = Callable[[ir.Node, _Marker], None]
_HANDLERS: dict[str, Handler] = {}


def register(*op_types: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for op in op_types:
            _HANDLERS[op] = fn
        return fn
    return deco


def _is_weight(v: ir.Value | None) -> bool:
    return (v is not None and v.is_initializer() and not v.is_graph_input() and v.const_value is not None
            and np.issubdtype(v.const_value.numpy().dtype, np.floating))


@register("Conv", "ConvTranspose")
def _conv(node: ir.Node, m: _Marker) -> None:
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if not _is_weight(w):
        m.marks.skipped.append(f"{node.name}: weight {w.name!r} is not a constant initializer; left float")
        return
    group = node.attributes["group"].as_int() if "group" in node.attributes else 1
    # ConvTranspose's axis 1 holds out_channels / group: per-channel is only unambiguous for group 1.
    axis = 0 if node.op_type == "Conv" else (1 if group == 1 else None)
    m.act(x)
    m.weight(w, axis)
    if _is_weight(b):
        m.marks.biases[b.name] = (x.name, w.name)
    m.output(node)


@register("Gemm")
def _gemm(node: ir.Node, m: _Marker) -> None:
    a, w = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if "transA" in node.attributes and node.attributes["transA"].as_int():
        m.marks.skipped.append(f"{node.name}: transA=1; left float")
        return
    if not _is_weight(w):
        m.marks.skipped.append(f"{node.name}: weight {w.name!r} is not a constant initializer; left float")
        return
    trans_b = "transB" in node.attributes and node.attributes["transB"].as_int()
    m.act(a)
    m.weight(w, 0 if trans_b else 1)
    n_out = w.const_value.shape[0 if trans_b else 1]
    alpha = node.attributes["alpha"].as_float() if "alpha" in node.attributes else 1.0
    beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
    # int32 bias = C / (s_a * s_b) holds only for the plain Y = A B + C with a per-column C.
    if _is_weight(c) and alpha == 1.0 and beta == 1.0 and c.const_value.numpy().size == n_out \
            and c.const_value.numpy().ndim == 1:
        m.marks.biases[c.name] = (a.name, w.name)
    m.output(node)


@register("MatMul")
def _matmul(node: ir.Node, m: _Marker) -> None:
    a, b = node.inputs
    if _is_weight(b):
        m.act(a)
        m.weight(b, None)  # per-tensor: onnxruntime's QLinearMatMul wants a scalar B scale on CPU
    elif _is_weight(a):
        m.marks.skipped.append(f"{node.name}: constant left operand; left float")
        return
    else:
        m.act(a)
        m.act(b)
    m.output(node)


def _scaled_by_constant(v: ir.Value | None, source: ir.Value) -> bool:
    """v is `source` itself or source * c / source / c (a constant c)."""
    if v is source:
        return True
    p = v.producer() if v is not None else None
    return (p is not None and p.op_type in ("Mul", "Div") and p.inputs[0] is source
            and p.inputs[1] is not None and p.inputs[1].const_value is not None)


def _is_gelu_gate(node: ir.Node) -> bool:
    """The Mul x * (1 + erf(x / sqrt 2)) of an exported (decomposed) GELU. GELU stays float like the
    Gelu op (onnxruntime has no integer kernel for it); quantizing this product inside it only adds noise:
    measured on a random-weight Wav2Vec2, output SQNR 8.05 -> 8.38 dB keeping it float."""
    if node.op_type != "Mul" or len(node.inputs) != 2:
        return False
    for x, gate in (node.inputs, node.inputs[::-1]):
        add = gate.producer() if gate is not None else None
        if add is None or add.op_type != "Add":
            continue
        erf = next((v.producer() for v in add.inputs if v is not None and v.producer() is not None
                    and v.producer().op_type == "Erf"), None)
        if erf is not None and any(v is not None and v.const_value is not None for v in add.inputs) \
                and _scaled_by_constant(erf.inputs[0], x):
            return True
    return False


@register("Add", "Mul")
def _binary(node: ir.Node, m: _Marker) -> None:
    if any(v is None or v.const_value is not None for v in node.inputs):
        return  # bias-like constant operands stay float (folded earlier where exact)
    if _is_gelu_gate(node):
        return
    for v in node.inputs:
        m.act(v)
    m.output(node)


@register("Concat")
def _concat(node: ir.Node, m: _Marker) -> None:
    if any(v is None or v.const_value is not None for v in node.inputs):
        return
    for v in node.inputs:
        m.act(v)
    m.output(node)


@register("AveragePool", "GlobalAveragePool")
def _pool(node: ir.Node, m: _Marker) -> None:
    m.act(node.inputs[0])
    m.output(node)


def mark_tensors(graph: ir.Graph, exclude: Callable[[ir.Node], bool] | None = None) -> Marks:
    """Which tensors a QDQ graph quantizes, by role; the plan builder and insert_qdq both use it.

    `exclude(node)` true: the node asks for nothing (its weights stay float); it then runs in float on
    whatever its neighbours quantize (a DQ before it, a Q after it)."""
    m = _Marker(graph)
    nodes = list(graph)
    excluded = {id(n) for n in nodes if exclude is not None and exclude(n)}
    for node in nodes:
        h = _HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if id(node) in excluded:
            m.marks.skipped.append(f"{node.name}: excluded; left float")
        elif h is not None:
            h(node, m)
    # Pass-through ops second: their inputs and outputs may have been marked by either neighbour.
    for node in nodes:
        if node.op_type not in PASS_THROUGH or node.domain not in ("", "ai.onnx") or id(node) in excluded:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x is None or not (x.name in m.marks.tensors or y.name in m.marks.tensors):
            continue
        m.act(x)
        if x.name in m.marks.tensors and m.marks.tensors[x.name].kind == "activation":
            m.marks.tensors[y.name] = Role("activation", share_with=x.name)
    return m.marks


# -- emission ----------------------------------------------------------------------------------

def quantize_array(x: np.ndarray, scale, zero_point, axis: int | None, qmin: int, qmax: int,
                   dtype=np.int8) -> np.ndarray:
    """round-half-to-even(x / s) + z, saturated: exactly onnxruntime's QuantizeLinear."""
    s = np.asarray(scale, np.float32)
    z = np.asarray(zero_point, np.int64)
    if axis is not None and s.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    q = np.rint(x.astype(np.float32) / s).astype(np.int64) + z
    return np.clip(q, qmin, qmax).astype(dtype)


class InsertQDQPass(QPass):
    """Insert Q/DQ for every tensor of `plan` (a qtool.plan.QuantPlan with scales set)."""

    def __init__(self, plan) -> None:
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> PassResult:
        g = model.graph
        values = _values_by_name(g)
        missing = [n for n in self.plan.tensors if n not in values]
        if missing:
            raise ValueError(f"plan tensors not in the graph: {missing[:5]}")
        uncal = [n for n, t in self.plan.tensors.items() if not t.calibrated]
        if uncal:
            raise ValueError(f"plan tensors without scale/zero_point: {uncal[:5]}")
        self.taken = names_in(g)  # one scan: thousands of new names on a transformer
        marks = mark_tensors(g)
        for name, (inp, w) in marks.biases.items():
            self._bias(g, values[name], inp, w)
        for name, tq in self.plan.tensors.items():
            if tq.kind == "weight":
                self._weight(g, values[name], tq)
            else:
                self._activation(g, values[name], tq)
        for node in list(g):
            self._keep_float(g, node)
        g.sort()
        return PassResult(model, True)

    def _keep_float(self, g: ir.Graph, node: ir.Node) -> None:
        """A Conv / ConvTranspose / Gemm the plan leaves float (`--exclude`, a float unit) between quantized
        neighbours reads DQ(per-tensor) and feeds Q: onnxruntime's WeightBiasQuantization then quantizes its
        float weight itself (per-tensor int8) and runs it as an integer kernel. The same codes read through a
        DequantizeLinear with the scale repeated per channel compute the same values, and onnxruntime leaves
        that node float."""
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or node.domain not in ("", "ai.onnx"):
            return
        x, w = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
        dq = x.producer() if x is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or w is None or w.const_value is None:
            return  # a quantized weight comes from a DQ node, not a constant; a dynamic weight is never quantized
        scale, zp = dq.inputs[1].const_value, dq.inputs[2].const_value if len(dq.inputs) > 2 else None
        if scale is None or scale.numpy().size != 1 or zp is None:
            return
        shape = w.const_value.numpy().shape
        attrs = {a.name: a.value for a in node.attributes.values()}
        if node.op_type == "Conv":
            channels, axis = shape[1] * int(attrs.get("group", 1)), 1
        elif node.op_type == "ConvTranspose":
            channels, axis = shape[0], 1
        else:  # Gemm: K of A, which is A's dim 1 (dim 0 with transA)
            channels = shape[1] if attrs.get("transB", 0) else shape[0]
            axis = 0 if attrs.get("transA", 0) else 1
        s = np.full(channels, scale.numpy().reshape(()), np.float32)
        z = np.full(channels, zp.numpy().reshape(()), zp.numpy().dtype)
        own = ir.node("DequantizeLinear", [dq.inputs[0], self._init(g, s, f"{node.name}_input_scale"),
                                           self._init(g, z, f"{node.name}_input_zero_point")],
                      attributes={"axis": axis}, name=self._unique(g, f"{node.name}_input_DequantizeLinear"))
        out = own.outputs[0]
        out.type, out.shape, out.name = x.type, x.shape, self._unique(g, f"{node.name}_input_float")
        g.insert_before(node, own)
        node.replace_input_with(0, out)
        self.fire(f"{node.op_type} {node.name}: float, its input dequantized per channel")

    def _init(self, g: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
        return new_initializer(g, array, name, self.taken)

    def _unique(self, g: ir.Graph, name: str) -> str:
        return unique_name(g, name, self.taken)

    def _params(self, g: ir.Graph, base: str, tq, dtype) -> tuple[ir.Value, ir.Value]:
        per_channel = tq.granularity == "per_channel"
        s = np.asarray(tq.scale, np.float32) if per_channel else np.float32(tq.scale)
        z = np.asarray(tq.zero_point, dtype) if per_channel else np.asarray(tq.zero_point, dtype).reshape(())
        return (self._init(g, np.asarray(s, np.float32), f"{base}_scale"),
                self._init(g, z, f"{base}_zero_point"))

    def _weight(self, g: ir.Graph, w: ir.Value, tq) -> None:
        dtype = np.int8 if tq.signed else np.uint8
        qmin, qmax = tq.qrange
        axis = tq.axis if tq.granularity == "per_channel" else None
        q = quantize_array(w.const_value.numpy(), tq.scale, tq.zero_point, axis, qmin, qmax, dtype)
        name = w.name
        self._replace_with_dq(g, w, q, *self._params(g, name, tq, dtype), axis)
        self.fire(f"weight {name}: {tq.bits}-bit {tq.granularity}")

    def _replace_with_dq(self, g: ir.Graph, const: ir.Value, codes: np.ndarray, scale: ir.Value, zero_point: ir.Value,
                         axis: int | None) -> None:
        """Swap a float initializer for DequantizeLinear(codes): readers keep the tensor's name."""
        name = const.name
        q_v = self._init(g, codes, f"{name}_quantized")
        attrs = {"axis": axis} if axis is not None else {}
        dq = ir.node("DequantizeLinear", [q_v, scale, zero_point], attributes=attrs, name=f"{name}_DequantizeLinear")
        out = dq.outputs[0]
        out.type, out.shape = const.type, const.shape
        g.insert_before(next(iter(g)), dq)
        const.replace_all_uses_with(out)
        g.initializers.pop(name)
        const.name = None
        out.name = name

    def _bias(self, g: ir.Graph, b: ir.Value, inp: str, w: str) -> None:
        ti, tw = self.plan.tensors.get(inp), self.plan.tensors.get(w)
        if ti is None or tw is None:
            log.debug("bias %s stays float: input or weight not in the plan", b.name)
            return
        s_w = np.asarray(tw.scale, np.float64)
        s = (np.float64(np.float32(ti.scale)) * s_w.astype(np.float32).astype(np.float64)).astype(np.float32)
        bias = b.const_value.numpy().astype(np.float64)
        per_channel = s.ndim == 1
        q = np.rint(bias / (s.astype(np.float64) if per_channel else float(s)))
        held = np.abs(q) > BIAS_CODE_LIMIT
        if held.any():
            log.warning("bias %s: %d of %d values exceed %d int32 codes (weight scale %.3g) and are saturated there",
                        b.name, int(held.sum()), q.size, BIAS_CODE_LIMIT, float(np.min(s_w)))
        q = np.clip(q, -BIAS_CODE_LIMIT, BIAS_CODE_LIMIT).astype(np.int32)
        name = b.name
        s_v = self._init(g, s, f"{name}_scale")
        z_v = self._init(g, np.zeros(s.shape, np.int32), f"{name}_zero_point")
        self._replace_with_dq(g, b, q, s_v, z_v, 0 if per_channel else None)
        self.fire(f"bias {name}: int32")

    def _activation(self, g: ir.Graph, t: ir.Value, tq) -> None:
        dtype = np.int8 if tq.signed else np.uint8
        name = t.name
        s_v, z_v = self._params(g, name, tq, dtype)
        readers = [(n, i) for n, i in t.uses()]
        new_nodes = []
        qmin, qmax = tq.qrange
        cmin, cmax = (-128, 127) if tq.signed else (0, 255)
        q = ir.node("QuantizeLinear", [t, s_v, z_v], name=f"{name}_QuantizeLinear")
        q.outputs[0].name = self._unique(g, f"{name}_quantized")
        new_nodes.append(q)
        codes = q.outputs[0]
        if (qmin, qmax) != (cmin, cmax):
            # Narrow the codes with an integer Clip after the container Q: onnxruntime still fuses the
            # producer into an integer kernel (a float Clip before the Q would block that).
            lo = self._init(g, np.array(qmin, dtype), f"{name}_code_min")
            hi = self._init(g, np.array(qmax, dtype), f"{name}_code_max")
            clip = ir.node("Clip", [codes, lo, hi], name=f"{name}_Clip")
            new_nodes.append(clip)
            codes = clip.outputs[0]
            codes.name = self._unique(g, f"{name}_quantized_narrow")
        dq = ir.node("DequantizeLinear", [codes, s_v, z_v], name=f"{name}_DequantizeLinear")
        out = dq.outputs[0]
        out.type, out.shape = t.type, t.shape
        new_nodes.append(dq)
        producer = t.producer()
        if producer is None:
            g.insert_before(next(iter(g)), new_nodes)
        else:
            g.insert_after(producer, new_nodes)
        for n, i in readers:
            n.replace_input_with(i, out)
        if t.is_graph_output():
            idx = [i for i, o in enumerate(g.outputs) if o is t]
            t.name = self._unique(g, f"{name}_float")
            out.name = name
            for i in idx:
                g.outputs[i] = out
        else:
            out.name = self._unique(g, f"{name}_dequantized")
        self.fire(f"activation {name}: {'s' if tq.signed else 'u'}{tq.bits}")


def _values_by_name(g: ir.Graph) -> dict[str, ir.Value]:
    out: dict[str, ir.Value] = {v.name: v for v in g.inputs if v.name}
    out.update({k: v for k, v in g.initializers.items()})
    for n in g:
        for v in n.outputs:
            if v.name:
                out[v.name] = v
    return out


def insert_qdq(model: ir.Model, plan) -> PassResult:
    return InsertQDQPass(plan)(model)
