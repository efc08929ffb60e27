"""Bit-width search benchmark: NSGA-III + supernet on ResNet-20 / CIFAR-10 vs uniform W8A8 / W4A4 and
vs random search.

    python -m benchmarks.search            # ResNet-20 (benchmarks/models/resnet20_cifar10.onnx), shared CIFAR split
    python -m benchmarks.search --quick    # tiny: a few images, 2 generations (LeNet-5 on digits if the
                                           # ResNet-20 model or the CIFAR data is absent)

What it measures (QuantEA's setting: 18 searched layers x {W, A} x {2, 4, 8}, first and last at 8):
1. supernet search on (acc, BitOps): wall time (supernet training + search), the front;
2. random search with the same number of evaluations, same supernet: hypervolume of both fronts
   (pymoo.indicators.hv; error and BitOps / BitOps(W8A8), reference point (1, 1.1));
3. the same QAT fine-tune budget (`--finetune-steps`) for uniform W8A8, uniform W4A4 and, per
   baseline, the front member with the best supernet score among those with fewer BitOps: does it
   strictly dominate the baseline on (acc, BitOps) after fine-tuning? Kendall tau of supernet vs
   fine-tuned accuracy over those candidates.
Writes benchmarks/results/search[_quick].json (benchmarks.common.write_result).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import MODELS, RESULTS, cifar_spec, write_result


def _front(F: np.ndarray) -> np.ndarray:
    from qtool.search import non_dominated

    return F[non_dominated(F)]


def hypervolume(F: np.ndarray, ref=(1.0, 1.1)) -> float:
    from pymoo.indicators.hv import HV

    F = F[np.all(F <= np.asarray(ref), axis=1)]
    return float(HV(ref_point=np.asarray(ref))(F)) if len(F) else 0.0


def _tiny_lenet(workdir: Path) -> Path:
    from qtool.train import TrainConfig, train

    out = workdir / "lenet5_digits.onnx"
    if not out.exists():
        train(TrainConfig(model="lenet5", data="digits", epochs=3, batch_size=64, lr=0.05, threads=1), out, quiet=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.search", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=str(MODELS / "resnet20_cifar10.onnx"))
    ap.add_argument("--workdir", default=None, help="default: benchmarks/results/search-work[-quick]")
    ap.add_argument("--resume", action="store_true", help="continue a killed run in --workdir")
    ap.add_argument("--pop", type=int, default=None)
    ap.add_argument("--gens", type=int, default=None)
    ap.add_argument("--supernet-epochs", type=float, default=None)
    ap.add_argument("--finetune-steps", type=int, default=None, help="QAT steps (batch 128) per fine-tuned candidate")
    ap.add_argument("--val-limit", type=int, default=None, help="images scored per candidate during the search")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    import torch

    from qtool.io import load_model
    from qtool.search import (Candidate, LocalExecutor, NSGA3Config, QATEvaluator, SearchProblem, SupernetEvaluator,
                              search)
    from qtool.search.objectives import metric

    torch.set_num_threads(1)
    q = a.quick
    pop = a.pop or (4 if q else 16)
    gens = a.gens or (2 if q else 20)
    epochs = a.supernet_epochs or (0.5 if q else 3.0)
    ft_steps = a.finetune_steps if a.finetune_steps is not None else (5 if q else 352)  # full: 1 epoch of 45k
    val_limit = a.val_limit or (256 if q else 1000)
    train_limit = 512 if q else None
    wd = Path(a.workdir) if a.workdir else RESULTS / ("search-work-quick" if q else "search-work")
    wd.mkdir(parents=True, exist_ok=True)
    spec = cifar_spec()
    model_path = Path(a.model)
    setup = "resnet20-cifar10"
    if not model_path.exists() or spec is None:
        if not q:
            print(f"need {model_path} and the shared CIFAR-10 data (QTOOL_CIFAR); --quick falls back to LeNet-5/digits",
                  file=sys.stderr)
            return 2
        model_path, spec, setup = _tiny_lenet(wd), "digits", "lenet5-digits (fallback: no ResNet-20 / CIFAR here)"
    model = load_model(model_path)

    t0 = time.perf_counter()
    problem = SearchProblem.from_model(model, spec, objectives="acc,bitops", bits=(2, 4, 8), train_limit=train_limit,
                                       val_limit=val_limit)
    sp = problem.space
    ev = SupernetEvaluator(epochs=epochs, batch_size=128, lr=0.01)
    ex = LocalExecutor(a.workers)
    res = search(problem, NSGA3Config(pop=pop, gens=gens, seed=a.seed), evaluator=ev, executor=ex,
                 workdir=wd / "nsga3", resume=a.resume, export_front=False)
    search_wall = time.perf_counter() - t0
    log = [json.loads(line) for line in (wd / "nsga3" / "evaluations.jsonl").read_text().splitlines() if line.strip()]
    search_keys = {r["key"] for r in log if r["origin"] == "search"}
    n_evals = len(search_keys)
    w8_bitops = next(b for b in res.baselines if b["name"] == "w8a8")["objectives"]["bitops"]

    def F_of(recs):
        return np.array([[1 - r["acc"], r["bitops"] / w8_bitops] for r in recs], dtype=float).reshape(-1, 2)

    # Random search: the same number of evaluations, the same trained supernet.
    t1 = time.perf_counter()
    rand = sp.random(n_evals, seed=a.seed + 1000)
    rand_recs = []
    ex1 = LocalExecutor(a.workers)
    try:
        for c, acc in ex1.run(ev, list(dict.fromkeys(rand))):
            rand_recs.append({"key": c.key, "acc": acc, "bitops": metric("bitops").compute(c, problem.metrics, acc)})
    finally:
        ex1.close()
    random_wall = time.perf_counter() - t1
    nsga_F = F_of([{"acc": m["acc"], "bitops": m["objectives"]["bitops"]} for m in res.front])
    rand_F = _front(F_of(rand_recs))
    hv_nsga, hv_rand = hypervolume(nsga_F), hypervolume(rand_F)

    # The same fine-tune budget for baselines and the front members that undercut them.
    t2 = time.perf_counter()
    qat = QATEvaluator(steps=ft_steps, batch_size=128, lr=0.01)
    qat.prepare(problem.fused, sp, problem.data, seed=a.seed)
    fine: dict[str, dict] = {}

    def finetune(key: str, supernet_acc: float, bitops: float, role: str) -> dict:
        if key not in fine:
            fine[key] = {"key": key, "role": role, "supernet_acc": supernet_acc, "bitops": bitops,
                         "finetuned_acc": qat.evaluate(Candidate.from_key(key))}
        return fine[key]

    comparisons = []
    for name in ("w8a8", "w4a4"):
        b = next(x for x in res.baselines if x["name"] == name)
        fb = finetune(b["key"], b["acc"], b["objectives"]["bitops"], f"uniform {name}")
        cheaper = [m for m in res.front if m["objectives"]["bitops"] < b["objectives"]["bitops"]]
        if not cheaper:
            comparisons.append({"baseline": name, "member": None, "dominates": False,
                                "note": "no front member with fewer BitOps"})
            continue
        m = max(cheaper, key=lambda m: m["acc"])
        fm = finetune(m["key"], m["acc"], m["objectives"]["bitops"], f"front member vs {name}")
        comparisons.append({"baseline": name, "baseline_acc": fb["finetuned_acc"], "baseline_bitops": fb["bitops"],
                            "member": m["key"], "member_acc": fm["finetuned_acc"], "member_bitops": fm["bitops"],
                            "dominates": fm["finetuned_acc"] > fb["finetuned_acc"] and fm["bitops"] < fb["bitops"]})
    finetune_wall = time.perf_counter() - t2
    tau = None
    if len(fine) >= 3:
        from scipy.stats import kendalltau

        v = list(fine.values())
        tau = float(kendalltau([x["supernet_acc"] for x in v], [x["finetuned_acc"] for x in v]).statistic)

    payload = {
        "setup": setup, "quick": q, "model": str(model_path), "data": spec,
        "space": {"layers": len(sp.layers), "searched": len(sp.searched), "bits": list(sp.choices)},
        "settings": {"pop": pop, "gens": gens, "supernet_epochs": epochs, "finetune_steps": ft_steps,
                     "val_images": int(len(problem.data.val_labels)), "train_images": int(len(problem.data.train_labels)),
                     "workers": a.workers, "seed": a.seed},
        "search": {"wall_s": search_wall, "supernet_train_s": res.supernet_train_s, "evaluations": n_evals,
                   "front": [{"key": m["key"], "acc": m["acc"], "bitops": m["objectives"]["bitops"]} for m in res.front],
                   "baselines": res.baselines},
        "random_search": {"wall_s": random_wall, "evaluations": len(rand_recs),
                          "front": [{"acc": 1 - f[0], "bitops": f[1] * w8_bitops} for f in rand_F]},
        "hypervolume": {"nsga3": hv_nsga, "random": hv_rand, "ref_point": [1.0, 1.1],
                        "axes": "top-1 error, BitOps / BitOps(uniform W8A8)"},
        "finetune": {"wall_s": finetune_wall, "candidates": list(fine.values()), "comparisons": comparisons,
                     "kendall_tau_supernet_vs_finetuned": tau},
    }
    out = write_result("search_quick" if q else "search", payload)
    print(f"{setup}: {n_evals} NSGA-III evaluations in {search_wall:.0f} s (supernet {res.supernet_train_s or 0:.0f} s); "
          f"HV nsga3 {hv_nsga:.4f} vs random {hv_rand:.4f}")
    for c in comparisons:
        print(f"  vs uniform {c['baseline']}: " + (f"{c['member']} top-1 {c['member_acc']:.4f} vs {c['baseline_acc']:.4f}, "
                                                    f"BitOps {c['member_bitops']:.3g} vs {c['baseline_bitops']:.3g}: "
                                                    f"{'dominates' if c['dominates'] else 'does not dominate'}"
                                                    if c["member"] else c["note"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
