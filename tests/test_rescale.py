"""quantize --equalize (passes.equalize) and --smoothquant (passes.smooth): FP32 unchanged, ranges moved
where the math says, refusals with their reason, composition with bias correction, config / CLI errors."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes
from passes.equalize import MAX_ROUNDS
import qtool
from qtool.cli import main as cli_main
from qtool.errors import QtoolError
from qtool.ptq import QuantConfig
from qtool.rescale import channel_absmax


def _model(nodes, inits, x_shape, y_shape, opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def unbalanced(r, *shape, spread=3.0):
    """Weights whose output channels (axis 0) differ in magnitude by up to 10^spread."""
    return r.normal(size=shape) * 10.0 ** r.uniform(-spread / 2, spread / 2, size=(shape[0],) + (1,) * (len(shape) - 1))


def conv_relu_conv(act="Relu", branch=False) -> onnx.ModelProto:
    r = np.random.default_rng(0)
    inits = {"w1": unbalanced(r, 8, 3, 3, 3), "b1": r.normal(size=8), "w2": r.normal(size=(5, 8, 1, 1)),
             "b2": r.normal(size=5)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    if act == "Clip":
        inits.update(lo=np.array(0.0), hi=np.array(6.0))
        nodes.append(helper.make_node("Clip", ["c1", "lo", "hi"], ["a"], name="relu6"))
    else:
        nodes.append(helper.make_node(act, ["c1"], ["a"], name="act", **({"alpha": 0.1} if act == "LeakyRelu" else {})))
    nodes.append(helper.make_node("Conv", ["a", "w2", "b2"], ["c2" if branch else "y"], name="conv2"))
    if branch:  # the activation is also read outside the pair
        inits["w3"] = r.normal(size=(5, 8, 1, 1))
        nodes += [helper.make_node("Conv", ["a", "w3"], ["c3"], name="conv3"),
                  helper.make_node("Add", ["c2", "c3"], ["y"], name="add")]
    return _model(nodes, inits, ["N", 3, 8, 8], ["N", 5, 8, 8])


def depthwise_separable() -> onnx.ModelProto:
    """Conv 3->8, Relu, depthwise 3x3 (group 8), Relu, pointwise 8->6: two chained pairs."""
    r = np.random.default_rng(1)
    inits = {"w1": unbalanced(r, 8, 3, 3, 3), "b1": r.normal(size=8), "wd": unbalanced(r, 8, 1, 3, 3),
             "bd": r.normal(size=8), "wp": r.normal(size=(6, 8, 1, 1)), "bp": r.normal(size=6)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "wd", "bd"], ["c2"], name="dw", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "wp", "bp"], ["y"], name="pw")]
    return _model(nodes, inits, ["N", 3, 8, 8], ["N", 6, 8, 8])


def run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def sqnr(ref, got) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)))


def images(n=16, seed=0):
    return {"x": np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)}


def apply(p, model):
    m = passes.to_ir(model)
    res = p(m)
    return passes.to_proto(m), res.modified


def inits_of(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def in_ranges(w, group):
    """max |w| per input channel of a (grouped) conv weight."""
    m, cpg = w.shape[0], w.shape[1]
    return np.abs(w).reshape(group, m // group, cpg, -1).transpose(0, 2, 1, 3).reshape(group * cpg, -1).max(axis=1)


def out_ranges(w):
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


@pytest.mark.parametrize("act", ["Relu", "LeakyRelu"])
def test_equalize_conv_act_conv_keeps_fp32_and_equalizes_ranges(act):
    m = conv_relu_conv(act)
    p = passes.CrossLayerEqualizationPass()
    eq, modified = apply(p, m)
    assert modified and len(p.fired) == 1 and not p.refusals
    x = images()
    assert rel(run(m, x), run(eq, x)) < 1e-5
    w = inits_of(eq)
    before = inits_of(m)
    assert out_ranges(before["w1"]).max() / out_ranges(before["w1"]).min() > 10  # the test model is unbalanced
    # one pair: one step makes both ranges sqrt(r1 * r2) per channel
    np.testing.assert_allclose(out_ranges(w["w1"]), in_ranges(w["w2"], 1), rtol=1e-5)
    np.testing.assert_allclose(out_ranges(w["w1"]), np.sqrt(out_ranges(before["w1"]) * in_ranges(before["w2"], 1)),
                               rtol=1e-5)
    assert not np.allclose(w["b1"], before["b1"])  # the bias moved with its channel


def test_equalize_depthwise_separable_converges_and_keeps_fp32():
    m = depthwise_separable()
    p = passes.CrossLayerEqualizationPass()
    eq, _ = apply(p, m)
    assert [f.what for f in p.fired] == ["'conv1' -> 'dw' equalized", "'dw' -> 'pw' equalized"]
    assert 1 < p.rounds < MAX_ROUNDS  # chained pairs pull on the middle conv: several rounds, converged
    x = images()
    assert rel(run(m, x), run(eq, x)) < 1e-4
    w = inits_of(eq)
    # the fixpoint: every shared channel has one range on both sides of both pairs
    np.testing.assert_allclose(out_ranges(w["w1"]), in_ranges(w["wd"], 8), rtol=1e-3)
    np.testing.assert_allclose(out_ranges(w["wd"]), in_ranges(w["wp"], 1), rtol=1e-3)
    before = out_ranges(inits_of(m)["wd"])
    assert out_ranges(w["wd"]).max() / out_ranges(w["wd"]).min() < before.max() / before.min() / 5


@pytest.mark.parametrize("kind,reason", [
    ("Clip", "Clip 'relu6' between them is not scale-equivariant"),
    ("branch", "intermediate tensor 'a' has 2 readers"),
])
def test_equalize_refuses_with_reason(kind, reason):
    m = conv_relu_conv("Clip") if kind == "Clip" else conv_relu_conv(branch=True)
    p = passes.CrossLayerEqualizationPass()
    eq, modified = apply(p, m)
    assert not modified and not p.fired
    assert any(reason in r.reason for r in p.refusals), p.refusals
    for k, v in inits_of(m).items():
        np.testing.assert_array_equal(inits_of(eq)[k], v)


def test_equalize_helps_per_tensor_weights_and_composes_with_bias_correction():
    m, calib = depthwise_separable(), [images(32, s) for s in range(2)]
    cfg = dict(per_channel=False, calib="minmax")
    plain = qtool.quantize(m, calib, QuantConfig(**cfg))
    eq = qtool.quantize(m, calib, QuantConfig(equalize=True, bias_correction=True, **cfg))
    x = images(64, 9)
    ref = run(m, x)
    # per-tensor weight scales crush the small channels of the unbalanced convs; equalized they do not
    assert sqnr(ref, run(eq.model, x)) > sqnr(ref, run(plain.model, x)) + 6
    meta = eq.plan.meta
    assert len(meta["rescale"]["equalize"]["pairs"]) == 2 and "bias_correction" in meta["refine"]
    assert any(line.startswith("equalize: 2 Conv pairs") for line in eq.lines())
    assert {n.op_type for n in eq.model.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    # deterministic
    again = qtool.quantize(m, calib, QuantConfig(equalize=True, bias_correction=True, **cfg))
    np.testing.assert_array_equal(run(eq.model, x), run(again.model, x))


# -- SmoothQuant -------------------------------------------------------------------------------

H = 16


def norm_qkv(residual=False, shared=False) -> onnx.ModelProto:
    """LayerNorm (one outlier channel in gamma) -> Reshape (B*T, H) -> three Gemms (Q/K/V, one transB)
    and a MatMul; `residual`: the LayerNorm output is also added back, as in post-LN BERT; `shared`: a
    second LayerNorm reads the same gamma / beta (as onnxsim leaves them) and is added to the output."""
    r = np.random.default_rng(2)
    gamma = np.ones(H)
    gamma[3] = 40.0
    inits = {"gamma": gamma, "beta": r.normal(size=H) * 0.1, "wq": r.normal(size=(H, H)), "wk": r.normal(size=(H, H)),
             "wv": r.normal(size=(H, H)) * 0.2, "wm": r.normal(size=(H, H)), "bq": r.normal(size=H)}
    shape = numpy_helper.from_array(np.array([-1, H], np.int64), "shape")
    back = numpy_helper.from_array(np.array([-1, 4, H], np.int64), "back")
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="ln", axis=-1),
             helper.make_node("Reshape", ["n", "shape"], ["n2"], name="flat"),
             helper.make_node("Gemm", ["n2", "wq", "bq"], ["q"], name="q"),
             helper.make_node("Gemm", ["n2", "wk"], ["k"], name="k", transB=1),
             helper.make_node("Gemm", ["n2", "wv"], ["v"], name="v"),
             helper.make_node("MatMul", ["n", "wm"], ["mm"], name="mm"),
             helper.make_node("Add", ["q", "k"], ["qk"], name="qk"),
             helper.make_node("Add", ["qk", "v"], ["qkv"], name="qkv"),
             helper.make_node("Reshape", ["qkv", "back"], ["s"], name="unflat"),
             helper.make_node("Add", ["s", "mm"], ["y0" if residual or shared else "y"], name="sum")]
    if residual or shared:
        if shared:
            nodes.append(helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n_2"], name="ln2", axis=-1))
        nodes.append(helper.make_node("Add", ["y0", "n_2" if shared else "n"], ["y"], name="residual"))
    m = _model(nodes, inits, ["N", 4, H], ["N", 4, H])
    m.graph.initializer.extend([shape, back])
    return m


def tokens(n=8, seed=0):
    return {"x": np.random.default_rng(seed).normal(size=(n, 4, H)).astype(np.float32)}


def test_smoothquant_moves_outliers_into_the_shared_weights_and_keeps_fp32():
    m, x = norm_qkv(), tokens()
    targets = passes.smooth_targets(passes.to_ir(m).graph)
    assert [t.tensor for t in targets] == ["n"] and sorted(n.name for n, _ in targets[0].readers) == ["k", "mm", "q", "v"]
    amax = channel_absmax(m, [x], ["n"])
    assert amax["n"].argmax() == 3
    p = passes.SmoothQuantPass(amax, 0.5)
    sm, modified = apply(p, m)
    assert modified and len(p.fired) == 1
    assert rel(run(m, x), run(sm, x)) < 1e-5
    before, after = inits_of(m), inits_of(sm)
    wmax = np.max([np.abs(before["wq"]).max(1), np.abs(before["wk"]).max(0), np.abs(before["wv"]).max(1),
                   np.abs(before["wm"]).max(1)], axis=0)
    s = np.sqrt(amax["n"]) / np.sqrt(wmax)  # alpha 0.5: max|X_j|^0.5 / max|W_j|^0.5, one s for all readers
    np.testing.assert_allclose(after["gamma"], before["gamma"] / s, rtol=1e-5)
    np.testing.assert_allclose(after["wk"], before["wk"] * s.reshape(1, -1), rtol=1e-5)  # transB: columns
    np.testing.assert_allclose(after["wv"], before["wv"] * s.reshape(-1, 1), rtol=1e-5)
    smoothed = channel_absmax(sm, [x], ["n"])["n"]
    assert smoothed.max() / np.median(smoothed) < amax["n"].max() / np.median(amax["n"]) / 3


def test_smoothquant_refuses_a_residual_reader_and_keeps_the_model():
    m, x = norm_qkv(residual=True), tokens()
    p = passes.SmoothQuantPass(channel_absmax(m, [x], ["n"]), 0.5)
    sm, modified = apply(p, m)
    assert not modified
    assert any("also read by Add 'residual'" in r.reason for r in p.refusals), p.refusals
    for k, v in inits_of(m).items():
        np.testing.assert_array_equal(inits_of(sm)[k], v)


def test_smoothquant_unties_a_shared_gamma():
    m, x = norm_qkv(shared=True), tokens()
    p = passes.SmoothQuantPass(channel_absmax(m, [x], ["n", "n_2"]), 0.5)
    sm, modified = apply(p, m)
    assert modified and len(p.fired) == 1 and any("Add 'residual'" in r.reason for r in p.refusals)
    assert rel(run(m, x), run(sm, x)) < 1e-5
    ln, ln2 = (next(n for n in sm.graph.node if n.name == k) for k in ("ln", "ln2"))
    assert list(ln2.input[1:]) == ["gamma", "beta"] and ln.input[1] not in ("gamma", "beta")
    np.testing.assert_array_equal(inits_of(sm)["gamma"], inits_of(m)["gamma"])


def test_smoothquant_in_quantize():
    m, calib = norm_qkv(), [tokens(64, s) for s in range(2)]
    cfg = dict(calib="minmax", per_tensor_report=True)
    plain = qtool.quantize(m, calib, QuantConfig(**cfg))
    q = qtool.quantize(m, calib, QuantConfig(smoothquant=0.5, **cfg))
    assert len(q.plan.meta["rescale"]["smoothquant"]["smoothed"]) == 1
    before, after = ({t.tensor: t.sqnr_db for t in r.report.tensors} for r in (plain, q))
    # the outlier channel no longer sets the per-tensor input scale of the four products
    for t in ("q", "k", "v", "mm"):
        assert after[t] > before[t] + 3, (t, before[t], after[t])
    x = tokens(16, 5)
    ref = run(m, x)
    assert sqnr(ref, run(q.model, x)) > sqnr(ref, run(plain.model, x)) + 1


# -- config / CLI ------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(smoothquant=1.5), "smoothquant must be an alpha in [0, 1]"),
    (dict(smoothquant=True), "smoothquant must be an alpha"),
    (dict(equalize="yes"), "equalize must be true or false"),
    (dict(equalize=True, activations="dynamic"), "activations='dynamic' has no calibration"),
])
def test_bad_config(kw, msg):
    with pytest.raises(QtoolError) as ei:
        QuantConfig(**kw)
    assert msg in str(ei.value)


def test_cli(tmp_path, capsys):
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(depthwise_separable(), src)
    np.savez(tmp_path / "calib.npz", x=images(16)["x"])
    data = f"npz:{tmp_path / 'calib.npz'}"
    assert cli_main(["quantize", str(src), "--data", data, "-o", str(out), "--smoothquant", "-1"]) == 2
    assert "smoothquant must be an alpha in [0, 1]" in capsys.readouterr().err and not out.exists()
    assert cli_main(["quantize", str(src), "--data", data, "-o", str(out), "--equalize"]) == 0
    assert "equalize: 2 Conv pairs equalized" in capsys.readouterr().out
    x = images(4, 3)
    assert sqnr(run(depthwise_separable(), x), run(onnx.load(out), x)) > 20
