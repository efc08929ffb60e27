"""Block reconstruction (algo="brecq", qtool.brecq) with learned activation scales (tune_activations).

A small residual CNN built in code, W4A4 in qtool's layout (uint4 activation codes in uint8 containers);
claims measured against the layer-wise AdaRound on the same plan and on onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qtool
from qtool.cli import main as cli_main
from qtool.ptq import QuantConfig
from test_adaround import feeds, run  # the same 3x8x8 feeds and onnxruntime run

RNG = np.random.default_rng(3)


def resnet() -> onnx.ModelProto:
    """stem Conv-Relu, one residual block (Conv-Relu-Conv + identity, Add, Relu), GAP, Gemm; 3x8x8 inputs."""
    def w(*shape, gain=1.0):
        return (RNG.normal(size=shape) * gain * np.sqrt(2.0 / int(np.prod(shape[1:])))).astype(np.float32)

    def b(n):
        return (RNG.normal(size=n) * 0.1).astype(np.float32)

    inits = [numpy_helper.from_array(v, k) for k, v in (
        ("w0", w(8, 3, 3, 3)), ("b0", b(8)), ("w1", w(8, 8, 3, 3)), ("b1", b(8)),
        ("w2", w(8, 8, 3, 3, gain=0.7)), ("b2", b(8)), ("w3", w(5, 8)), ("b3", np.zeros(5, np.float32)))]
    pads = dict(pads=[1, 1, 1, 1])
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", **pads),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", **pads),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", **pads),
             helper.make_node("Add", ["c2", "r0"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "resnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.metadata_props.add(key="qtool.preprocess", value='{"mean": [0.0], "std": [1.0]}')
    return m


W4A4 = dict(weight_bits=4, act_bits=4, adaround_iters=200, adaround_samples=64)


@pytest.fixture(scope="module")
def results(one_thread):
    m, calib = resnet(), feeds(3, 0)
    plain = qtool.quantize(m, calib, QuantConfig(**W4A4))
    ada = qtool.quantize(m, calib, QuantConfig(algo="adaround", **W4A4))
    blk = qtool.quantize(m, calib, QuantConfig(algo="brecq", **W4A4))
    tuned = qtool.quantize(m, calib, QuantConfig(algo="brecq", tune_activations=True, **W4A4))
    return m, calib, plain, ada, blk, tuned


def test_blocks_come_from_the_graph(results):
    from qtool.brecq import blocks, quant_points_groups
    from qtool.layerwise import quantized_lift

    m, _, plain, *_ = results
    lq = quantized_lift(plain.fused, plain.plan)
    b0, b1 = blocks(lq, plain.plan, groups=quant_points_groups(lq, plain.plan, plain.fused))
    # stem + residual block up to the Add's Relu; then GAP-Flatten-Gemm
    assert [la.w for la in b0.layers] == ["w0", "w1", "w2"] and b0.inputs == ("x",) and b0.outputs == ("r2",)
    assert b0.graph_inputs == ("x",) and set(b0.act_roots) == {"x", "r0", "r1", "c2", "r2"}
    assert [la.w for la in b1.layers] == ["w3"] and b1.inputs == ("r2",) and b1.outputs == ("y",)
    assert set(b1.act_roots) == {"p", "y"}  # f (Flatten) shares p's parameters


def test_block_reconstruction_beats_layerwise_adaround(results):
    from qtool.brecq import block_errors

    m, calib, plain, ada, blk, tuned = results
    err = {k: block_errors(m, r.fused, r.plan, calib, 64) for k, r in
           (("plain", plain), ("adaround", ada), ("brecq", blk), ("tuned", tuned))}
    # the residual block's output, in the whole quantized model, on the samples
    assert err["brecq"][0] < err["adaround"][0] < err["plain"][0], err
    # learned scales: on this random tiny net the block error ties with learned rounding alone (within 0.4 %
    # on three CPUs, either side: other float kernels, another trajectory), and beats the calibrated start.
    # The gain is measured on the trained ResNet-20 instead (benchmarks/results/lowbit.json, W4A4: brecq
    # --tune-activations 83.42 % vs adaround 82.92 %).
    assert err["tuned"][0] < err["plain"][0] and err["tuned"][0] <= err["brecq"][0] * 1.01, err
    rep = tuned.plan.meta["refine"]["brecq"]
    assert rep["blocks_learned"] == 2 and rep["tune_activations"] and not rep["blocks_skipped_time_budget"]
    assert any(line.startswith("brecq: 2/2 blocks learned (rounding + activation scales)") for line in tuned.lines())
    unseen = {k: block_errors(m, r.fused, r.plan, feeds(4, 99), 64)[0] for k, r in
              (("plain", plain), ("adaround", ada), ("brecq", blk), ("tuned", tuned))}
    # learned rounding generalizes past plain PTQ; between its variants this net's unseen block error is a tie
    assert max(unseen["adaround"], unseen["brecq"], unseen["tuned"]) < 0.95 * unseen["plain"], unseen


def qdq_params(model: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    """activation tensor -> (scale, zero point) of its QuantizeLinear."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]])) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def test_learned_scales_land_in_the_plan_and_the_export(results):
    m, _, plain, _, blk, tuned = results
    acts = [k for k, tq in plain.plan.tensors.items() if tq.kind == "activation"]
    moved = [k for k in acts if tuned.plan.tensors[k].scale != plain.plan.tensors[k].scale]
    assert len(moved) >= len(acts) // 2, moved  # most scales learned
    assert all(blk.plan.tensors[k] == plain.plan.tensors[k] for k in acts)  # without tune_activations: unchanged
    for k in acts:  # only the step moves: zero point and the 4-bit layout stay
        a, b = tuned.plan.tensors[k], plain.plan.tensors[k]
        assert (a.zero_point, a.bits, a.signed, a.qrange) == (b.zero_point, b.bits, b.signed, (0, 15))
        assert 0.3 < a.scale / b.scale < 3
    assert tuned.plan.tensors["f"].scale == tuned.plan.tensors["p"].scale  # tied entries share the learned scale
    exported = qdq_params(tuned.model)
    for k in moved:
        if k in exported:
            tq = tuned.plan.tensors[k]
            assert exported[k] == (np.float32(tq.scale), tq.zero_point), k
    assert sum(k in exported for k in moved) >= 3


def test_exported_model_equals_the_fake_quant_on_onnxruntime(results):
    from qtool.layerwise import quantized_lift, weight_layers
    from qtool.ortexact import install_exact_eval
    from qtool.qat_quantizers import BiasFakeQuant

    m, _, _, _, _, tuned = results
    lifted = quantized_lift(tuned.fused, tuned.plan)
    for la in weight_layers(lifted, tuned.plan):  # int32 biases (s_x s_w), as exported
        lifted.set_quantizer(la.b, BiasFakeQuant(lifted.quantizer(la.x), lifted.quantizer(la.w)))
    # the integer kernels onnxruntime runs for the QDQ groups, on the learned scales
    assert set(install_exact_eval(lifted, tuned.plan.tensors.get, lambda mod: None)) == {"c0", "c1", "c2", "s", "p", "y"}
    x = np.concatenate([f["x"] for f in feeds(2, 5)])
    with torch.no_grad():
        fq = lifted(x=torch.from_numpy(x)).numpy()
    got = run(tuned.model, x)
    assert np.array_equal(fq, got)  # every logit code the same


def test_deterministic_with_seed(results):
    m, calib, _, _, _, tuned = results
    again = qtool.quantize(m, calib, QuantConfig(algo="brecq", tune_activations=True, **W4A4))
    other = qtool.quantize(m, calib, QuantConfig(algo="brecq", tune_activations=True, seed=1, **W4A4))
    assert again.plan.tensors == tuned.plan.tensors
    w = {t.name: numpy_helper.to_array(t) for t in tuned.fused.graph.initializer}
    assert all(np.array_equal(numpy_helper.to_array(t), w[t.name]) for t in again.fused.graph.initializer)
    assert other.plan.tensors != tuned.plan.tensors  # the seed is what fixes the result


def test_qdrop_mixes_fp32_block_inputs(results):
    from qtool.brecq import block_errors

    m, calib, plain, _, blk, _ = results
    q = qtool.quantize(m, calib, QuantConfig(algo="brecq", qdrop=0.5, **W4A4))
    assert q.plan.meta["refine"]["brecq"]["qdrop"] == 0.5
    assert any("samples (QDrop 0.5) in" in line for line in q.lines())
    w = {t.name: numpy_helper.to_array(t) for t in blk.fused.graph.initializer}
    assert any(not np.array_equal(numpy_helper.to_array(t), w[t.name]) for t in q.fused.graph.initializer)
    unseen = {k: block_errors(m, r.fused, r.plan, feeds(4, 99), 64)[0] for k, r in (("plain", plain), ("qdrop", q))}
    assert unseen["qdrop"] < 0.95 * unseen["plain"], unseen


def test_time_budget_keeps_the_calibrated_plan(results):
    m, calib, plain, *_ = results
    r = qtool.quantize(m, calib, QuantConfig(algo="brecq", tune_activations=True, time_budget_s=1e-6, **W4A4))
    rep = r.plan.meta["refine"]["brecq"]
    assert rep["blocks_learned"] == 0 and rep["blocks_skipped_time_budget"] == [["w0", "w1", "w2"], ["w3"]]
    assert all(r.plan.tensors[k] == tq for k, tq in plain.plan.tensors.items())
    assert any("time budget over, 2 blocks keep" in line for line in r.lines())


@pytest.mark.parametrize("args,msg", [
    (["--tune-activations"], "tune_activations learns activation scales in the block reconstruction"),
    (["--algo", "adaround", "--tune-activations"], "it needs algo='brecq', got algo='adaround'"),
    (["--algo", "brecq", "--activations", "none", "--bits", "w4"], "brecq refines static quantization"),
    (["--algo", "brecq", "--activations", "dynamic"], "activations='dynamic' has no calibration to refine"),
])
def test_bad_option_combinations_exit_2(tmp_path, args, msg, capsys):
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(resnet(), src)
    np.savez(tmp_path / "calib.npz", x=feeds(1, 0)[0]["x"])
    assert cli_main(["quantize", str(src), "--data", f"npz:{tmp_path / 'calib.npz'}", "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
