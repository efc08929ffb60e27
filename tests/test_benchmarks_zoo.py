"""benchmarks.zoo end to end on a tiny hand-built model: the CLI steps run, the rows hold real numbers,
and a failing onnxruntime quantizer is recorded and shown as such."""
import copy
import math
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks import report, zoo


def tiny_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b")
    fw = numpy_helper.from_array(rng.standard_normal((5, 8)).astype(np.float32) * 0.5, "fw")
    fb = numpy_helper.from_array(np.zeros(5, np.float32), "fb")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])], [w, b, fw, fb])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_zoo_runs_a_tiny_model_and_records_an_ort_failure(tmp_path, monkeypatch):
    real = zoo.ort_cmd

    def ort_cmd(mode, src, dst, calib, pre):  # onnxruntime's pre-processing "fails"; the tool alone runs for real
        if pre:
            return [sys.executable, "-c", "import sys; sys.exit('RuntimeError: quant_pre_process: boom')"]
        return real(mode, src, dst, calib, pre)

    monkeypatch.setattr(zoo, "ort_cmd", ort_cmd)
    monkeypatch.setattr(zoo, "IN_PROCESS", True)  # the same CLI code, without an interpreter start-up per step
    rng = np.random.default_rng(1)
    cal = {"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)}
    test = {"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32)}
    r = zoo.run_model("tiny", tiny_model(), cal, test, tmp_path / "tiny", runs=3)

    for s in ("fuse", "quantize", "eval", "ort_nopre", "bench"):
        assert r["steps"][s]["rc"] == 0, (s, r["steps"][s])
    assert r["steps"]["ort"]["rc"] == 1 and "boom" in r["steps"]["ort"]["error"]
    assert r["ort_reference"] == "ort_nopre"
    q, o = r["variants"]["qtool"], r["variants"]["ort_nopre"]
    assert q["coverage"]["integer"] == q["coverage"]["compute"] == 2  # the Conv and the Gemm
    assert 0 < o["coverage"]["integer"] <= o["coverage"]["compute"]
    for v in (q, o):
        db = v["sqnr"]["min_sqnr_db"]
        assert math.isfinite(db) and 10 < db < 80  # quantized: close to FP32, but not equal to it
        assert v["sqnr"]["samples"] == 8  # the held-out feeds, not the calibration ones
    for v in ("fp32", "qtool", "ort_nopre"):
        assert r["variants"][v]["latency_ms"] > 0
    t = r["targets"]
    assert t["pipeline_exit_0"] is True
    assert t["latency_qtool_over_ort"] == q["latency_ms"] / o["latency_ms"]
    assert all(isinstance(t[k], bool) for k in ("coverage", "sqnr", "latency_ratio", "quantize_time_ratio"))

    # both onnxruntime runs failed: no target is judged, and the table says so
    both = copy.deepcopy(r)
    del both["variants"]["ort_nopre"]
    both["steps"]["ort_nopre"] = {"rc": 1, "seconds": 1.0, "error": "boom again"}
    both["ort_reference"] = None
    both["targets"] = zoo.targets(both)
    assert both["targets"]["coverage"] is None and both["targets"]["latency_ratio"] is None
    d = {"machine": {}, "models": {"tiny": {"desc": "", "kind": "cnn", **r}, "tiny_ort_failed": {"kind": "cnn", **both}},
         "settings": {"quick": True, "threads": 2, "runs": 3, "calibration_samples": 16, "test_samples": 8,
                      "wall_s": 1.0}}
    d["summary"] = zoo.summary(d["models"])
    md = report.zoo_table(d)
    assert "ORT failed" in md and "failed: boom again" in md and "failed: RuntimeError: quant_pre_process: boom" in md
    assert d["summary"]["targets_compared"]["coverage"] == 1
