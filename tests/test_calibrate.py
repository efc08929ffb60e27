"""Streaming calibration statistics and the four range methods."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from qtool.calibrate import TensorStats, collect_stats
from qtool.errors import QtoolError

RNG = np.random.default_rng(1)


def test_histogram_grows_by_exact_merges():
    data = [RNG.normal(size=1000) * s for s in (0.1, 1.0, 7.0)]
    st = TensorStats(bins=64)
    for d in data:
        st.update(d)
    allx = np.concatenate(data)
    assert st.hist.size == 64 and st.hist.sum() == allx.size  # bounded memory, nothing lost
    assert (st.min, st.max) == (np.float32(allx.min()), np.float32(allx.max()))
    # merged histogram == histogram of all data on the final grid, up to values on merged bin edges
    ref, _ = np.histogram(allx.astype(np.float32), bins=64, range=(-st.R, st.R))
    assert np.abs(ref - st.hist).sum() <= 4


def test_range_methods_clip_outliers():
    x = np.concatenate([RNG.uniform(0, 1, 200_000), [50.0]]).astype(np.float32)  # Relu-like + one outlier
    st = TensorStats()
    for chunk in np.array_split(x, 7):
        st.update(chunk)
    lo, hi = st.range("minmax", signed=False)
    assert 0 <= lo < 1e-4 and hi == 50.0
    lo, hi = st.range("percentile", signed=False, percentile=99.9)
    assert lo >= 0 and 0.95 < hi < 1.1
    # entropy/mse resolve the bulk only as finely as the (doubled) histogram allows: a 3x outlier here
    st = TensorStats()
    for chunk in np.array_split(np.concatenate([x[:-1], [3.0]]), 7):
        st.update(chunk)
    lo, hi = st.range("entropy", signed=False)
    assert lo >= 0 and 0.8 < hi < 1.6, hi
    # mse weighs the outlier's squared clipping error against 200k rounding errors: clips, but less
    lo, hi = st.range("mse", signed=False)
    assert lo >= 0 and 1.0 < hi < 3.0, hi
    lo, hi = st.range("percentile", signed=True, percentile=99.9)
    assert 0.95 < hi < 1.1
    with pytest.raises(QtoolError, match="unknown calibration method"):
        st.range("magic", signed=False)


def _model():
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_collect_stats_streams_batches_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    batches = ({"x": RNG.normal(size=(3, 4)).astype(np.float32)} for _ in range(5))  # a generator is fine
    st = collect_stats(_model(), batches, ["x", "r", "y"])
    assert st["r"].min == 0 and st["y"].max == 0 and st["x"].count == st["r"].count == 60
    assert list(tmp_path.iterdir()) == []


def test_collect_stats_bad_input():
    with pytest.raises(QtoolError, match="no calibration batches"):
        collect_stats(_model(), [], ["r"])
    with pytest.raises(QtoolError, match="lacks model inputs"):
        collect_stats(_model(), [{"z": np.zeros((1, 4), np.float32)}], ["r"])
    with pytest.raises(QtoolError, match="must be dicts"):
        collect_stats(_model(), [np.zeros((1, 4), np.float32)], ["r"])


@pytest.mark.parametrize("value", [1e-45, -3e-39, 0.0])
def test_subnormal_constant_tensor_gets_a_finite_positive_scale(value):
    """Found by hypothesis: a subnormal-range histogram made np.histogram fail."""
    from qtool.ptq import QuantConfig, activation_quant

    for method in ("minmax", "percentile", "entropy", "mse"):
        s = TensorStats(64)
        s.update(np.full(5, value, np.float32))
        lo, hi = s.range(method, signed=False)
        tq = activation_quant(lo, hi, QuantConfig())
        assert np.isfinite(tq.scale) and tq.scale > 0
