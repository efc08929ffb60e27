"""Post-training refinements of `qtool quantize`: learned rounding (algo="adaround") and bias correction.

A small conv net built in code, 4-bit weights; every claim measured on onnxruntime against FP32 on data
the refinement did not see, plus the exact correspondence of the QDQ weights with the learned codes."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qtool
from qtool.cli import main as cli_main
from qtool.errors import QtoolError
from qtool.ptq import QuantConfig

RNG = np.random.default_rng(7)


def convnet() -> onnx.ModelProto:
    """Conv-Relu-Conv-Relu-GAP-Gemm on 3x8x8 inputs (fused already: no BN)."""
    def w(*shape, gain=1.0):
        fan_in = int(np.prod(shape[1:]))
        return (RNG.normal(size=shape) * gain * np.sqrt(2.0 / fan_in)).astype(np.float32)

    inits = [numpy_helper.from_array(w(12, 3, 3, 3), "w1"), numpy_helper.from_array(RNG.normal(size=12).astype(np.float32) * 0.1, "b1"),
             numpy_helper.from_array(w(16, 12, 3, 3), "w2"), numpy_helper.from_array(RNG.normal(size=16).astype(np.float32) * 0.1, "b2"),
             numpy_helper.from_array(w(6, 16, gain=0.7), "w3"), numpy_helper.from_array(np.zeros(6, np.float32), "b3")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.metadata_props.add(key="qtool.preprocess", value='{"mean": [0.0], "std": [1.0]}')
    return m


def feeds(n_batches: int, seed: int, bs: int = 32) -> list[dict[str, np.ndarray]]:
    r = np.random.default_rng(seed)
    return [{"x": r.normal(size=(bs, 3, 8, 8)).astype(np.float32)} for _ in range(n_batches)]


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    err = np.sum((ref - got) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(np.sum(ref ** 2) / err))


def weight_codes(qdq: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """weight name -> (int codes, scale) of each weight DequantizeLinear."""
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    out = {}
    for n in qdq.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.output[0] in ("w1", "w2", "w3"):
            out[n.output[0]] = (inits[n.input[0]], inits[n.input[1]])
    return out


W4 = dict(weight_bits=4, act_bits=8, adaround_iters=200, adaround_samples=128)


@pytest.fixture(scope="module")
def results(one_thread):
    m, calib = convnet(), feeds(4, 0)
    plain = qtool.quantize(m, calib, QuantConfig(**W4))
    ada = qtool.quantize(m, calib, QuantConfig(algo="adaround", **W4))
    return m, plain, ada


def test_qdq_weights_are_the_learned_codes_times_scale(results):
    m, plain, ada = results
    fp = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    tuned = {t.name: numpy_helper.to_array(t) for t in ada.fused.graph.initializer}
    changed = 0
    for name, (codes, scale) in weight_codes(ada.model).items():
        s = scale.reshape([-1] + [1] * (codes.ndim - 1)) if scale.ndim else scale
        # the QDQ model's dequantized weights are exactly the refined fused weights: code * scale
        assert np.array_equal(codes.astype(np.float32) * s, tuned[name]), name
        assert np.abs(codes).max() <= 7  # the narrow int4 range
        nearest, _ = weight_codes(plain.model)[name]
        assert np.array_equal(nearest, np.clip(np.rint(fp[name] / s), -7, 7))  # plain = nearest rounding
        changed += int((codes != nearest).sum())
        assert np.abs(codes.astype(int) - nearest).max() <= 1  # up or down, never further
    assert changed > 0  # the learned rounding is not nearest rounding
    # the scales are the plan's: apply_plan reproduced the codes, not a new grid
    assert all(np.array_equal(weight_codes(ada.model)[k][1], weight_codes(plain.model)[k][1]) for k in ("w1", "w2", "w3"))


def test_adaround_lowers_layer_error_and_raises_output_sqnr(results):
    m, plain, ada = results
    rep = ada.plan.meta["refine"]
    assert rep["adaround"]["layers_learned"] == 3 and not rep["adaround"]["layers_skipped_time_budget"]
    assert any(line.startswith("adaround: 3/3 layers learned") for line in ada.lines())
    from qtool.adaround import adaround

    _, layer_rep = adaround(plain.fused, plain.plan, feeds(4, 0), iters=200, samples=128, show_progress=False)
    for r in layer_rep.layers:  # every layer's reconstruction error on the samples goes down
        assert r.mse_learned < r.mse_nearest, r
    assert np.median([r.mse_learned / r.mse_nearest for r in layer_rep.layers]) < 0.9
    x = np.concatenate([f["x"] for f in feeds(4, 99)])  # unseen data
    ref = run(m, x)
    assert sqnr(ref, run(ada.model, x)) > sqnr(ref, run(plain.model, x)) + 0.5


def test_deterministic_with_seed(results):
    m, _, ada = results
    again = qtool.quantize(m, feeds(4, 0), QuantConfig(algo="adaround", **W4))
    other = qtool.quantize(m, feeds(4, 0), QuantConfig(algo="adaround", seed=1, **W4))
    a, b, c = (weight_codes(r.model) for r in (ada, again, other))
    assert all(np.array_equal(a[k][0], b[k][0]) for k in a)
    assert any(not np.array_equal(a[k][0], c[k][0]) for k in a)  # the seed is what fixes the result


def test_mix_inputs_takes_fp32_elements_with_the_probability():
    import torch

    from qtool.adaround import mix_inputs

    xq, xf = torch.zeros(64, 16, 8, 8), torch.ones(64, 16, 8, 8)
    gen = torch.Generator().manual_seed(0)
    assert mix_inputs(xq, xf, 0.0, gen) is xq
    frac = [float(mix_inputs(xq, xf, p, gen).mean()) for p in (0.25, 0.5)]
    assert abs(frac[0] - 0.25) < 0.01 and abs(frac[1] - 0.5) < 0.01, frac
    a, b = mix_inputs(xq, xf, 0.5, gen), mix_inputs(xq, xf, 0.5, gen)
    assert not torch.equal(a, b)  # redrawn every call (every step)


def test_qdrop_learns_a_different_rounding_that_still_beats_nearest(results):
    m, plain, ada = results
    q = qtool.quantize(m, feeds(4, 0), QuantConfig(algo="adaround", qdrop=0.5, **W4))
    again = qtool.quantize(m, feeds(4, 0), QuantConfig(algo="adaround", qdrop=0.5, **W4))
    assert q.plan.meta["refine"]["adaround"]["qdrop"] == 0.5
    assert any(line.startswith("adaround: 3/3 layers learned on 128 samples (QDrop 0.5) in") for line in q.lines())
    a, b, c = (weight_codes(r.model) for r in (q, again, ada))
    assert all(np.array_equal(a[k][0], b[k][0]) for k in a)  # deterministic for a seed
    assert any(not np.array_equal(a[k][0], c[k][0]) for k in a)  # the FP32 mix changed what was learned
    x = np.concatenate([f["x"] for f in feeds(4, 99)])
    ref = run(m, x)
    assert sqnr(ref, run(q.model, x)) > sqnr(ref, run(plain.model, x)) + 0.5


def test_time_budget_stops_it(results, one_thread):
    m, plain, _ = results
    r = qtool.quantize(m, feeds(4, 0), QuantConfig(algo="adaround", time_budget_s=1e-6, **W4))
    rep = r.plan.meta["refine"]["adaround"]
    assert rep["layers_skipped_time_budget"] == ["w1", "w2", "w3"] and rep["layers_learned"] == 0
    assert any("time budget over, 3 layers keep nearest rounding" in line for line in r.lines())
    got, want = weight_codes(r.model), weight_codes(plain.model)
    assert all(np.array_equal(got[k][0], want[k][0]) for k in want)


def test_bias_correction_reduces_output_mean_error(one_thread):
    m, calib = convnet(), feeds(4, 0)
    cfg = dict(weight_bits=3, act_bits=8, adaround_samples=128)
    plain = qtool.quantize(m, calib, QuantConfig(**cfg))
    bc = qtool.quantize(m, calib, QuantConfig(bias_correction=True, **cfg))
    rep = bc.plan.meta["refine"]["bias_correction"]
    assert rep["layers_corrected"] == 3
    x = np.concatenate([f["x"] for f in feeds(8, 99)])  # unseen data
    ref = run(m, x)
    err_plain = np.abs(run(plain.model, x).mean(0) - ref.mean(0)).mean()
    err_bc = np.abs(run(bc.model, x).mean(0) - ref.mean(0)).mean()
    assert err_bc < 0.6 * err_plain, (err_bc, err_plain)
    # only the biases moved; composable with adaround (both recorded, the weights learned)
    both = qtool.quantize(m, calib, QuantConfig(algo="adaround", bias_correction=True, adaround_iters=100, **cfg))
    assert set(both.plan.meta["refine"]) >= {"adaround", "bias_correction"}
    err_both = np.abs(run(both.model, x).mean(0) - ref.mean(0)).mean()
    assert err_both < 0.6 * err_plain, (err_both, err_plain)


@pytest.mark.parametrize("kw,msg", [
    (dict(algo="obq"), "algo must be one of none, adaround, brecq, gptq"),
    (dict(adaround_iters=0), "adaround_iters must be an integer >= 1"),
    (dict(adaround_samples=True), "adaround_samples must be an integer >= 1"),
    (dict(time_budget_s=0), "time_budget_s must be a number of seconds > 0"),
    (dict(time_budget_s=float("nan")), "time_budget_s"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(bias_correction="yes"), "bias_correction must be true or false"),
    (dict(algo="adaround", qdrop=1.0), "qdrop must be a probability in [0, 1)"),
    (dict(algo="adaround", qdrop=-0.1), "qdrop must be a probability in [0, 1)"),
    (dict(qdrop=0.5), "qdrop mixes FP32 inputs into the reconstruction of adaround / brecq, got algo='none'"),
])
def test_bad_config(kw, msg):
    with pytest.raises(QtoolError) as ei:
        QuantConfig(**kw)
    assert msg in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("args,msg", [
    (["--adaround-iters", "0"], "adaround_iters must be an integer >= 1"),
    (["--time-budget", "-1"], "time_budget_s must be a number of seconds > 0"),
    (["--algo", "obq"], "Invalid value for '--algo'"),
    (["--algo", "adaround", "--qdrop", "1.5"], "qdrop must be a probability in [0, 1)"),
])
def test_cli_invalid_options_exit_2(tmp_path, capsys, args, msg):
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(convnet(), src)
    np.savez(tmp_path / "calib.npz", x=feeds(1, 0)[0]["x"])
    assert cli_main(["quantize", str(src), "--data", f"npz:{tmp_path / 'calib.npz'}", "-o", str(out), *args]) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_qoperator_format_exports_the_learned_weights(results):
    m, _, ada = results
    qop = qtool.quantize(m, feeds(4, 0), QuantConfig(algo="adaround", format="qoperator", **W4)).model
    assert any(n.op_type == "QLinearConv" for n in qop.graph.node)
    x = np.concatenate([f["x"] for f in feeds(2, 99)])
    ref = run(m, x)
    # the QOperator lowering of the same plan and refined weights: the QDQ model's numbers, not nearest rounding's
    assert sqnr(run(ada.model, x), run(qop, x)) > 40
    assert sqnr(ref, run(qop, x)) > sqnr(ref, run(ada.model, x)) - 0.1
