"""How much a deployed controller's routing earns, and how much routing could earn (onnxruntime only).

    corr = correctness(session, x, labels)        # configurations x images, bool: every image through every model
    r = routing_analysis(corr, session.bitflops, routed)

Given each codebook configuration's correctness on every image and the controller's choice per image:
- `deployed`: accuracy and average BitFLOPs of the controller's routing;
- `shuffled`: the same choices permuted across the images (same BitFLOPs spent, blind to the image),
  mean and spread over `shuffles` permutations: deployed - shuffled is what reading the image earns;
- `oracle`: the best any router could do with these configurations at the deployed average BitFLOPs
  (each image at the cheapest configuration, then the cheapest upgrades to a configuration that gets it
  right while the average budget allows; optimal: every image is worth 1, so the cheapest go first);
- `best_single`: the most accurate single configuration of the codebook within that budget (no routing);
- per configuration: share of images routed to it, and those images' accuracy under it and under the
  most expensive configuration (a controller that sends hard images to high bits leaves the easy ones,
  accurate under any configuration, at low bits).
"""
from __future__ import annotations

import numpy as np

from qtool.errors import QtoolError


def correctness(session, x: np.ndarray, labels: np.ndarray, batch: int = 256) -> np.ndarray:
    """C x N bool: image i classified right by configuration c (`qtool.dynbits.DynamicSession`'s models)."""
    rows = []
    for c in range(len(session.sessions)):
        preds = np.concatenate([session.run_routed(x[i:i + batch], np.full(len(x[i:i + batch]), c)).argmax(1)
                                for i in range(0, len(x), batch)])
        rows.append(preds == labels)
    return np.stack(rows)


def oracle_accuracy(corr: np.ndarray, cost: np.ndarray, budget: float) -> tuple[float, float]:
    """Best accuracy of any per-image choice with mean cost <= budget, and the mean cost it spends."""
    n = corr.shape[1]
    cheap = int(np.argmin(cost))
    if cost[cheap] > budget:
        raise QtoolError(f"no configuration fits the budget {budget:.4g} (cheapest {cost[cheap]:.4g})")
    right = corr[cheap].copy()
    spent = cost[cheap] * n
    order = np.argsort(cost, kind="stable")
    upgrade = np.full(n, np.inf)
    for k in order[::-1]:  # cheapest configuration that gets each image right wins
        upgrade[corr[k]] = cost[k] - cost[cheap]
    todo = np.flatnonzero(~right & np.isfinite(upgrade))
    for i in todo[np.argsort(upgrade[todo], kind="stable")]:
        if spent + upgrade[i] > budget * n * (1 + 1e-12):
            break
        spent += upgrade[i]
        right[i] = True
    return float(right.mean()), float(spent / n)


def routing_analysis(corr: np.ndarray, cost: np.ndarray, routed: np.ndarray, shuffles: int = 20,
                     seed: int = 0) -> dict:
    corr, cost, routed = np.asarray(corr, bool), np.asarray(cost, np.float64), np.asarray(routed, np.int64)
    if corr.ndim != 2 or len(cost) != corr.shape[0] or routed.shape != (corr.shape[1],):
        raise QtoolError("routing_analysis needs C x N correctness, C costs and N routed configurations")
    n = corr.shape[1]
    cols = np.arange(n)
    dep_acc = float(corr[routed, cols].mean())
    budget = float(cost[routed].mean())
    rng = np.random.default_rng(seed)
    shuf = np.array([corr[rng.permutation(routed), cols].mean() for _ in range(shuffles)])
    oracle, oracle_cost = oracle_accuracy(corr, cost, budget)
    fits = [k for k in range(len(cost)) if cost[k] <= budget]
    best = max(fits, key=lambda k: corr[k].mean()) if fits else None
    top = int(np.argmax(cost))
    per = []
    for k in range(len(cost)):
        idx = routed == k
        per.append({"config": k, "bitflops": float(cost[k]), "share": float(idx.mean()),
                    "acc_all_images": float(corr[k].mean()),
                    "acc_routed_images": float(corr[k, idx].mean()) if idx.any() else None,
                    "acc_routed_images_at_most_expensive": float(corr[top, idx].mean()) if idx.any() else None})
    return {"images": n, "deployed": {"acc": dep_acc, "avg_bitflops": budget},
            "shuffled": {"acc_mean": float(shuf.mean()), "acc_std": float(shuf.std()), "shuffles": shuffles},
            "routing_gain_pp": (dep_acc - float(shuf.mean())) * 100,
            "oracle": {"acc": oracle, "avg_bitflops": oracle_cost},
            "best_single": None if best is None else {"config": int(best), "acc": float(corr[best].mean()),
                                                      "bitflops": float(cost[best])},
            "per_config": per}
