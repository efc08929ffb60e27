"""Weight scales that keep onnxruntime's int16-saturating U8S8 kernels exact (QuantConfig.weight_range)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes
from qtool.cli import main as cli_main
from qtool.errors import QtoolError
from qtool.ortkernels import PAIRS, PAIRS_HWC, pair_sums, reachable_pair_sums, saturates
from qtool.ptq import PAIR_CODE_MAX, QuantConfig, kernel_pairs, quantize


def conv_model(seed: int = 0) -> onnx.ModelProto:
    """A 3x3 conv whose weights put large values next to each other along the input channels (the pairs
    a saturating kernel adds in int16), and a few outliers that set the per-channel max."""
    r = np.random.default_rng(seed)
    w = r.normal(size=(16, 8, 3, 3)).astype(np.float32)
    w[:, 0::2] = np.abs(w[:, 0::2]) + 1.5  # even channel next to ...
    w[:, 1::2] = np.abs(w[:, 1::2]) + 1.5  # ... odd channel, both large and of one sign
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 6, 6])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(16, np.float32), "B")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def feeds(n: int = 4, seed: int = 1) -> list[dict]:
    r = np.random.default_rng(seed)
    return [{"x": r.uniform(0, 4, size=(2, 8, 6, 6)).astype(np.float32)} for _ in range(n)]


def codes(q: onnx.ModelProto) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in q.graph.initializer if t.data_type == TensorProto.INT8 and t.dims == [16, 8, 3, 3])


def max_pair(q: onnx.ModelProto) -> int:
    return int(pair_sums(codes(q), PAIRS_HWC).max())


def run(q: onnx.ModelProto, x: np.ndarray, level) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    return ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_pair_safe_codes_keep_every_pair_within_the_int16_bound_and_full_does_not():
    safe, _ = quantize(conv_model(), feeds(), QuantConfig(weight_range="pair-safe"))
    full, _ = quantize(conv_model(), feeds(), QuantConfig(weight_range="full"))
    assert max_pair(safe) <= PAIR_CODE_MAX
    assert max_pair(full) > PAIR_CODE_MAX  # the model is built to break the bound: the check can fail
    assert np.abs(codes(full)).max() == 127 and np.abs(codes(safe)).max() < 127


def test_on_a_saturating_cpu_pair_safe_runs_exactly_what_the_unfused_graph_computes():
    """The fused QLinearConv against the same QDQ graph run with every optimization off (float conv on the
    dequantized values): pair-safe differs by at most a rounding tie, full by many codes where it saturates."""
    if not saturates("QLinearConv"):
        pytest.skip("onnxruntime's QLinearConv sums exactly on this CPU (VNNI): nothing saturates")
    x = feeds(1, seed=5)[0]["x"]
    for wr, exact in (("pair-safe", True), ("full", False)):
        q, plan = quantize(conv_model(), feeds(), QuantConfig(weight_range=wr))
        step = plan.tensors["y"].scale
        fused = run(q, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        plain = run(q, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        steps = np.abs(fused - plain).max() / step
        assert (steps <= 1.01) == exact, (wr, steps)


def test_auto_bounds_pairs_exactly_where_this_cpus_kernel_saturates():
    m = conv_model()
    g = passes.to_ir(m).graph
    w = numpy_helper.to_array(m.graph.initializer[0])
    auto = kernel_pairs(g, "W", w, "auto", signed=False)
    assert (auto is not None) == saturates("QLinearConv")
    assert kernel_pairs(g, "W", w, "full", signed=False) is None
    assert np.allclose(kernel_pairs(g, "W", w, "pair-safe", signed=False), pair_sums(w, PAIRS_HWC))


def test_weight_range_is_validated_in_the_config_and_on_the_cli(tmp_path, capsys):
    with pytest.raises(QtoolError, match="weight_range must be one of auto, full, pair-safe"):
        QuantConfig(weight_range="reduced")
    src = tmp_path / "m.onnx"
    onnx.save(conv_model(), src)
    assert cli_main(["quantize", str(src), "--weight-range", "half", "-o", str(tmp_path / "q.onnx")]) == 2
    assert "--weight-range" in capsys.readouterr().err and not (tmp_path / "q.onnx").exists()


def layernorm_like_matmul() -> tuple[onnx.ModelProto, np.ndarray, list[dict]]:
    """A MatMul on a transformer-like activation: one outlier channel sets the per-tensor range, the
    others stay near the zero point (codes ~112..144), and every K-adjacent pair of weights is large and
    of one sign, so the 255-code pair bound halves the weights' resolution."""
    r = np.random.default_rng(3)
    w = np.abs(r.uniform(0.5, 1.0, size=(16, 8))).astype(np.float32) * np.where(r.random((8, 1, 8)) < 0.5, -1, 1)\
        .repeat(2, axis=1).reshape(16, 8).astype(np.float32)
    w[1] *= 0.05  # the outlier channel's pair partner is small
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    spread = np.full(16, 1.0, np.float32)
    spread[0] = 8.0
    batches = [{"x": (r.uniform(-1, 1, size=(32, 16)) * spread).astype(np.float32)} for _ in range(4)]
    return m, w, batches


def test_reachable_pair_sums_bound_every_code_in_range_and_reduce_to_pair_sums_at_full_range():
    r = np.random.default_rng(0)
    w = r.normal(size=(6, 5)).round(1)
    lo, hi = r.integers(0, 128, 5).astype(float), r.integers(128, 256, 5).astype(float)
    got = reachable_pair_sums(w, PAIRS, lo, hi)
    # brute force over the corners of every pair's code box (the extremes of a linear form)
    wp = np.concatenate([w, np.zeros((6, 1))], 1).reshape(6, 3, 2)
    box = [(lo[i], hi[i]) for i in range(5)] + [(0.0, 0.0)]
    want = np.zeros(6)
    for o in range(6):
        for j in range(3):
            for ua in box[2 * j]:
                for ub in box[2 * j + 1]:
                    want[o] = max(want[o], abs(ua * wp[o, j, 0] + ub * wp[o, j, 1]) / 255)
    assert np.allclose(got, want)
    same_sign = np.abs(r.normal(size=(16, 8, 3, 3)))
    assert np.allclose(reachable_pair_sums(same_sign, PAIRS_HWC, np.zeros(8), np.full(8, 255.0)),
                       pair_sums(same_sign, PAIRS_HWC))


def test_pair_bound_uses_the_calibrated_codes_each_channel_reaches_and_stays_exact():
    """Pair-safe with the codes the activation reaches: the weight scale stays near max |w| / 127 (the
    255-code bound needs twice that), the output is more precise, and the fused kernel still computes
    what the unfused graph does (no saturated pair)."""
    m, w, batches = layernorm_like_matmul()
    q, plan = quantize(m, batches, QuantConfig(weight_range="pair-safe", calib="minmax"))
    full_bound = float(pair_sums(w.T, PAIRS).max()) / 127
    scale = plan.tensors["W"].scale
    assert scale < 0.7 * full_bound  # today's 255-code bound gives full_bound exactly
    assert scale >= float(np.abs(w).max()) / 127
    x = np.concatenate([b["x"] for b in batches])
    ref = x @ w
    fused = run(q, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    plain = run(q, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert np.abs(fused - plain).max() <= 1e-4 * np.abs(plain).max()
    def weight_error(s: float) -> float:  # the output error of the weight's rounding alone
        return float(np.square(x @ (np.rint(w / s).clip(-127, 127) * s) - ref).mean())
    assert weight_error(scale) < 0.5 * weight_error(full_bound)
