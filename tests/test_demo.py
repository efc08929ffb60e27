"""`qtool demo` runs end to end and reports every model's accuracy, size and latency.

Latency itself is not asserted: tests share noisy machines; the demo's speed belongs to benchmarks.
"""
import math

import pytest

from qtool.demo import FILES, TIMED, cpu_int8_isa, run_demo, speed_words


@pytest.mark.slow
def test_demo_runs_and_reports_every_field(tmp_path, one_thread):
    r = run_demo(tmp_path / "demo", epochs=1, qat_epochs=1, bench_runs=3, bench_min_time_s=0, quiet=True)
    assert r["model"] == "digitnet" and r["data"] == "digits" and r["batches"] == [1, 64]
    assert isinstance(r["cpu_int8_isa"], str) and r["cpu_int8_isa"]
    assert 0.0 <= r["intsim_agreement"] <= 1.0
    assert r["wall_s"] > 0
    for k in FILES:
        row = r[k]
        assert set(row) == {"acc", "test_acc", "bytes", "median_ms_b1", "median_ms_b64", "ratio_b1", "ratio_b64"}
        assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["test_acc"] <= 1.0
        assert row["bytes"] == (tmp_path / "demo" / f"digitnet.{k}.onnx").stat().st_size
        for b in (1, 64):
            if k in TIMED:  # measured in this run, so only positive and finite
                assert math.isfinite(row[f"median_ms_b{b}"]) and row[f"median_ms_b{b}"] > 0
                assert math.isfinite(row[f"ratio_b{b}"]) and row[f"ratio_b{b}"] > 0
            else:
                assert row[f"median_ms_b{b}"] is None and row[f"ratio_b{b}"] is None
    assert r["fp32"]["ratio_b1"] == r["fp32"]["ratio_b64"] == 1.0  # the ratios are relative to FP32
    assert r["int8"]["bytes"] < r["fp32"]["bytes"] / 3  # int8 weights
    assert r["fp32"]["acc"] > 0.5  # one epoch already learns the digits


@pytest.mark.parametrize("ratio, words", [(0.5, "2.0x faster"), (1.0, "about as fast"), (1.04, "about as fast"),
                                          (2.5, "2.5x slower"), (None, "not measured"), (0.0, "not measured")])
def test_speed_words(ratio, words):
    assert speed_words(ratio) == words


def test_cpu_int8_isa_is_a_label():
    assert isinstance(cpu_int8_isa(), str) and cpu_int8_isa()
