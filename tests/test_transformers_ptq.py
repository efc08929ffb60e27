"""PTQ on transformer graphs: static QDQ of an attention block (weight and two-activation MatMuls, an
additive -inf attention mask) and `activations="dynamic"` (int8 weights, run-time activation quantizers).
A hand-built single-head attention block stands in for a transformers export: the same ops (MatMul +
Add, Transpose, Where(mask, 0, -inf), Softmax, LayerNormalization, Erf GELU), built in milliseconds."""
from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qtool
from qtool.cli import main
from qtool.evaluation import compare_outputs
from qtool.ortgraph import integer_kernel_report

S, D = 16, 32
RNG = np.random.default_rng(0)


def attention_block() -> onnx.ModelProto:
    """x [B, S, D], mask [B, S] (int64, 1 = token) -> LayerNorm(x + FFN(attn(x)))."""
    def w(name, *shape, s=0.2):
        return nh.from_array(RNG.normal(0, s, shape).astype(np.float32), name)

    inits = [w("wq", D, D), w("wk", D, D), w("wv", D, D), w("wo", D, D), w("w1", D, 2 * D), w("w2", 2 * D, D),
             w("bq", D, s=0.05), w("bk", D, s=0.05), w("bv", D, s=0.05), w("bo", D, s=0.05), w("b1", 2 * D, s=0.05),
             w("b2", D, s=0.05), nh.from_array(np.ones(D, np.float32), "ln_g"), nh.from_array(np.zeros(D, np.float32), "ln_b"),
             nh.from_array(np.array(D ** -0.5, np.float32), "scale"), nh.from_array(np.array(0.0, np.float32), "zero"),
             nh.from_array(np.array(-np.inf, np.float32), "ninf"), nh.from_array(np.array([1], np.int64), "ax1"),
             nh.from_array(np.array(2 ** -0.5, np.float32), "rsqrt2"), nh.from_array(np.array(1.0, np.float32), "one"),
             nh.from_array(np.array(0.5, np.float32), "half")]
    n = h.make_node
    nodes = [n("MatMul", ["x", "wq"], ["q0"]), n("Add", ["q0", "bq"], ["q"]),
             n("MatMul", ["x", "wk"], ["k0"]), n("Add", ["k0", "bk"], ["k"]),
             n("MatMul", ["x", "wv"], ["v0"]), n("Add", ["v0", "bv"], ["v"]),
             n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), n("MatMul", ["q", "kt"], ["s0"], name="qk"),
             n("Mul", ["s0", "scale"], ["s1"]),
             n("Cast", ["mask"], ["mb"], to=T.BOOL), n("Unsqueeze", ["mb", "ax1"], ["mb1"]),
             n("Where", ["mb1", "zero", "ninf"], ["madd"], name="mask_where"),
             n("Add", ["s1", "madd"], ["s2"], name="mask_add"), n("Softmax", ["s2"], ["p"], axis=-1),
             n("MatMul", ["p", "v"], ["ctx"], name="pv"),
             n("MatMul", ["ctx", "wo"], ["o0"]), n("Add", ["o0", "bo"], ["o"]), n("Add", ["x", "o"], ["r1"]),
             n("MatMul", ["r1", "w1"], ["f0"]), n("Add", ["f0", "b1"], ["f1"]),
             n("Mul", ["f1", "rsqrt2"], ["g0"]), n("Erf", ["g0"], ["g1"]), n("Add", ["g1", "one"], ["g2"]),
             n("Mul", ["f1", "g2"], ["g3"]), n("Mul", ["g3", "half"], ["g"]),
             n("MatMul", ["g", "w2"], ["f2"]), n("Add", ["f2", "b2"], ["f3"]), n("Add", ["r1", "f3"], ["r2"]),
             n("LayerNormalization", ["r2", "ln_g", "ln_b"], ["y"], axis=-1, epsilon=1e-5)]
    g = h.make_graph(nodes, "attn", [h.make_tensor_value_info("x", T.FLOAT, ["b", S, D]),
                                     h.make_tensor_value_info("mask", T.INT64, ["b", S])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["b", S, D])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def feeds(n: int = 32, seed: int = 1) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    mask = np.ones((n, S), np.int64)
    for i in range(n):
        mask[i, r.integers(S // 2, S + 1):] = 0
    return {"x": r.normal(0, 1, (n, S, D)).astype(np.float32), "mask": mask}


def run(model: onnx.ModelProto, f: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, f)[0]


def valid_rows_change(model: onnx.ModelProto, f: dict[str, np.ndarray], ignore_mask: bool = False) -> float:
    """Largest change of the output at real tokens when only the padded tokens' inputs change: 0 when
    the mask works (up to requantization noise), large when padded tokens are attended to (as with
    `ignore_mask`, which feeds an all-ones mask)."""
    pad = f["mask"] == 0
    f = dict(f, mask=np.ones_like(f["mask"])) if ignore_mask else f
    g = dict(f, x=f["x"].copy())
    g["x"][pad] = np.random.default_rng(2).normal(0, 3, g["x"][pad].shape)
    a, b = run(model, f), run(model, g)
    return float(np.max(np.abs(a - b)[~pad]))


def test_static_attention_block_runs_every_matmul_as_an_integer_kernel_and_keeps_the_mask():
    m, f = attention_block(), feeds()
    r = qtool.quantize(m, [f], qtool.QuantConfig())
    rep = integer_kernel_report(r.model)
    # 4 weight products (+ FFN's 2) and both two-activation products Q K^T and P V
    assert rep.compute_nodes == 8 and rep.integer_compute == 8 and rep.float_fallbacks == 0, rep.to_dict()
    assert {"madd", "s2"}.isdisjoint(r.plan.tensors)  # the -inf mask and the masked scores stay float
    assert compare_outputs(run(m, f), run(r.model, f)).sqnr_db > 18  # measured 21.8 dB (W8A8 U8S8)
    assert r.report.outputs["y"].sqnr_db > 18 and not r.report.tensors  # outputs only unless asked
    assert valid_rows_change(r.model, f) < 0.05 * valid_rows_change(m, f, ignore_mask=True)


def test_the_mask_check_fails_when_the_mask_is_quantized():
    """What quantize did before: the mask's finite values are all 0, so Q(-inf) became code 0."""
    from exporters.qdq import apply_plan
    from qtool.plan import TensorQuant

    m, f = attention_block(), feeds()
    r = qtool.quantize(m, [f], qtool.QuantConfig())
    bad = r.plan.__class__(meta=r.plan.meta, tensors=dict(r.plan.tensors))
    bad.tensors["madd"] = TensorQuant("activation", 8, False, scale=1.0, zero_point=0)
    broken = apply_plan(r.fused, bad)
    assert valid_rows_change(broken, f) > 10 * valid_rows_change(r.model, f)


def test_calibration_flags_tensors_holding_inf():
    from qtool.calibrate import TensorStats

    s = TensorStats()
    s.update(np.array([0.0, -np.inf, 0.0], np.float32))
    assert not s.finite and s.nonfinite == 1 and s.range("minmax", signed=False) == (0.0, 0.0)
    t = TensorStats()
    t.update(np.array([1.0, -2.0], np.float32))
    assert t.finite


def test_per_tensor_report_on_request():
    m, f = attention_block(), feeds(8)
    r = qtool.quantize(m, [f], qtool.QuantConfig(per_tensor_report=True))
    acts = {t for t, q in r.plan.tensors.items() if q.kind == "activation"}
    assert {e.tensor for e in r.report.tensors} == acts and all(np.isfinite(e.sqnr_db) for e in r.report.tensors)


def test_dynamic_needs_no_data_and_runs_weight_matmuls_as_dynamic_integer_kernels():
    m, f = attention_block(), feeds()
    r = qtool.quantize(m, None, qtool.QuantConfig(activations="dynamic"))
    ops = {n.op_type for n in r.model.graph.node}
    assert "QuantizeLinear" not in ops and "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops
    rep = integer_kernel_report(r.model)
    assert rep.integer_compute == 6 and rep.float_compute == 2, rep.to_dict()  # Q K^T and P V stay float
    assert set(rep.integer_ops) <= {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    assert all(q.kind == "weight" for q in r.plan.tensors.values()) and len(r.plan.tensors) == 6
    assert r.report.samples == 0 and not r.report.outputs
    assert compare_outputs(run(m, f), run(r.model, f)).sqnr_db > 30  # measured 33.7 dB
    with_data = qtool.quantize(m, [f], qtool.QuantConfig(activations="dynamic"))
    assert with_data.report.samples == 32 and with_data.report.outputs["y"].sqnr_db > 30


def test_dynamic_weights_never_saturate_int16_pairs():
    """uint8 codes up to 255 times a K-adjacent weight pair must stay within int16 (no-VNNI kernels)."""
    from qtool.ptq import dynamic_weight_quant, weight_quant
    from passes.qdq import quantize_array

    w = RNG.normal(0, 0.1, (64, 8)).astype(np.float32)
    w[10, 3] = w[11, 3] = 1.0  # two large neighbours along K in column 3
    for tq, axis in ((dynamic_weight_quant(w, 1, True), 1), (dynamic_weight_quant(w.T.copy(), 0, True), 0)):
        q = quantize_array(w if axis == 1 else w.T, tq.scale, tq.zero_point, tq.axis, -127, 127).astype(np.int32)
        kn = np.abs(q if axis == 1 else q.T)
        assert (kn[0::2] + kn[1::2]).max() * 255 <= 32767
        assert kn.max() > 100  # the other columns keep (nearly) the full int8 range
    plain = weight_quant(w, 8, 1)  # max scaling: the check above fails on it
    q = np.abs(quantize_array(w, plain.scale, plain.zero_point, 1, -127, 127).astype(np.int32))
    assert (q[0::2] + q[1::2]).max() * 255 > 32767


def test_quantconfig_activations_validation():
    with pytest.raises(qtool.QtoolError, match="activations must be static, dynamic or none"):
        qtool.QuantConfig(activations="runtime")
    with pytest.raises(qtool.QtoolError, match="8 bits"):
        qtool.QuantConfig(activations="dynamic", weight_bits=4)
    with pytest.raises(qtool.QtoolError, match="format"):
        qtool.QuantConfig(activations="dynamic", format="qoperator")


def test_cli_dynamic_without_data_and_its_refusals(tmp_path, capsys):
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(attention_block(), src)
    assert main(["quantize", str(src), "--activations", "dynamic", "-o", str(out)]) == 0
    assert "dynamic activations" in capsys.readouterr().out and out.exists()
    for argv, msg in ((["--activations", "runtime"], "runtime"),
                      (["--activations", "dynamic", "--bits", "w4a8"], "8 bits"),
                      (["--activations", "dynamic", "--report", str(tmp_path / "r.json")], "--report")):
        target = tmp_path / "bad.onnx"
        assert main(["quantize", str(src), "-o", str(target)] + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and msg in err[-1] and not target.exists()
    # static without --data on a model digits cannot feed asks for data, as before
    assert main(["quantize", str(src), "-o", str(tmp_path / "s.onnx")]) == 2
    assert "--data" in capsys.readouterr().err
    np.savez(tmp_path / "d.npz", **feeds(8))
    assert main(["quantize", str(src), "--activations", "dynamic", "--data", f"npz:{tmp_path / 'd.npz'}",
                 "-o", str(tmp_path / "d.onnx")]) == 0
    assert re.search(r"vs FP32 on \d+ calibration samples", capsys.readouterr().out)


def _gelu_mlp(gate_from_x: bool = True) -> onnx.ModelProto:
    """MatMul -> decomposed GELU (x * (1 + erf(x / sqrt 2)) * 0.5, as torch exports it) -> MatMul; with
    `gate_from_x=False` the erf reads another tensor, so the Mul is a plain product of two activations."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.normal(0, 0.3, (16, 32)).astype(np.float32), "w1"),
             nh.from_array(rng.normal(0, 0.3, (32, 8)).astype(np.float32), "w2"),
             nh.from_array(rng.normal(0, 0.3, (16, 32)).astype(np.float32), "w3"),
             nh.from_array(np.array(1.4142135, np.float32), "sqrt2"), nh.from_array(np.array(1.0, np.float32), "one"),
             nh.from_array(np.array(0.5, np.float32), "half")]
    nodes = [h.make_node("MatMul", ["x", "w1"], ["a"]), h.make_node("MatMul", ["x", "w3"], ["o"]),
             h.make_node("Div", ["a" if gate_from_x else "o", "sqrt2"], ["d"]), h.make_node("Erf", ["d"], ["e"]),
             h.make_node("Add", ["e", "one"], ["g"]), h.make_node("Mul", ["a", "g"], ["p"], name="gate"),
             h.make_node("Mul", ["p", "half"], ["q"]), h.make_node("MatMul", ["q", "w2"], ["y"])]
    g = h.make_graph(nodes, "gelu", [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 8])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("gate_from_x", [True, False])
def test_decomposed_gelu_stays_float_but_other_products_are_quantized(gate_from_x):
    m = _gelu_mlp(gate_from_x)
    x = np.random.default_rng(1).normal(0, 1, (64, 16)).astype(np.float32)
    r = qtool.quantize(m, [{"x": x}], qtool.QuantConfig(calib="minmax"))
    gate = next(n for n in r.model.graph.node if n.name == "gate")
    producers = {o: n.op_type for n in r.model.graph.node for o in n.output}
    # "a" is the first MatMul's output, quantized for its integer kernel either way; the gate (1 + erf) and
    # the product are quantized only where the Mul is a plain product of two activations.
    assert producers[gate.input[0]] == "DequantizeLinear"
    assert (producers.get(gate.input[1]) == "DequantizeLinear") == (not gate_from_x)
    readers = [n.op_type for n in r.model.graph.node if gate.output[0] in n.input]
    assert ("QuantizeLinear" in readers) == (not gate_from_x)
    # every live MatMul integer either way (the x @ w3 branch is dead when the erf reads "a")
    assert integer_kernel_report(r.model).integer_compute == (2 if gate_from_x else 3)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert compare_outputs(ref, got).sqnr_db > 25
