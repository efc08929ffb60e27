"""PTQ end to end: config validation, QDQ structure, numbers vs a NumPy reference, onnxruntime fusion."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtool.errors import QtoolError
from qtool.plan import QuantPlan
import qtool
from qtool.cli import main as cli_main
from qtool.fusion import fuse
from qtool.ptq import QuantConfig, quantize
from test_passes import _torch_cnn_onnx, ops, run

RNG = np.random.default_rng(2)


@pytest.mark.parametrize("kw,msg", [
    (dict(weight_bits=9), "weight_bits must be an integer in 2..8"),
    (dict(act_bits=1), "act_bits must be an integer in 2..8"),
    (dict(weight_bits=True), "weight_bits"),
    (dict(calib="kl"), "calib must be one of minmax, percentile, entropy, mse"),
    (dict(percentile=40), "percentile must be in (50, 100]"),
    (dict(per_channel="yes"), "per_channel must be true or false"),
    (dict(act_symmetric=True), "act_symmetric needs act_signed"),
    (dict(bins=10), "bins must be a multiple of 4"),
    (dict(max_batches=0), "max_batches must be a positive integer"),
])
def test_bad_config(kw, msg):
    with pytest.raises(QtoolError) as ei:
        QuantConfig(**kw)
    assert msg in str(ei.value) and "\n" not in str(ei.value)


def mlp():
    nodes = [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2", "B2"], ["y"], name="fc2", transB=1)]
    inits = [numpy_helper.from_array(RNG.normal(size=(16, 8)).astype(np.float32) * s, n) if n.startswith("W")
             else numpy_helper.from_array(RNG.normal(size=k).astype(np.float32) * 0.1, n)
             for n, s, k in (("W1", 0.5, 16), ("B1", 0, 16))]
    inits += [numpy_helper.from_array(RNG.normal(size=(5, 16)).astype(np.float32) * 0.3, "W2"),
              numpy_helper.from_array(RNG.normal(size=5).astype(np.float32) * 0.1, "B2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.metadata_props.add(key="qtool.preprocess", value='{"mean": [0.0], "std": [1.0]}')
    return m


def batches(shape, n=4, seed=0):
    r = np.random.default_rng(seed)
    return [{"x": r.normal(size=shape).astype(np.float32)} for _ in range(n)]


def fq(x, t, axis=None):
    """NumPy fake-quant with the plan entry's parameters (round half to even, saturate)."""
    s, z = np.asarray(t.scale, np.float32), np.asarray(t.zero_point, np.float32)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    lo, hi = t.qrange
    return ((np.clip(np.rint(x / s) + z, lo, hi) - z) * s).astype(np.float32)


def test_qdq_numbers_match_numpy_reference():
    m = mlp()
    q, plan = quantize(m, batches((8, 8)), QuantConfig())
    onnx.checker.check_model(q, full_check=True)
    T = plan.tensors
    assert T["W1"].granularity == "per_channel" and T["W1"].axis == 0 and T["x"].signed is False
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    x = np.random.default_rng(9).normal(size=(6, 8)).astype(np.float32)

    def bias(b, t_in, t_w):
        s = (np.float32(t_in.scale) * np.asarray(t_w.scale, np.float32)).astype(np.float32)
        return (np.rint(b / s) * s).astype(np.float32)

    h = fq(x, T["x"]) @ fq(init["W1"], T["W1"], 0).T + bias(init["B1"], T["x"], T["W1"])
    r = fq(np.maximum(h, 0), T["r"])
    y = fq(r @ fq(init["W2"], T["W2"], 0).T + bias(init["B2"], T["r"], T["W2"]), T["y"])
    got = run(q, {"x": x})[0]
    assert np.max(np.abs(got - y)) <= 2 * T["y"].scale + 1e-6
    meta = {p.key: p.value for p in q.metadata_props}
    assert "qtool.preprocess" in meta and "qtool.units" in meta


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> dict[str, int]:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / f"opt_{len(os.listdir(tmp_path))}.onnx")
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return ops(onnx.load(so.optimized_model_filepath))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cnn_qdq_structure_and_ort_fusion(tmp_path):
    m = _torch_cnn_onnx(13)
    fused, _ = fuse(m)
    q, plan = quantize(fused, batches((2, 3, 8, 8)), QuantConfig(calib="percentile"))
    onnx.checker.check_model(q, full_check=True)
    # one Q per quantized activation, and no DQ feeding a Q (no requantize chains)
    producers = {o: n for n in q.graph.node for o in n.output}
    qs = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert len({n.input[0] for n in qs}) == len(qs) == sum(t.kind == "activation" for t in plan.tensors.values())
    assert not any(producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "DequantizeLinear"
                   for n in qs)
    # onnxruntime turns every Conv/Gemm into an integer kernel: no float fallback
    opt = _optimized_ops(q, tmp_path)
    assert opt.get("QLinearConv", 0) == 2 and opt.get("QGemm", 0) == 1 and opt.get("QLinearAdd", 0) == 1, opt
    assert "Conv" not in opt and "Gemm" not in opt and "FusedConv" not in opt, opt
    assert opt.get("QLinearGlobalAveragePool", 0) == 1
    # the same integer kernels as onnxruntime's own quantize_static (U8S8, per-channel, QDQ)
    qs_mod = pytest.importorskip("onnxruntime.quantization")

    class Reader(qs_mod.CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches((2, 3, 8, 8)))

        def get_next(self):
            return next(self.it, None)

    fused_path, ref_path = tmp_path / "fused.onnx", tmp_path / "ref.onnx"
    onnx.save(fused, fused_path)
    qs_mod.quantize_static(str(fused_path), str(ref_path), Reader(), quant_format=qs_mod.QuantFormat.QDQ,
                           per_channel=True, activation_type=qs_mod.QuantType.QUInt8,
                           weight_type=qs_mod.QuantType.QInt8)
    ref_opt = _optimized_ops(onnx.load(ref_path), tmp_path)
    for k in ("QLinearConv", "QGemm", "QLinearAdd", "QLinearGlobalAveragePool"):
        assert opt.get(k, 0) >= ref_opt.get(k, 0), (k, opt, ref_opt)
    # and the result is close to float
    x = np.random.default_rng(5).normal(size=(4, 3, 8, 8)).astype(np.float32)
    ref, got = run(m, {"x": x})[0], run(q, {"x": x})[0]
    assert np.max(np.abs(ref - got)) < 0.05 * np.max(np.abs(ref)) + 0.02


@pytest.mark.parametrize("calib", ["minmax", "entropy", "mse"])
def test_calib_methods_and_per_tensor(calib):
    q, plan = quantize(mlp(), batches((8, 8)), QuantConfig(calib=calib, per_channel=False))
    assert all(t.granularity == "per_tensor" for t in plan.tensors.values())
    onnx.checker.check_model(q, full_check=True)


def test_sub_8_bit_weights_and_activations():
    q, plan = quantize(mlp(), batches((8, 8)), QuantConfig(weight_bits=4, act_bits=4))
    w = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    assert w["W1_quantized"].dtype == np.int8 and np.abs(w["W1_quantized"]).max() <= 7
    assert ops(q).get("Clip", 0) == sum(t.kind == "activation" for t in plan.tensors.values())
    x = np.random.default_rng(3).normal(size=(4, 8)).astype(np.float32) * 3
    y = run(q, {"x": x})[0]
    t = plan.tensors["y"]
    codes = y / t.scale + t.zero_point
    assert np.allclose(codes, np.rint(codes), atol=1e-3) and codes.min() >= -1e-3 and codes.max() <= 15 + 1e-3


def test_files_metadata_plan_and_bad_paths(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(mlp(), src)
    f = qtool.fuse(src)
    f.save(tmp_path / "fused.onnx")
    assert f.summary.units == 2 and f.summary.lines()
    r = qtool.quantize(src, batches((8, 8)), QuantConfig())
    r.save(tmp_path / "q.onnx", tmp_path / "plan.json")
    q = onnx.load(tmp_path / "q.onnx")
    assert {p.key: p.value for p in q.metadata_props}["qtool.preprocess"] == '{"mean": [0.0], "std": [1.0]}'
    plan = QuantPlan.load(tmp_path / "plan.json", onnx.load(tmp_path / "fused.onnx"))
    assert plan.calibrated and r.summary.tensors and r.lines()
    before = sorted(os.listdir(tmp_path))
    assert cli_main(["quantize", str(src), "--data", "digits", "-o", str(tmp_path / "no" / "q.onnx")]) == 2  # no folder
    with pytest.raises(QtoolError, match="no calibration batches"):
        qtool.quantize(src, [], QuantConfig())
    assert cli_main(["fuse", str(src), "-o", str(src)]) == 2  # the CLI refuses to overwrite its input
    assert sorted(os.listdir(tmp_path)) == before  # no partial outputs


def test_inputs_are_not_mutated():
    m = mlp()
    before = m.SerializeToString()
    fused, _ = fuse(m)
    fused_before = fused.SerializeToString()
    quantize(fused, batches((8, 8), n=1))
    assert m.SerializeToString() == before and fused.SerializeToString() == fused_before


def test_shared_bias_is_untied_so_every_conv_runs_integer():
    """onnxsim merges identical (here all-zero) folded biases; one shared int32 bias would carry one
    layer's scale and ORT would leave the other Convs in float."""
    import collections

    import torch

    from qtool.models import build_model
    from qtool.ortgraph import integer_kernel_report
    from qtool.preprocess import Preprocess
    from qtool.training import export_onnx

    torch.manual_seed(0)
    fp32 = export_onnx(build_model("resnet20").eval(), (3, 32, 32), Preprocess())  # fresh BN: zero biases
    fused, summary = fuse(fp32)
    readers = collections.Counter(n.input[2] for n in fused.graph.node if n.op_type == "Conv" and len(n.input) > 2)
    assert readers and max(readers.values()) == 1
    assert any("untied" in f.what for f in summary.fused)
    rng = np.random.default_rng(0)
    q, _ = quantize(fused, [{"input": rng.standard_normal((8, 3, 32, 32)).astype(np.float32)}], QuantConfig())
    r = integer_kernel_report(q)
    assert r.float_fallbacks == 0 and r.integer_compute == 20


@pytest.mark.parametrize("act,fused_act", [("LeakyRelu", "QLinearLeakyRelu"), ("Sigmoid", "QLinearSigmoid"),
                                          ("HardSwish", None), ("Relu", None)])
def test_conv_then_non_absorbable_activation_runs_integer(act, fused_act):
    """A Q absorbs Relu / Clip only: Conv -> LeakyRelu / Sigmoid / HardSwish gets a Q / DQ on the Conv's
    output, so ORT forms QLinearConv (with the activation inside the unit both Convs ran in float)."""
    from qtool.ortgraph import integer_kernel_report, optimized_graph
    from test_exporters import _conv_act_conv

    m = _conv_act_conv(act)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3, 8, 8)).astype(np.float32)
    q, _ = quantize(m, [{"x": x}], QuantConfig())
    q_after_conv1 = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0].startswith("c1")]
    assert bool(q_after_conv1) == (act != "Relu")  # Relu stays inside the unit, absorbed by the output Q
    r = integer_kernel_report(q)
    assert (r.integer_compute, r.float_fallbacks) == (2, 0)
    ort_ops = [n.op_type for n in optimized_graph(q.SerializeToString(), ("CPUExecutionProvider",)).graph.node]
    assert ort_ops.count("QLinearConv") == 2
    if fused_act:
        assert fused_act in ort_ops
    ref = run(m, {"x": x})[0]
    got = run(q, {"x": x})[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_quantize_cli_qoperator_format(tmp_path):
    """--format qoperator: the same calibrated plan lowered to QLinearConv/QGemm, matching the QDQ model."""
    import collections

    import torch

    from qtool.models import build_model
    from qtool.preprocess import Preprocess
    from qtool.training import export_onnx

    torch.manual_seed(0)
    src = tmp_path / "lenet.onnx"
    onnx.save(export_onnx(build_model("lenet5", in_channels=1).eval(), (1, 32, 32), Preprocess(mean=(0.2,), std=(0.33,))), src)
    for fmt in ("qdq", "qoperator"):
        assert cli_main(["quantize", str(src), "--calib-size", "64", "--format", fmt, "-o", str(tmp_path / f"q{fmt}.onnx")]) == 0
    qop = onnx.load(tmp_path / "qqoperator.onnx")
    ops = collections.Counter(n.op_type for n in qop.graph.node)
    assert ops["QLinearConv"] == 2 and "Conv" not in ops and "DequantizeLinear" in ops
    x = np.random.default_rng(0).random((4, 1, 32, 32)).astype(np.float32)
    outs = [ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            for f in ("qqdq.onnx", "qqoperator.onnx")]
    assert np.array_equal(outs[0].argmax(1), outs[1].argmax(1))
    np.testing.assert_allclose(outs[0], outs[1], atol=2 * np.abs(outs[0]).max() / 127)


def conv_chain(n: int = 3, c: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x -> (Conv 3x3 -> Relu) x n, named conv0.. / relu0.."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(n):
        inits += [numpy_helper.from_array(rng.normal(0, 0.3, (c, c if i else 3, 3, 3)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, (c,)).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_an_excluded_conv_between_quantized_ones_really_runs_float():
    """DQ -> Conv(float weight) -> Relu -> Q is what onnxruntime's WeightBiasQuantization quantizes itself
    (per-tensor int8 weights, an integer kernel): the excluded conv reads its input through its own
    per-channel DQ of the same codes, which onnxruntime leaves float."""
    from qtool.ortgraph import integer_kernel_report

    feeds = [{"x": np.random.default_rng(1).normal(size=(16, 3, 8, 8)).astype(np.float32)}]
    q = qtool.quantize(conv_chain(), feeds, QuantConfig(exclude=("conv1",))).model
    r = integer_kernel_report(q)
    assert (r.integer_compute, r.float_compute) == (2, 1)
    conv1 = next(n for n in q.graph.node if n.name == "conv1")
    dq = next(n for n in q.graph.node if n.output[0] == conv1.input[0])
    assert dq.op_type == "DequantizeLinear" and dq.attribute[0].name == "axis"
    # The same values: the unoptimized graph (every Q/DQ run as written) is unchanged by the extra DQ.
    shared = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == dq.input[0]
                  and n is not dq)
    undone = onnx.ModelProto()
    undone.CopyFrom(q)
    next(n for n in undone.graph.node if n.name == "conv1").input[0] = shared.output[0]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = [ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
             for m in (q, undone)]
    np.testing.assert_array_equal(*plain)
    # Without its own DQ onnxruntime quantizes the "float" conv: the check above can fail.
    r = integer_kernel_report(undone)
    assert (r.integer_compute, r.float_compute) == (3, 0)


def test_exclude_keeps_chosen_nodes_in_float(tmp_path, capsys):
    """--exclude by node-name glob or op type: the node's weights stay float and onnxruntime runs it in
    float, the rest stays integer; a pattern that matches nothing is exit 2 (a typo would quantize it)."""
    from qtool.ortgraph import integer_kernel_report

    feeds, fp32 = batches((8, 8)), mlp()  # mlp() draws new weights each call
    full = qtool.quantize(fp32, feeds, QuantConfig())
    part = qtool.quantize(fp32, feeds, QuantConfig(exclude=("fc2",)))
    assert "W2" in full.plan.tensors and "W2" not in part.plan.tensors and "W1" in part.plan.tensors
    assert integer_kernel_report(full.model).integer_compute == 2
    r = integer_kernel_report(part.model)
    assert r.integer_compute == 1 and r.float_compute == 1
    x = {"x": np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)}
    ref = run(fp32, x)[0]
    assert np.square(run(part.model, x)[0] - ref).mean() < np.square(run(full.model, x)[0] - ref).mean()
    glob = qtool.quantize(fp32, feeds, QuantConfig(exclude=("*1",))).plan.tensors  # fc1 only
    assert "W1" not in glob and "W2" in glob
    with pytest.raises(QtoolError, match="nothing to quantize"):
        qtool.quantize(fp32, feeds, QuantConfig(exclude=("Gemm",)))
    src = tmp_path / "m.onnx"
    onnx.save(fp32, src)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32))
    argv = ["quantize", str(src), "--data", f"npz:{tmp_path / 'd.npz'}", "-o", str(tmp_path / "q.onnx")]
    assert cli_main(argv + ["--exclude", "fc3"]) == 2
    assert "exclude pattern 'fc3' matches no node" in capsys.readouterr().err and not (tmp_path / "q.onnx").exists()
    assert cli_main(argv + ["--exclude", "fc2"]) == 0


def test_bias_beyond_int32_codes_does_not_wrap_on_onnxruntime():
    """A channel whose bias is ~1e9 of its int32 codes (tiny weights, large bias: a dead channel after BN
    folding). onnxruntime adds the int32 bias to the int32 sum and wraps on overflow: a bias saturated at
    -2^31 plus a negative sum came out as a large positive value. Codes are held to +-2^30, so the
    channel reads what its float model reads: Relu(large negative) = 0."""
    rng = np.random.default_rng(0)
    w = np.array([[[[-1e-7]]], [[[0.5]]]], np.float32)  # channel 0: ~0 weights, -1e4 bias
    b = np.array([-1e4, 0.1], np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.uniform(0.5, 1.0, (16, 1, 8, 8)).astype(np.float32)
    q, plan = quantize(model, [{"x": x}], QuantConfig(calib="minmax"))
    y = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.all(y[:, 0] == 0.0), y[:, 0].max()  # wrapped (limit 2^31 - 1) it read 0.007 here
    np.testing.assert_allclose(y[:, 1], 0.5 * x[:, 0] + 0.1, atol=0.01)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_first_last_bits_keeps_the_edges_at_8_bits_like_qat():
    from qtool.qat_bits import resolve_bits
    from qtool.qat_config import QATConfig

    fused, _ = fuse(_torch_cnn_onnx(13))
    r = qtool.quantize(fused, batches((2, 3, 8, 8)), QuantConfig(weight_bits=4, act_bits=4, first_last_bits=8))
    bits = {k: t.bits for k, t in r.plan.tensors.items()}
    convs = [n for n in fused.graph.node if n.op_type == "Conv"]
    fc = next(n for n in fused.graph.node if n.op_type == "Gemm")
    assert bits[convs[0].input[1]] == bits["x"] == 8 and bits[convs[1].input[1]] == 4
    assert bits[fc.input[1]] == bits[fc.input[0]] == bits["y"] == 8
    assert sorted(set(bits.values())) == [4, 8]
    # the same tensors at the same bits as `qtool qat`'s first/last policy
    spec = resolve_bits(fused, QATConfig(weight_bits=4, act_bits=4, first_last_bits=8))
    assert {k: s.bits for k, s in spec.items()} == bits
    assert any("first and last layer 8-bit" in line for line in r.lines())
    # the uniform plan differs exactly there: the check can fail
    uni = qtool.quantize(fused, batches((2, 3, 8, 8)), QuantConfig(weight_bits=4, act_bits=4)).plan
    raised = {k for k, t in uni.tensors.items() if t.bits != bits[k]}
    assert raised == {k for k, b in bits.items() if b == 8} >= {convs[0].input[1], "x", fc.input[1], "y"}


@pytest.mark.parametrize("kw,msg", [
    (dict(first_last_bits=9), "first_last_bits must be an integer in 2..8 or None"),
    (dict(first_last_bits=8, activations="dynamic"), "first_last_bits sets the bits of static quantization"),
    (dict(first_last_bits=8, weight_bits=4, max_drop=0.5), "does not combine with the accuracy control"),
])
def test_bad_first_last_bits(kw, msg):
    with pytest.raises(QtoolError, match=msg):
        QuantConfig(**kw)
