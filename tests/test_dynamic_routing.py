"""Routing analysis of a dynamic deployment: the oracle, shuffled routing and the budget, hand-checked."""
from __future__ import annotations

import numpy as np
import pytest

from qtool.dynbits.routing import oracle_accuracy, routing_analysis
from qtool.errors import QtoolError

T, F = True, False
# configurations x images; costs 1, 2, 4
CORR = np.array([[T, F, F, F, T, F],
                 [T, T, F, F, F, F],
                 [T, T, T, F, F, T]])
COST = np.array([1.0, 2.0, 4.0])


def test_oracle_takes_the_cheapest_upgrades_within_the_budget():
    # image 1 needs +1 (config 1), images 2 and 5 need +3 (config 2), image 3 is wrong everywhere:
    # at a mean budget of 11/6 only images 1 and 2 fit (6 + 1 + 3 = 10 <= 11, + 3 = 13 > 11)
    acc, spent = oracle_accuracy(CORR, COST, 11 / 6)
    assert acc == pytest.approx(4 / 6) and spent == pytest.approx(10 / 6)
    assert oracle_accuracy(CORR, COST, 4.0)[0] == pytest.approx(5 / 6)  # everything fixable is fixed
    assert oracle_accuracy(CORR, COST, 1.0) == (pytest.approx(2 / 6), pytest.approx(1.0))
    with pytest.raises(QtoolError, match="budget"):
        oracle_accuracy(CORR, COST, 0.5)


def test_routing_analysis_numbers():
    routed = np.array([0, 1, 2, 0, 1, 0])  # mean cost 11/6
    r = routing_analysis(CORR, COST, routed)
    assert r["deployed"] == {"acc": pytest.approx(3 / 6), "avg_bitflops": pytest.approx(11 / 6)}
    assert r["oracle"]["acc"] == pytest.approx(4 / 6)
    assert r["best_single"] == {"config": 0, "acc": pytest.approx(2 / 6), "bitflops": 1.0}
    per = r["per_config"]
    assert [p["share"] for p in per] == pytest.approx([3 / 6, 2 / 6, 1 / 6])
    assert per[0]["acc_routed_images"] == pytest.approx(1 / 3)  # images 0, 3, 5 at config 0
    assert per[0]["acc_routed_images_at_most_expensive"] == pytest.approx(2 / 3)  # 0 and 5 right at config 2
    # one configuration for every image: shuffling cannot change anything
    same = routing_analysis(CORR, COST, np.ones(6, dtype=np.int64))
    assert same["shuffled"]["acc_mean"] == pytest.approx(same["deployed"]["acc"]) and same["shuffled"]["acc_std"] < 1e-12
    assert same["routing_gain_pp"] == pytest.approx(0, abs=1e-9)
    with pytest.raises(QtoolError, match="correctness"):
        routing_analysis(CORR, COST[:2], routed)
