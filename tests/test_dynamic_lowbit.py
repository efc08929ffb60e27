"""Low-bit (3-5 bit) training of the dynamic trainer on the real ResNet-20 / CIFAR-10 (skipped without them).

Pins issue #8's collapse: the K-way net is the BN-folded graph, and SGD at qtool.qat's lr 0.01 drove the
static 4-bit net (and the dynamic one) to chance within a few steps although it starts near FP32.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qtool.data import load_dataset
from qtool.dynbits import DynamicConfig, DynamicNet
from qtool.dynbits.train import _calibrate, _ort_logits, collapse_note, evaluate, train
from qtool.io import load_model
from qtool.preprocess import resolve_preprocess
from qtool.fusion import fuse, untie_biases
from qtool.bitsearch.space import SearchSpace

RESNET20 = Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "resnet20_cifar10.onnx"
BITS = (3, 4, 5)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_resnet20_4bit_starts_near_fp32_and_training_does_not_collapse(cifar_spec):
    if not RESNET20.exists():
        pytest.skip(f"{RESNET20} is absent (python -m benchmarks.train_resnet20)")
    model = load_model(RESNET20)
    tr, va = load_dataset(cifar_spec, "train"), load_dataset(cifar_spec, "val").subset(np.arange(256))
    pre = resolve_preprocess(model)
    fused = untie_biases(fuse(model)[0])
    fp32 = float((_ort_logits(fused, va, pre, 1).argmax(1) == va.labels).mean())
    space = SearchSpace.from_model(fused, BITS, fix_first=8, fix_last=None)
    torch.manual_seed(0)
    net = DynamicNet(fused, BITS, _calibrate(fused, space, tr, pre, 256))
    net.set_mode("fixed", fixed=net.uniform(4))
    init = evaluate(net, va, pre).acc
    assert fp32 > 0.8 and init >= fp32 - 0.05, (fp32, init)  # measured 84% vs 86% on 500 images
    # 8 SGD steps with the defaults (lr 0.01 went to chance within 3 steps: loss 0.4 -> 3+)
    hist = train(net, tr, pre, DynamicConfig(epochs=1, train_limit=1024, quiet=True), 0.0, "static u4", seed=0)
    after = evaluate(net, va, pre).acc
    assert hist[-1]["train_acc"] > 0.6 and hist[-1]["loss"] < 1.0, hist
    assert after >= init - 0.04, (init, after)
    assert collapse_note("static u4", hist, 10, 1e-3) is None


def test_collapse_note_flags_chance_level_training():
    assert collapse_note("x", [{"loss": 0.4, "train_acc": 0.85}], 10, 1e-3) is None
    note = collapse_note("static matched", [{"loss": 2.36, "train_acc": 0.1}], 10, 0.01)
    assert note and "diverged" in note and "0.01" in note
    assert collapse_note("dynamic", [{"loss": float("nan"), "train_acc": 0.9}], 10, 1e-3)


def test_benchmark_reads_dynamic_against_the_uniform_static_curve():
    from benchmarks.dynamic import _vs_uniform_curve

    rows = [{"name": "matched", "bitflops": 5.0, "acc_ort": 0.9},
            {"name": "uniform3", "bitflops": 4.0, "acc_ort": 0.70},
            {"name": "uniform4", "bitflops": 6.0, "acc_ort": 0.84},
            {"name": "uniform5", "bitflops": 10.0, "acc_ort": 0.86}]
    rep = {"static": rows, "dynamic": {"avg_bitflops": 5.0, "acc_ort": 0.80}}
    assert _vs_uniform_curve(rep) == pytest.approx(3.0)  # 80% vs 77% halfway between u3 and u4
    assert _vs_uniform_curve({**rep, "dynamic": {"avg_bitflops": 12.0, "acc_ort": 0.9}}) is None
    assert _vs_uniform_curve({**rep, "static": rows[:1]}) is None
