"""integer_kernel_report on tiny models: ORT's own QDQ output, a half-quantized Conv, float, QOperator."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from qtool.errors import QtoolError
from qtool.ortgraph import integer_kernel_report


def _float_model() -> onnx.ModelProto:
    """Conv-Relu-Conv-GlobalAveragePool-Flatten-Gemm, dynamic batch."""
    rng = np.random.default_rng(0)

    def init(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [init("w1", (8, 3, 3, 3)), init("b1", (8,)), init("w2", (8, 8, 3, 3)), init("b2", (8,)),
         init("wf", (4, 8)), init("bf", (4,))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


class _RandomReader(CalibrationDataReader):
    def __init__(self, n: int = 4):
        rng = np.random.default_rng(1)
        self._it = iter([{"x": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(n)])

    def get_next(self):
        return next(self._it, None)


def _ort_quantized(tmp_path, fmt: QuantFormat) -> onnx.ModelProto:
    src, dst = tmp_path / "float.onnx", tmp_path / f"q_{fmt.name}.onnx"
    onnx.save(_float_model(), src)
    quantize_static(str(src), str(dst), _RandomReader(), quant_format=fmt, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(dst)


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory) -> onnx.ModelProto:
    return _ort_quantized(tmp_path_factory.mktemp("qdq"), QuantFormat.QDQ)


def _input_only_qdq() -> onnx.ModelProto:
    """Q/DQ on the Conv's input and weight but none on its output: ORT cannot form QLinearConv."""
    w = np.random.default_rng(2).integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dqx"),
        helper.make_node("DequantizeLinear", ["wq", "sw"], ["wd"], name="dqw"),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu0"),
    ]
    graph = helper.make_graph(
        nodes, "half_qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(np.array(0.01, np.float32), "sx"),
         numpy_helper.from_array(np.array(128, np.uint8), "zx"),
         numpy_helper.from_array(w, "wq"), numpy_helper.from_array(np.array(0.02, np.float32), "sw")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("optimization", ["all", "extended"])
def test_ort_qdq_model_runs_all_integer(qdq_model, optimization, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the optimized graph must go to a temp dir, never the cwd
    r = integer_kernel_report(qdq_model, optimization=optimization)
    assert list(tmp_path.iterdir()) == []
    assert r.qdq_compute_in_input == 3
    assert (r.integer_compute, r.float_compute, r.float_fallbacks) == (3, 0, 0)
    assert r.compute_nodes == 3 and r.fallback_nodes == ()
    assert r.integer_ops == {"QGemm": 1, "QLinearConv": 2}
    assert r.other_qlinear == {"QLinearGlobalAveragePool": 1}
    # input quantize + output dequantize survive at the graph boundary
    assert (r.quantize_linear, r.dequantize_linear) == (1, 1)
    assert r.op_histogram["com.microsoft:QGemm"] == 1
    assert r.providers == ("CPUExecutionProvider",) and r.optimization == optimization


def test_input_only_qdq_is_a_float_fallback():
    r = integer_kernel_report(_input_only_qdq())
    assert r.qdq_compute_in_input == 1
    assert (r.integer_compute, r.float_compute, r.float_fallbacks) == (0, 1, 1)
    assert len(r.fallback_nodes) == 1 and "Conv" in r.fallback_nodes[0]  # FusedConv after Conv+Relu fusion
    assert r.dequantize_linear == 2  # x and w are dequantized at run time


def test_float_model_with_layout_transform(tmp_path):
    path = tmp_path / "float.onnx"
    onnx.save(_float_model(), path)
    r = integer_kernel_report(path)  # a path goes through qtool.io.load_model
    assert (r.integer_compute, r.float_compute, r.float_fallbacks, r.qdq_compute_in_input) == (0, 3, 0, 0)
    assert r.quantize_linear == r.dequantize_linear == 0
    # ENABLE_ALL on x86 turns the Convs into NCHWc contrib ops: still counted as float compute
    if any(k.startswith("com.microsoft.nchwc:") for k in r.op_histogram):
        assert r.op_histogram.get("com.microsoft.nchwc:Conv", 0) == 2


def test_qoperator_model(tmp_path):
    r = integer_kernel_report(_ort_quantized(tmp_path, QuantFormat.QOperator))
    assert r.integer_compute >= 2 and r.float_fallbacks == 0 and r.qdq_compute_in_input == 0
    assert r.integer_ops.get("QLinearConv") == 2


def test_to_dict_is_json(qdq_model):
    d = integer_kernel_report(qdq_model).to_dict()
    back = json.loads(json.dumps(d))
    assert back["integer_compute"] == 3 and back["compute_nodes"] == 3
    assert back["providers"] == ["CPUExecutionProvider"]


def test_report_is_frozen(qdq_model):
    r = integer_kernel_report(qdq_model)
    with pytest.raises(AttributeError):
        r.float_fallbacks = 5  # type: ignore[misc]


def test_missing_file(tmp_path):
    with pytest.raises(QtoolError, match="not found"):
        integer_kernel_report(tmp_path / "nope.onnx")


def test_unavailable_provider_is_an_error_not_a_cpu_fallback():
    missing = next(p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider", "FooExecutionProvider")
                   if p not in ort.get_available_providers())
    with pytest.raises(QtoolError, match="not available"):
        integer_kernel_report(_input_only_qdq(), providers=(missing,))


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_silent_ort_fallback_is_detected(monkeypatch):
    # pretend CUDA is in the build: ORT then creates a CPU session instead, which must be refused
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA really is available here")
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    with pytest.raises(QtoolError, match="fell back|cannot build"):
        integer_kernel_report(_input_only_qdq(), providers=("CUDAExecutionProvider",))


def test_bad_arguments():
    with pytest.raises(QtoolError, match="optimization level"):
        integer_kernel_report(_input_only_qdq(), optimization="max")
    with pytest.raises(QtoolError, match="ModelProto or a path"):
        integer_kernel_report(b"\x08\x01")  # type: ignore[arg-type]
    with pytest.raises(QtoolError, match="no execution provider"):
        integer_kernel_report(_input_only_qdq(), providers=())
