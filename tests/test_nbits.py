"""Weight-only 4-bit MatMulNBits (quantize --activations none): packing bit-exact against a numpy
dequantization reference on onnxruntime, RTN / GPTQ numbers, which nodes are rewritten, exit-2 cases."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes
import qtool
from passes.nbits import BlockWeight, MatMulNBitsPass
from qtool.blockquant import gptq, rtn
from qtool.cli import main
from qtool.errors import QtoolError


def _model(nodes, inits, k, n_out, opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n_out])],
                          [numpy_helper.from_array(v, k_) for k_, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _run(m, x):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _sqnr(ref, q):
    return 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref.astype(np.float64) - q) ** 2))


def _rewrite(m, weights):
    ir_m = passes.to_ir(m)
    assert MatMulNBitsPass(weights).call(ir_m).modified
    return passes.to_proto(ir_m)


@pytest.mark.parametrize("symmetric", [True, False])
def test_packing_matches_numpy_dequant_reference(symmetric):
    """Random codes / scales / zero points, K not a multiple of the block size: onnxruntime's MatMulNBits
    computes x @ BlockWeight.dequantize() (float32 rounding only); nibbles swapped, it does not."""
    rng = np.random.default_rng(0)
    k, n, bs = 80, 24, 32  # 3 blocks, the last one padded; an odd number of zero points per row
    nb = 3
    bw = BlockWeight(rng.integers(0, 16, (n, k)).astype(np.uint8), rng.uniform(0.01, 0.1, (n, nb)).astype(np.float32),
                     None if symmetric else rng.integers(0, 16, (n, nb)).astype(np.uint8), 4, bs)
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], {"W": np.zeros((k, n), np.float32)}, k, n)
    q = _rewrite(m, {"W": bw})
    assert [nd.op_type for nd in q.graph.node] == ["MatMulNBits"]
    assert len(q.graph.node[0].input) == (3 if symmetric else 4)
    assert not any(i.name == "W" for i in q.graph.initializer)
    x = rng.standard_normal((5, k)).astype(np.float32)
    ref = x.astype(np.float64) @ bw.dequantize().astype(np.float64)
    y = _run(q, x)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    flip = bw.codes.reshape(n, -1, 2)[:, :, ::-1].reshape(n, k)  # what the other nibble order would decode
    wrong = x.astype(np.float64) @ BlockWeight(np.ascontiguousarray(flip), bw.scales, bw.zero_points, 4, bs).dequantize()
    assert np.abs(y - wrong).max() > 100 * np.abs(y - ref).max()


def test_rtn_block_scales_beat_max_scaling_and_keep_zero_exact():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 16)).astype(np.float32) * np.linspace(0.1, 3, 16, dtype=np.float32)
    w[:, 3] = 0.0  # an all-zero column: codes at the zero point, dequantized exactly 0
    for symmetric in (True, False):
        bw = rtn(w, 4, 32, symmetric)
        deq = bw.dequantize()
        assert deq.shape == w.shape and np.all(deq[:, 3] == 0)
        err = np.sum((deq - w) ** 2)
        # plain max scaling of each block, the MSE search's starting point
        blocks = w.T.reshape(16, 2, 32)
        s = np.abs(blocks).max(-1, keepdims=True) / 7
        s[s == 0] = 1
        naive = np.sum((np.clip(np.round(blocks / s), -8, 7) * s - blocks) ** 2)
        assert err < naive
        assert _sqnr(w, deq) > 15  # 4-bit blocks of 32 on Gaussian weights: about 20 dB


def _correlated_case(seed=0, k=128, n=32):
    """Inputs with strongly correlated features (a low-rank mix plus noise): where GPTQ's error feedback
    pays off against plain rounding."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((8, k)).astype(np.float32)

    def x(rows):
        return (rng.standard_normal((rows, 8)).astype(np.float32) @ mix
                + 0.1 * rng.standard_normal((rows, k)).astype(np.float32))
    w = rng.standard_normal((k, n)).astype(np.float32)
    return w, x


def test_gptq_beats_rtn_on_correlated_inputs():
    w, x = _correlated_case()
    cal, test = x(512), x(256)
    h = cal.astype(np.float64).T @ cal / len(cal)
    ref = test @ w
    s_rtn = _sqnr(ref, test @ rtn(w).dequantize())
    s_gptq = _sqnr(ref, test @ gptq(w, h).dequantize())
    assert s_gptq > s_rtn + 3, (s_rtn, s_gptq)
    # identity Hessian (uncorrelated inputs): nothing to feed back; GPTQ rounds like RTN would
    assert np.array_equal(gptq(w, np.eye(len(w)), damp=0.0).codes, rtn(w).codes)


def test_quantize_api_gemm_matmul_and_float_leftovers():
    """MatMul and Gemm(transB, bias) become MatMulNBits (+ Add); a Gemm with alpha != 1 stays float.
    GPTQ on held-out data better than RTN, both sensible against FP32."""
    rng = np.random.default_rng(2)
    w, x = _correlated_case(seed=3, k=128, n=64)
    w2 = rng.standard_normal((32, 64)).astype(np.float32)  # Gemm transB: [N, K]
    c = rng.standard_normal(32).astype(np.float32)
    w3 = rng.standard_normal((32, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Gemm", ["h", "W2", "C"], ["g"], transB=1),
             helper.make_node("Gemm", ["g", "W3"], ["y"], alpha=0.5)]
    m = _model(nodes, {"W": w, "W2": w2, "C": c, "W3": w3}, 128, 8)
    cal = [{"x": x(128)} for _ in range(4)]
    test = x(256)
    ref = _run(m, test)
    r = qtool.quantize(m, None, qtool.QuantConfig(activations="none"))
    ops = [nd.op_type for nd in r.model.graph.node]
    assert ops.count("MatMulNBits") == 2 and "Add" in ops and ops.count("Gemm") == 1
    assert r.plan.meta["weight_only"]["W2"] == {"K": 64, "N": 32, "bits": 4, "block_size": 32, "symmetric": False}
    assert "W3" not in r.plan.meta["weight_only"]
    g = qtool.quantize(m, cal, qtool.QuantConfig(activations="none", algo="gptq"))
    s_rtn, s_gptq = _sqnr(ref, _run(r.model, test)), _sqnr(ref, _run(g.model, test))
    assert 10 < s_rtn < s_gptq, (s_rtn, s_gptq)
    assert g.report.outputs["y"].sqnr_db > 10  # the API's own FP32 comparison on the calibration feeds
    za = qtool.quantize(m, None, qtool.QuantConfig(activations="none", weight_symmetric=True, block_size=64))
    nb = [nd for nd in za.model.graph.node if nd.op_type == "MatMulNBits"]
    assert all(len(nd.input) == 3 for nd in nb)  # symmetric: no zero points, the op's default 8
    assert {a.name: a.i for a in nb[0].attribute}["block_size"] == 64
    assert _sqnr(ref, _run(za.model, test)) > 10


@pytest.mark.parametrize("kw, expect", [
    (dict(activations="none", weight_bits=8), "4 bits"),
    (dict(activations="none", block_size=48), "block_size"),
    (dict(activations="none", algo="adaround"), "adaround"),
    (dict(activations="none", format="qoperator"), "format"),
    (dict(algo="gptq"), "weight-only"),
    (dict(activations="dynamic", algo="gptq"), "weight-only"),
])
def test_config_refuses_bad_combinations(kw, expect):
    with pytest.raises(QtoolError, match=expect):
        qtool.QuantConfig(**kw)
    assert qtool.QuantConfig(activations="none").weight_bits == 4
    assert qtool.QuantConfig().weight_bits == 8


def test_gptq_without_data_is_an_error():
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], {"W": np.ones((32, 4), np.float32)}, 32, 4)
    with pytest.raises(QtoolError, match="calibration data"):
        qtool.quantize(m, None, qtool.QuantConfig(activations="none", algo="gptq"))


@pytest.mark.parametrize("args, expect", [
    (["--activations", "none", "--bits", "w8a8"], "weights only"),
    (["--bits", "w4"], "--activations none"),
    (["--activations", "dynamic", "--block-size", "64"], "go with --activations none"),
    (["--activations", "none", "--algo", "gptq"], "give --data"),
    (["--algo", "gptq"], "weight-only"),
])
def test_cli_bad_combinations_exit_2(args, expect, tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnx.save(_model([helper.make_node("MatMul", ["x", "W"], ["y"])], {"W": np.ones((32, 4), np.float32)}, 32, 4), src)
    rc = main(["quantize", str(src), "-o", str(tmp_path / "o.onnx"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "o.onnx").exists()


def test_cli_writes_matmulnbits(tmp_path, capsys):
    rng = np.random.default_rng(4)
    src = tmp_path / "in.onnx"
    onnx.save(_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                     {"W": rng.standard_normal((64, 8)).astype(np.float32)}, 64, 8), src)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((64, 64)).astype(np.float32))
    out = tmp_path / "o.onnx"
    assert main(["quantize", str(src), "--activations", "none", "--algo", "gptq", "--data", f"npz:{tmp_path}/d.npz",
                 "--block-size", "16", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GPTQ" in text and "1 MatMulNBits" in text and "SQNR" in text
    q = onnx.load(out)
    assert [nd.op_type for nd in q.graph.node] == ["MatMulNBits"]
    assert {a.name: a.i for a in q.graph.node[0].attribute}["block_size"] == 16
