"""bench(): report structure, ratios, unavailable EPs, fixed batches and bad arguments.

Timings on these shared machines are noise: only structure and (loose) ratios are asserted.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from rich.console import Console
from rich.table import Table

from qtool.latency import BenchConfig, BenchReport, bench
from qtool.errors import QtoolError

FAST = dict(runs=5, warmup=1, min_time_s=0.0, progress=False)


def _conv_model(batch_dim="N", spatial=(8, 8)) -> onnx.ModelProto:
    """Conv-Relu-GlobalAveragePool-Flatten-Gemm; `batch_dim` a name (dynamic) or an int (fixed)."""
    rng = np.random.default_rng(0)

    def init(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 3, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 4])],
        [init("w1", (8, 3, 3, 3)), init("b1", (8,)), init("wf", (4, 8)), init("bf", (4,))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


class _RandomReader(CalibrationDataReader):
    def __init__(self):
        rng = np.random.default_rng(1)
        self._it = iter([{"x": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(4)])

    def get_next(self):
        return next(self._it, None)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    fp32, int8 = d / "fp32.onnx", d / "int8.onnx"
    onnx.save(_conv_model(), fp32)
    quantize_static(str(fp32), str(int8), _RandomReader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return fp32, int8


def test_report_structure(models):
    fp32, int8 = models
    r = bench([fp32, int8], BenchConfig(eps=("cpu",), batches=(1, 2), threads=1, **FAST))
    assert isinstance(r, BenchReport)
    assert [(row.model, row.ep, row.batch) for row in r.rows] == [
        (str(fp32), "cpu", 1), (str(int8), "cpu", 1), (str(fp32), "cpu", 2), (str(int8), "cpu", 2)]
    for row in r.rows:
        assert row.ok and row.runs >= 5
        assert 0 < row.median_ms <= row.p90_ms <= row.p99_ms
        assert row.throughput == pytest.approx(row.batch * 1e3 / row.median_ms)
        assert row.ratio is not None and row.ratio > 0
        assert row.kernels is not None and row.kernels_note is None
    assert r.row(str(fp32), "cpu", 1).ratio == 1.0  # the first model is the reference
    assert r.row(str(fp32), "cpu", 2).ratio == 1.0
    # the QDQ model runs integer kernels, the float one none: shown next to the timing
    k8, k32 = r.row(str(int8), "cpu", 1).kernels, r.row(str(fp32), "cpu", 1).kernels
    assert (k8.integer_compute, k8.float_fallbacks) == (2, 0)
    assert (k32.integer_compute, k32.float_compute) == (0, 2)
    assert r.settings["threads"] == 1 and r.settings["onnxruntime"] == ort.__version__


def test_model_against_itself(models):
    fp32, _ = models
    r = bench([fp32, fp32], BenchConfig(**FAST))
    a, b = r.rows
    assert a.model != b.model and b.model.endswith("#2")  # same file twice: rows kept apart
    assert a.ratio == 1.0
    assert 0.1 < b.ratio < 10  # loose on purpose: 5 runs on a busy machine only show it is a ratio


def test_outputs(models, tmp_path):
    fp32, int8 = models
    r = bench([fp32, int8], BenchConfig(**FAST))
    out = r.to_json(tmp_path / "bench.json")
    d = json.loads(out.read_text())
    assert len(d["rows"]) == 2 and d["rows"][1]["kernels"]["integer_compute"] == 2
    assert d["settings"]["runs"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temp file left behind
    md = r.markdown().splitlines()
    assert md[0].startswith("| model | EP | batch | median ms")
    assert len([line for line in md if line.startswith("| ")]) == 3  # header + 2 rows
    t = r.table()
    assert isinstance(t, Table) and t.row_count == 2
    Console(file=open(tmp_path / "t.txt", "w"), width=200).print(t)  # renders without error
    with pytest.raises(QtoolError, match="output directory"):
        r.to_json(tmp_path / "missing" / "bench.json")


def test_unavailable_ep_is_reported_not_replaced(models, monkeypatch):
    fp32, int8 = models
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [p for p in real if p != "TensorrtExecutionProvider"])
    r = bench([fp32, int8], BenchConfig(eps=("cpu", "tensorrt"), **FAST))
    trt = [row for row in r.rows if row.ep == "tensorrt"]
    assert len(trt) == 2
    for row in trt:
        assert row.status.startswith("unavailable (") and "TensorrtExecutionProvider" in row.status
        assert row.median_ms is None and row.runs == 0 and row.ratio is None
    assert all(row.ok for row in r.rows if row.ep == "cpu")
    assert "unavailable" in r.markdown()


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_silent_ort_fallback_is_reported(models, monkeypatch):
    # pretend CUDA is in the build: ORT then quietly builds a CPU session, which bench must refuse
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA really is available here")
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    fp32, _ = models
    (row,) = bench([fp32], BenchConfig(eps=("cuda",), **FAST)).rows
    assert row.status.startswith("unavailable (") and row.median_ms is None


def test_fixed_batch_row(models, tmp_path):
    fp32, _ = models
    fixed = tmp_path / "fixed1.onnx"
    onnx.save(_conv_model(batch_dim=1), fixed)
    r = bench([fp32, fixed], BenchConfig(batches=(1, 3), **FAST))
    assert r.row(str(fixed), "cpu", 1).ok
    row = r.row(str(fixed), "cpu", 3)
    assert row.status == "fixed batch 1" and row.median_ms is None
    assert r.row(str(fp32), "cpu", 3).ok and r.row(str(fp32), "cpu", 3).runs >= 5


def test_fixed_batch_first_model_leaves_no_ratio(models, tmp_path):
    fp32, _ = models
    fixed = tmp_path / "fixed1.onnx"
    onnx.save(_conv_model(batch_dim=1), fixed)
    r = bench([fixed, fp32], BenchConfig(batches=(2,), **FAST))
    assert r.rows[0].status == "fixed batch 1"
    assert r.rows[1].ok and r.rows[1].ratio is None  # no reference to compare against


def test_symbolic_spatial_dim(tmp_path):
    path = tmp_path / "sym.onnx"
    m = _conv_model()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    onnx.save(m, path)
    with pytest.raises(QtoolError, match="symbolic dimension 'H' at axis 2"):
        bench([path], BenchConfig(**FAST))


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=("gpu",)), "unknown execution provider 'gpu'"),
    (dict(eps=()), "EP list is empty"),
    (dict(eps=("cpu", "cpu")), "listed twice"),
    (dict(batches=()), "batch list is empty"),
    (dict(batches=(0,)), "bad batch size 0"),
    (dict(batches=(-2,)), "bad batch size -2"),
    (dict(batches="1,2"), "batch must be a list, got the string '1,2'"),
    (dict(batches=(1.5,)), "bad batch size 1.5"),
    (dict(batches=(2, 2)), "listed twice"),
    (dict(runs=0), "runs must be an integer >= 1"),
    (dict(threads=0), "threads must be an integer >= 1"),
    (dict(warmup=-1), "warmup must be an integer >= 0"),
    (dict(min_time_s=-1.0), "min_time_s"),
    (dict(min_time_s=float("nan")), "min_time_s"),
])
def test_bad_arguments(models, kwargs, message):
    fp32, _ = models
    args = {**FAST, **kwargs}
    with pytest.raises(QtoolError, match=message):
        BenchConfig(**args)


def test_bad_model_lists(models, tmp_path):
    fp32, _ = models
    with pytest.raises(QtoolError, match="model file not found"):
        bench([fp32, tmp_path / "nope.onnx"], BenchConfig(**FAST))
    with pytest.raises(QtoolError, match="model list is empty"):
        bench([], BenchConfig(**FAST))
    with pytest.raises(QtoolError, match="list of paths"):
        bench(fp32, BenchConfig(**FAST))  # type: ignore[arg-type]
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(QtoolError):
        bench([junk], BenchConfig(**FAST))


def test_one_row_per_ep_and_batch(models):
    fp32, _ = models
    r = bench([fp32], BenchConfig(eps=("cpu",), batches=(1, 2), **FAST))
    assert [(row.ep, row.batch) for row in r.rows] == [("cpu", 1), ("cpu", 2)]
