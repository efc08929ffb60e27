"""The per-tensor error report (`quantize --report`) and the collapse check: a quantized model whose
outputs carry no signal against FP32 is exit 2 naming the worst tensor, never a silent exit 0."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qtool
from qtool.cli import main

RNG = np.random.default_rng(0)


def cancelling_model() -> onnx.ModelProto:
    """y = x W1 - x W2 with W1 = W2 + 1e-3 noise: each product quantizes well, their tiny difference does not."""
    w0 = RNG.normal(0, 1, (10, 64)).astype(np.float32)
    nodes = [h.make_node("Gemm", ["x", "w1", "b"], ["a"], transB=1, name="fc1"),
             h.make_node("Gemm", ["x", "w2", "b"], ["c"], transB=1, name="fc2"), h.make_node("Sub", ["a", "c"], ["y"], name="diff")]
    inits = [nh.from_array(w0 + 1e-3 * RNG.normal(0, 1, w0.shape).astype(np.float32), "w1"), nh.from_array(w0, "w2"),
             nh.from_array(np.zeros(10, np.float32), "b")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [None, 64])],
                     [h.make_tensor_value_info("y", T.FLOAT, [None, 10])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def mlp() -> onnx.ModelProto:
    nodes = [h.make_node("Gemm", ["x", "w1", "b1"], ["a"], transB=1, name="fc1"), h.make_node("Relu", ["a"], ["r"], name="act"),
             h.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1, name="fc2")]
    inits = [nh.from_array(RNG.normal(0, .3, (32, 64)).astype(np.float32), "w1"), nh.from_array(np.zeros(32, np.float32), "b1"),
             nh.from_array(RNG.normal(0, .3, (10, 32)).astype(np.float32), "w2"), nh.from_array(np.zeros(10, np.float32), "b2")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [None, 64])],
                     [h.make_tensor_value_info("y", T.FLOAT, [None, 10])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def npz(tmp_path) -> str:
    np.savez(tmp_path / "d.npz", x=RNG.normal(0, 1, (64, 64)).astype(np.float32))
    return f"npz:{tmp_path / 'd.npz'}"


def test_the_report_lists_every_quantized_activation_worst_first(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(mlp(), src)
    assert main(["quantize", str(src), "--data", npz(tmp_path), "--bits", "w8a4", "-o", str(tmp_path / "q.onnx"),
                 "--report", str(tmp_path / "r.json")]) == 0
    assert "quantization error per tensor, worst first" in capsys.readouterr().out
    rep = json.loads((tmp_path / "r.json").read_text())
    plan_acts = {t for t, q in qtool.quantize(src, npz(tmp_path), qtool.QuantConfig(act_bits=4)).plan.tensors.items()
                 if q.kind == "activation"}
    assert {t["tensor"] for t in rep["tensors"]} == plan_acts and rep["samples"] == 64
    sqnrs = [t["sqnr_db"] for t in rep["tensors"]]
    assert sqnrs == sorted(sqnrs) and all(np.isfinite(sqnrs))
    assert 0 < rep["outputs"]["y"]["sqnr_db"] < 40  # 4-bit activations: a real, finite error


def test_without_report_the_collapse_check_runs_on_the_first_calibration_batches_only(tmp_path):
    from qtool.api import CHECK_SAMPLES

    r = qtool.quantize(mlp(), npz(tmp_path), qtool.QuantConfig(calib_size=64))
    assert r.report.samples == CHECK_SAMPLES < 64 and not r.report.tensors
    with_rows = qtool.quantize(mlp(), npz(tmp_path), qtool.QuantConfig(calib_size=64, per_tensor_report=True))
    assert with_rows.report.samples == 64 and with_rows.report.tensors


def test_lower_bits_have_lower_sqnr():
    m8 = qtool.quantize(mlp(), [{"x": RNG.normal(0, 1, (64, 64)).astype(np.float32)}], qtool.QuantConfig())
    m4 = qtool.quantize(mlp(), [{"x": RNG.normal(0, 1, (64, 64)).astype(np.float32)}], qtool.QuantConfig(act_bits=4))
    assert m4.report.outputs["y"].sqnr_db < m8.report.outputs["y"].sqnr_db - 6


def test_a_collapsed_model_is_exit_2_naming_the_worst_tensor(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(cancelling_model(), src)
    argv = ["quantize", str(src), "--data", npz(tmp_path), "-o", str(tmp_path / "q.onnx")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output 'y' collapsed against FP32" in err[0] and "worst tensor:" in err[0], err
    assert not (tmp_path / "q.onnx").exists()
    assert main(argv + ["--allow-collapse"]) == 0  # an explicit choice writes it anyway
    assert (tmp_path / "q.onnx").exists()
