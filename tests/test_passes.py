"""Graph passes: BN / affine folding, onnxsim, units, the pipeline. Structure AND numbers."""
from __future__ import annotations

import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes
from passes.core import PassError, QPass, run_to_fixpoint, to_ir, to_proto
from qtool.fusion import fuse

RNG = np.random.default_rng(0)


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def ops(model: onnx.ModelProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def bn_params(prefix, c):
    return [init(f"{prefix}_g", RNG.uniform(0.5, 1.5, c)), init(f"{prefix}_b", RNG.uniform(-0.3, 0.3, c)),
            init(f"{prefix}_m", RNG.uniform(-0.5, 0.5, c)), init(f"{prefix}_v", RNG.uniform(0.5, 2.0, c))]


def bn_node(x, y, prefix):
    return helper.make_node("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
                            [y], name=prefix, epsilon=1e-3)


def make(nodes, inits, inputs, outputs, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def apply(pass_, model):
    m = to_ir(model)
    passes.ShapeInferencePass()(m)  # the lone-BN rewrite needs the input rank
    res = pass_(m)
    return to_proto(res.model), res, pass_


def same_graph(a, b) -> bool:
    """Same nodes and initializers (value_info from shape inference aside)."""
    key = lambda m: ([n.SerializeToString() for n in m.graph.node],
                     sorted(t.SerializeToString() for t in m.graph.initializer))
    return key(a) == key(b)


def assert_same(a, b, feeds):
    for x, y in zip(run(a, feeds), run(b, feeds)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def conv_bn_model(shared_weight=False, weight_as_input=False, weight_from_node=False):
    c = 4
    w = init("W", RNG.normal(size=(c, 3, 3, 3)))
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", pads=[1, 1, 1, 1]), bn_node("y", "z", "bn")]
    inits = [w, init("B", RNG.normal(size=c)), *bn_params("bn", c)]
    inputs, outputs = [vi("x", ["N", 3, 6, 6])], [vi("z", ["N", c, 6, 6])]
    if shared_weight:
        nodes.append(helper.make_node("Conv", ["x", "W"], ["y2"], name="conv2", pads=[1, 1, 1, 1]))
        outputs.append(vi("y2", ["N", c, 6, 6]))
    if weight_as_input:
        inputs.append(vi("W", [c, 3, 3, 3]))
    if weight_from_node:
        inits[0] = init("W0", numpy_helper.to_array(w))
        nodes.insert(0, helper.make_node("Relu", ["W0"], ["W"], name="wrelu"))
    return make(nodes, inits, inputs, outputs)


X6 = {"x": RNG.normal(size=(2, 3, 6, 6)).astype(np.float32)}


def test_fold_bn_into_conv():
    m = conv_bn_model()
    out, res, p = apply(passes.FoldBatchNormPass(), m)
    assert res.modified and ops(out) == {"Conv": 1}
    onnx.checker.check_model(out, full_check=True)
    assert_same(m, out, X6)
    assert p.fired and not p.refusals


@pytest.mark.parametrize("kind,reason", [("shared_weight", "shared with"), ("weight_as_input", "graph input"),
                                         ("weight_from_node", "not a constant initializer")])
def test_fold_bn_refusals_keep_weights(kind, reason):
    m = conv_bn_model(**{kind: True})
    out, res, p = apply(passes.FoldBatchNormPass(), m)
    assert any(reason in r.reason for r in p.refusals), p.refusals
    # Refused fold: the Conv and its weight are untouched; the lone BN became an exact Mul+Add.
    assert ops(out).get("BatchNormalization", 0) == 0 and ops(out)["Mul"] == 1 and ops(out)["Add"] == 1
    w_before = {t.name: t.raw_data for t in m.graph.initializer}
    for t in out.graph.initializer:
        if t.name in ("W", "W0", "B"):
            assert numpy_helper.to_array(t).tobytes() == numpy_helper.to_array(
                next(i for i in m.graph.initializer if i.name == t.name)).tobytes()
    assert w_before
    onnx.checker.check_model(out, full_check=True)
    feeds = dict(X6)
    if kind == "weight_as_input":
        feeds["W"] = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "W"))
    assert_same(m, out, feeds)


def test_affine_refusals_leave_graph_unchanged():
    w = RNG.normal(size=(4, 3, 1, 1))
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
             helper.make_node("Mul", ["y", "s"], ["z"], name="mul"),
             helper.make_node("Conv", ["x", "W"], ["y2"], name="conv2")]
    m = make(nodes, [init("W", w), init("s", RNG.uniform(1, 2, (4, 1, 1)))], [vi("x", [1, 3, 5, 5])],
             [vi("z", [1, 4, 5, 5]), vi("y2", [1, 4, 5, 5])])
    out, res, p = apply(passes.FoldAffinePass(), m)
    assert not res.modified and "shared with" in p.refusals[0].reason
    assert same_graph(out, m)
    # spatially varying constant: not per-channel, so not exact to fold
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), helper.make_node("Mul", ["y", "s"], ["z"], name="mul")]
    m = make(nodes, [init("W", w), init("s", RNG.uniform(1, 2, (1, 1, 5, 5)))], [vi("x", [1, 3, 5, 5])],
             [vi("z", [1, 4, 5, 5])])
    out, res, p = apply(passes.FoldAffinePass(), m)
    assert not res.modified and "varies along axis 2" in p.refusals[0].reason


def test_fold_affine_chain():
    w = RNG.normal(size=(4, 3, 3, 3))
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv"),
             helper.make_node("Mul", ["s", "y"], ["a"], name="mul"),
             helper.make_node("Add", ["a", "t"], ["b"], name="add"),
             helper.make_node("Sub", ["b", "t2"], ["c"], name="sub"),
             helper.make_node("Div", ["c", "d"], ["z"], name="div")]
    inits = [init("W", w), init("B", RNG.normal(size=4)), init("s", RNG.uniform(0.5, 2, (4, 1, 1))),
             init("t", RNG.normal(size=(4, 1, 1))), init("t2", [0.5]), init("d", RNG.uniform(1, 2, (1, 4, 1, 1)))]
    m = make(nodes, inits, [vi("x", ["N", 3, 6, 6])], [vi("z", ["N", 4, 4, 4])])
    out, res, p = apply(passes.FoldAffinePass(), m)
    assert ops(out) == {"Conv": 1} and len(p.fired) == 4
    onnx.checker.check_model(out, full_check=True)
    assert_same(m, out, X6)


def test_fold_bn_gemm_matmul_convtranspose():
    # Gemm with transB and beta, MatMul (-> Gemm), grouped ConvTranspose, and a BN on a graph input.
    nodes = [helper.make_node("Gemm", ["x", "Wg", "Cg"], ["g"], name="gemm", transB=1, beta=0.5), bn_node("g", "gz", "bng"),
             helper.make_node("MatMul", ["x", "Wm"], ["mm"], name="mm"), bn_node("mm", "mz", "bnm"),
             helper.make_node("ConvTranspose", ["im", "Wt"], ["ct"], name="ct", group=2, strides=[2, 2]),
             bn_node("ct", "cz", "bnt"), bn_node("im", "iz", "bni")]
    inits = [init("Wg", RNG.normal(size=(5, 6))), init("Cg", RNG.normal(size=5)), init("Wm", RNG.normal(size=(6, 3))),
             init("Wt", RNG.normal(size=(4, 3, 2, 2))), *bn_params("bng", 5), *bn_params("bnm", 3),
             *bn_params("bnt", 6), *bn_params("bni", 4)]
    m = make(nodes, inits, [vi("x", [2, 6]), vi("im", [1, 4, 3, 3])],
             [vi("gz", [2, 5]), vi("mz", [2, 3]), vi("cz", [1, 6, 6, 6]), vi("iz", [1, 4, 3, 3])])
    feeds = {"x": RNG.normal(size=(2, 6)).astype(np.float32), "im": RNG.normal(size=(1, 4, 3, 3)).astype(np.float32)}
    fused, summary = fuse(m)
    assert ops(fused) == {"Gemm": 2, "ConvTranspose": 1, "Mul": 1, "Add": 1}, ops(fused)
    onnx.checker.check_model(fused, full_check=True)
    assert_same(m, fused, feeds)
    assert sum("folded" in f.what for f in summary.fused) == 3


def test_onnxsim_folds_shape_chains():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]), helper.make_node("Concat", ["n1", "m1"], ["shp"], axis=0),
             helper.make_node("Reshape", ["x", "shp"], ["r"]),
             helper.make_node("ConstantOfShape", ["cs"], ["pad"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
             helper.make_node("Add", ["r", "pad"], ["y"])]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "i0"), numpy_helper.from_array(np.array([0], np.int64), "ax"),
             numpy_helper.from_array(np.array([-1], np.int64), "m1"), numpy_helper.from_array(np.array([2, 12], np.int64), "cs")]
    m = make(nodes, inits, [vi("x", [2, 3, 2, 2])], [vi("y", [2, 12])])
    out, res, p = apply(passes.OnnxSimPass(), m)
    assert res.modified and ops(out) == {"Reshape": 1, "Add": 1}, ops(out)
    assert_same(m, out, {"x": RNG.normal(size=(2, 3, 2, 2)).astype(np.float32)})


def test_units_and_metadata():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["c2"], name="conv2"),
             helper.make_node("Sigmoid", ["c2"], ["s2"], name="sig"), helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Add", ["s2", "r2"], ["y"], name="add")]
    m = make(nodes, [init("W", RNG.normal(size=(4, 3, 1, 1))), init("W2", RNG.normal(size=(4, 4, 1, 1)))],
             [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4])])
    fused, _ = fuse(m)
    units = json.loads({p.key: p.value for p in fused.metadata_props}[passes.UNITS_KEY])
    # conv2's output has two readers: no activation joins its unit
    assert [(u["anchor"], u["act"], u["output"]) for u in units] == [("conv", "relu", "r"), ("conv2", None, "c2")]


class _Boom(QPass):
    def call(self, model):
        raise ValueError("kaputt")


def test_pipeline_names_failing_pass_and_caps_rounds():
    m = to_ir(conv_bn_model())
    with pytest.raises(PassError, match="_Boom failed") as ei:
        run_to_fixpoint(m, [passes.FoldBatchNormPass(), _Boom()])
    assert isinstance(ei.value.__cause__, ValueError)

    class _Always(QPass):
        def call(self, model):
            return passes.core.PassResult(model, True)
    assert run_to_fixpoint(to_ir(conv_bn_model()), [_Always()], max_iterations=3).iterations == 3


def _torch_cnn_onnx(opset: int) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
            self.c2, self.b2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = torch.relu(self.b2(self.c2(y)) + y)
            y = torch.nn.functional.adaptive_avg_pool2d(y, 1)
            return self.fc(y.view(y.size(0), -1))

    torch.manual_seed(0)
    net = Net()
    for bn in (net.b1, net.b2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    net.eval()
    f = io.BytesIO()
    torch.onnx.export(net, torch.randn(2, 3, 8, 8), f, opset_version=opset, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, dynamo=False,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return onnx.load_from_string(f.getvalue())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("opset", [13, 17])
def test_torch_exported_cnn(opset):
    m = _torch_cnn_onnx(opset)
    assert ops(m)["BatchNormalization"] == 2
    m.metadata_props.add(key="qtool.preprocess", value='{"mean": [0.5], "std": [0.25]}')
    fused, summary = fuse(m)
    assert "BatchNormalization" not in ops(fused) and "Identity" not in ops(fused) and "Constant" not in ops(fused)
    assert ops(fused)["Conv"] == 2 and ops(fused)["Gemm"] == 1
    onnx.checker.check_model(fused, full_check=True)
    assert fused.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # dynamic batch kept
    meta = {p.key: p.value for p in fused.metadata_props}
    assert meta["qtool.preprocess"] == '{"mean": [0.5], "std": [0.25]}' and not any(k.startswith("onnxsim") for k in meta)
    for n in (1, 3):
        assert_same(m, fused, {"x": RNG.normal(size=(n, 3, 8, 8)).astype(np.float32)})
    assert summary.nodes_after < summary.nodes_before and any("refused" in line or "fused" in line for line in summary.lines())


# -- AveragePool covering the whole map -> GlobalAveragePool ---------------------------------------

def pool_model(h=7, w=None, batch="N", **attrs):
    """x -> Conv(3->4) -> Relu -> AveragePool(attrs) -> y (the pool's output shape left to inference)."""
    w = h if w is None else w
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("AveragePool", ["r"], ["y"], name="pool", **attrs)]
    return make(nodes, [init("W", RNG.normal(size=(4, 3, 3, 3)))], [vi("x", [batch, 3, h, w])], [vi("y", None)])


GLOBAL_POOLS = [  # (map, attributes): one window covering the map, its mean is the global mean
    (7, dict(kernel_shape=[7, 7], ceil_mode=1)),  # EfficientNet-B0's pooler
    (7, dict(kernel_shape=[7, 7], strides=[7, 7], ceil_mode=1, count_include_pad=1)),  # torch AvgPool2d(7, ceil_mode=True)
    (7, dict(kernel_shape=[8, 8], strides=[8, 8], ceil_mode=1, count_include_pad=1)),  # ceil window past the map, no pads
    (7, dict(kernel_shape=[9, 9], pads=[1, 1, 1, 1])),  # padded, pads not counted
    (7, dict(kernel_shape=[8, 8], pads=[0, 0, 1, 1], count_include_pad=0)),
]


@pytest.mark.parametrize("hw, attrs", GLOBAL_POOLS)
def test_average_pool_covering_the_map_becomes_global(hw, attrs):
    m = pool_model(hw, **attrs)
    out, res, p = apply(passes.AveragePoolToGlobalPass(), m)
    assert res.modified and ops(out) == {"Conv": 1, "Relu": 1, "GlobalAveragePool": 1}, (ops(out), p.refusals)
    assert [o.name for o in out.graph.output] == ["y"]
    onnx.checker.check_model(out, full_check=True)
    assert_same(m, out, {"x": RNG.normal(size=(2, 3, hw, hw)).astype(np.float32)})


@pytest.mark.parametrize("hw, attrs, reason", [
    (8, dict(kernel_shape=[2, 2], strides=[2, 2]), "output size 4 along spatial axis 0"),  # a real pooling grid
    (7, dict(kernel_shape=[9, 9], pads=[1, 1, 1, 1], count_include_pad=1), "counts 2 pad element(s) in the divisor"),
    (7, dict(kernel_shape=[8, 8], pads=[0, 0, 1, 1], count_include_pad=1), "counts 1 pad element(s)"),
    (8, dict(kernel_shape=[7, 7], strides=[8, 8]), "the window misses part of the map"),
    (7, dict(kernel_shape=[7, 7], auto_pad="SAME_UPPER"), "auto_pad=SAME_UPPER"),
    ("H", dict(kernel_shape=[7, 7], ceil_mode=1), "are not static"),
    # onnxruntime drops the second ceil_mode window (it starts in the end padding), ONNX's shape inference
    # keeps it: the graph is typed 2 x 2, so the pool is left as it is.
    (5, dict(kernel_shape=[5, 5], pads=[0, 0, 2, 2], strides=[5, 5], ceil_mode=1), "inferred output shape"),
])
def test_average_pool_refusals(hw, attrs, reason):
    m = pool_model(hw, **attrs)
    out, res, p = apply(passes.AveragePoolToGlobalPass(), m)
    assert not res.modified and ops(out)["AveragePool"] == 1
    assert len(p.refusals) == 1 and reason in p.refusals[0].reason, p.refusals
    assert p.refusals[0].node == "pool"


def test_global_mean_rule_agrees_with_onnxruntime():
    """The pass's rule against onnxruntime on a grid of pooling parameters: wherever onnxruntime gives a
    1 x 1 output, the rule accepts exactly the cases whose value is the global mean, and its output size
    is onnxruntime's. (A wrong divisor rule or output-size rule fails here.)"""
    from passes.pool import global_mean_reason, output_size

    x = RNG.normal(size=(1, 1, 5, 5)).astype(np.float32) + 2.0
    accepted = refused = 0
    for k in (4, 5, 6, 7):
        for b in (0, 1, 2):
            for e in (0, 1, 2):
                for s in (1, 3, 8):
                    for ceil in (0, 1):
                        for cip in (0, 1):
                            if b >= k or e >= k:
                                continue  # onnxruntime rejects pads >= kernel
                            attrs = dict(kernel_shape=[k, 1], pads=[b, 0, e, 0], strides=[s, 1], ceil_mode=ceil,
                                         count_include_pad=cip)
                            n = helper.make_node("AveragePool", ["x"], ["y"], **attrs)
                            g = helper.make_graph([n], "g", [vi("x", [1, 1, 5, 5])], [vi("y", None)])
                            mm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
                            try:
                                y = run(mm, {"x": x})[0]
                            except Exception:
                                continue  # negative output size
                            assert y.shape[2] == output_size(5, k, b, e, s, bool(ceil)), attrs
                            if y.shape[2] != 1:
                                continue
                            is_mean = np.allclose(y[0, 0, 0], x[0, 0].mean(axis=0), rtol=1e-5)
                            ok = global_mean_reason([5, 1], [k, 1], [b, 0, e, 0], [s, 1], bool(ceil), bool(cip)) is None
                            assert ok == is_mean, attrs
                            accepted += ok
                            refused += not ok
    assert accepted >= 20 and refused >= 20  # both branches are exercised


def test_whole_map_average_pool_quantizes_to_real_logits():
    """conv -> AveragePool(kernel = map, ceil_mode=1) -> Flatten -> Gemm: fused to GlobalAveragePool, the
    quantized model's logits follow FP32 (not a constant, not all 0)."""
    import qtool

    r = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("AveragePool", ["r"], ["p"], name="pool", kernel_shape=[7, 7], ceil_mode=1),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "Wf", "Bf"], ["y"], name="fc", transB=1)]
    inits = [init("W", r.normal(size=(16, 3, 3, 3)) * 0.3), init("B", r.normal(size=16) * 0.1),
             init("Wf", r.normal(size=(10, 16))), init("Bf", r.normal(size=10) * 0.1)]
    m = make(nodes, inits, [vi("x", ["N", 3, 7, 7])], [vi("y", ["N", 10])])
    fused, summary = fuse(m)
    assert ops(fused).get("AveragePool", 0) == 0 and ops(fused)["GlobalAveragePool"] == 1
    assert any("GlobalAveragePool" in f.what for f in summary.fused)
    q = qtool.quantize(fused, [{"x": r.normal(size=(8, 3, 7, 7)).astype(np.float32)} for _ in range(2)])
    x = r.normal(size=(16, 3, 7, 7)).astype(np.float32)
    ref = run(m, {"x": x})[0]
    out = run(q.model, {"x": x})[0]
    assert np.abs(out).max() > 0.1 and np.std(out) > 0.1
    cos = float((out * ref).sum() / (np.linalg.norm(out) * np.linalg.norm(ref)))
    assert cos > 0.99 and (np.argmax(out, 1) == np.argmax(ref, 1)).mean() >= 0.85
    qo = qtool.quantize(fused, [{"x": r.normal(size=(8, 3, 7, 7)).astype(np.float32)}],
                        qtool.QuantConfig(format="qoperator")).model
    assert ops(qo)["QLinearGlobalAveragePool"] == 1


# -- shape chains with a symbolic batch ---------------------------------------------------------------

def shape_chain_model(pieces=("n1", "m1"), allowzero=0, index=0):
    """x[N, 3, 2, 2] -> Reshape(x, Concat(pieces)) with n1 = Unsqueeze(Gather(Shape(x), index)), m1 = [-1];
    plus c = Gather(Shape(x), 1) (a static dim) added to the output."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i"], ["n"], name="gather", axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"], name="unsqueeze"),
             helper.make_node("Concat", list(pieces), ["shp"], name="concat", axis=0),
             helper.make_node("Reshape", ["x", "shp"], ["r"], name="reshape", allowzero=allowzero),
             helper.make_node("Gather", ["s", "i1"], ["c"], name="gather_c", axis=0),
             helper.make_node("Cast", ["c"], ["cf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Add", ["r", "cf"], ["y"], name="add")]
    inits = [numpy_helper.from_array(np.array(index, np.int64), "i"), numpy_helper.from_array(np.array(1, np.int64), "i1"),
             numpy_helper.from_array(np.array([0], np.int64), "ax"), numpy_helper.from_array(np.array([-1], np.int64), "m1")]
    return make(nodes, inits, [vi("x", ["N", 3, 2, 2])], [vi("y", None)])


def test_shape_chains_fold_with_a_symbolic_batch():
    m = shape_chain_model()
    out, res, p = apply(passes.FoldShapeChainsPass(), m)
    assert res.modified, p.refusals
    out = to_proto(passes.RemoveUnusedNodesPass()(to_ir(out)).model)
    assert ops(out) == {"Reshape": 1, "Cast": 1, "Add": 1}, ops(out)  # Shape / Gather / Unsqueeze / Concat gone
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    shape = next(t for t in out.graph.initializer if t.name == reshape.input[1])
    assert numpy_helper.to_array(shape).tolist() == [0, -1]  # 0: copy the batch
    onnx.checker.check_model(out, full_check=True)
    for n in (1, 5):  # the batch really is free
        assert_same(m, out, {"x": RNG.normal(size=(n, 3, 2, 2)).astype(np.float32)})


@pytest.mark.parametrize("kw, reason", [
    (dict(pieces=("m1", "n1")), "entry 1 is dim N of another tensor"),  # [-1, N]: N is not the data's dim 1
    (dict(allowzero=1), "allowzero=1"),
])
def test_shape_chain_refusals(kw, reason):
    m = shape_chain_model(**kw)
    out, res, p = apply(passes.FoldShapeChainsPass(), m)
    assert "Reshape" in ops(out) and "Concat" in ops(out) and "Shape" in ops(out)
    assert any(reason in r.reason and r.node == "reshape" for r in p.refusals), p.refusals
    feeds = {"x": RNG.normal(size=(4, 3, 2, 2)).astype(np.float32)}
    assert_same(m, out, feeds)  # the static Gather (dim 1 = 3) may fold; the numbers stay
