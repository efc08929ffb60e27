"""qtool.ortkernels: the probe of onnxruntime's integer kernels, and the pairs that can saturate."""
from __future__ import annotations

import numpy as np
import pytest

from qtool.errors import QtoolError
from qtool.ortkernels import (EXACT, INT16_MAX, PAIRS, PAIRS_CHW, PAIRS_HWC, UNKNOWN, accumulation,
                              measured, saturable_pairs)


def test_every_kernel_sums_in_a_way_qtool_models():
    """On this CPU each kernel is exact or sums int16 pairs in an order qtool emulates: UNKNOWN here means
    ORT changed its kernels (or runs on a CPU not measured) and the emulations need a look."""
    found = measured()
    assert UNKNOWN not in found.values(), found
    assert found["QLinearConv"] in (EXACT, PAIRS_HWC) and found["QGemm"] in (EXACT, PAIRS)
    assert found["ConvInteger"] in (EXACT, PAIRS_HWC, PAIRS_CHW) and found["MatMulInteger"] in (EXACT, PAIRS)
    assert found["QLinearConv depthwise"] == EXACT
    hits = accumulation.cache_info().hits
    accumulation("QGemm")
    assert accumulation.cache_info().hits == hits + 1  # probed once per process


def test_probe_refuses_what_it_cannot_measure():
    with pytest.raises(QtoolError, match="unknown kernel"):
        accumulation("QLinearMatMul")
    with pytest.raises(QtoolError, match="uint8 activations only"):
        accumulation("ConvInteger", True)


@pytest.mark.parametrize("order,group", [(PAIRS_HWC, 1), (PAIRS_HWC, 2), (PAIRS_CHW, 1), (PAIRS_CHW, 2)])
def test_saturable_pairs_are_the_pairs_of_the_k_order(order, group):
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (6, 3, 3, 3))  # K = 27 per group: odd
    out, ra, rb, wa, wb = saturable_pairs(w, group, order, 255)
    cg, og, kk = w.shape[1], w.shape[0] // group, 9
    want = set()
    for o in range(w.shape[0]):
        ks = [(kh, kw, c) for kh in range(3) for kw in range(3) for c in range(cg)] if order == PAIRS_HWC else \
             [(kh, kw, c) for c in range(cg) for kh in range(3) for kw in range(3)]
        rows = [((o // og) * cg + c) * kk + kh * 3 + kw for kh, kw, c in ks]
        ws = [int(w[o, c, kh, kw]) for kh, kw, c in ks]
        rows, ws = rows + [rows[-1]], ws + [0]
        for j in range(0, len(ws), 2):
            if (abs(ws[j]) + abs(ws[j + 1])) * 255 > INT16_MAX:
                want.add((o, rows[j], rows[j + 1], ws[j], ws[j + 1]))
    got = set(zip(*(a.tolist() for a in (out, ra, rb, wa, wb))))
    assert got == want and 0 < len(got) < 6 * 14  # typically a fraction of the pairs
