"""Bit-width search benchmark: NSGA-III + supernet on ResNet-20 / CIFAR-10 vs uniform W8A8 / W4A4 and
vs random search.

    python -m benchmarks.search --workers 2   # ResNet-20 (benchmarks/models/resnet20_cifar10.onnx), shared CIFAR
                                              # split, 2 cores
    python -m benchmarks.search --quick       # tiny: a few images, 2 generations (LeNet-5 on digits if the
                                              # ResNet-20 model or the CIFAR data is absent)
    python -m benchmarks.search --stage search ...            # CPU: supernet + NSGA-III + random search
    python -m benchmarks.search --stage finetune --device cuda  # the fine-tune comparison from that stage's
                                              # WORKDIR/search_stage.json, e.g. on a borrowed GPU

`--sandwich-low 4` trains the supernet's small end all-4-bit instead of all-2-bit (2 bits still train in the
random draws): the all-2-bit end made 2-bit weights look nearly free (docs/FINDINGS.md, "Search").

NSGA-III's initial population holds the 9 uniform (w, a) configurations (W8A8, W8A4, ..., W2A2), the rest
random (`--random-init`: random only, which left every front member with a 2-bit layer in an earlier run).

Defaults (pop 20 x 20 generations, supernet 1.5 epochs = 527 sandwich steps of batch 128, 1000 validation
images per candidate) are sized for 2 cores: measured on one core of this 2-core machine, a sandwich step
costs 2.1-2.9 s (3 forward/backward passes) and scoring a candidate 3.2 s, so supernet training takes
18-25 min and the <= 400 NSGA-III evaluations 11-21 min (2 / 1 worker): about 30-46 min in all, the
issue's budget being 60. Random search costs as much as the NSGA-III evaluations again, the fine-tunes
(2 baselines + 2 x `--compare-top` members, 352 steps each) about 15-20 min with 2 workers.

What it measures (QuantEA's setting: 18 searched layers x {W, A} x {2, 4, 8}, first and last at 8):
1. supernet search on (acc, BitOps): wall time (supernet training + search), the front. The supernet
   trains on one thread with the sandwich rule (`qtool.bitsearch.evaluators`); `--workers` processes
   score the candidates;
2. random search with the same number of evaluations, same supernet: hypervolume of both fronts
   (pymoo.indicators.hv; error and BitOps / BitOps(W8A8), reference point (1, 1.1));
3. the same QAT fine-tune budget (`--finetune-steps` x batch 128 from the FP32 weights or, with
   `--finetune-init supernet`, from the supernet's; `--finetune-lr`; mean of `--finetune-seeds` runs;
   `--finetune-distill W`: every fine-tune also learns from the FP32 model's soft labels)
   for uniform W8A8, uniform W4A4 and, per baseline, the `--compare-top` front members with fewer
   BitOps that the supernet scores highest (those it scores at least as high as the baseline first):
   does one strictly dominate the baseline on (acc, BitOps) after fine-tuning, i.e. higher accuracy
   AND fewer BitOps? Fine-tuned accuracy is measured on the whole validation split (5000 images, not
   only the `--val-limit` the search scored). Kendall tau of supernet vs fine-tuned accuracy over
   those candidates, and the supernet's own ranking of uniform W8A8 / W4A4 / W2A2.
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
from qtool.bitsearch.evaluators import QATEvaluator


class PerImageQAT(QATEvaluator):
    """The fine-tune evaluator, answering each validation image's correctness instead of the accuracy
    (for the paired comparison of a member with its baseline)."""

    def evaluate(self, c) -> np.ndarray:
        return self.correct(c)


def _front(F: np.ndarray) -> np.ndarray:
    from qtool.bitsearch import non_dominated

    return F[non_dominated(F)]


def hypervolume(F: np.ndarray, ref=(1.0, 1.1)) -> float:
    from pymoo.indicators.hv import HV

    F = F[np.all(F <= np.asarray(ref), axis=1)]
    return float(HV(ref_point=np.asarray(ref))(F)) if len(F) else 0.0


def _tiny_lenet(workdir: Path) -> Path:
    from qtool.training import TrainConfig, train

    out = workdir / "lenet5_digits.onnx"
    if not out.exists():
        train(TrainConfig(model="lenet5", data="digits", epochs=3, batch_size=64, lr=0.05, threads=1), out, quiet=True)
    return out


def pick_members(front: list[dict], baseline: dict, k: int) -> list[dict]:
    """The front members to fine-tune against `baseline`: fewer BitOps, highest supernet accuracy;
    those the supernet scores at least as high as the baseline (it predicts they dominate) first."""
    cheaper = [m for m in front if m["objectives"]["bitops"] < baseline["objectives"]["bitops"]]
    cheaper.sort(key=lambda m: (m["acc"] < baseline["acc"], -m["acc"], m["objectives"]["bitops"]))
    return cheaper[:max(0, k)]


def _search_stage(a, problem, wd: Path, pop: int, gens: int, epochs: float) -> dict:
    """Supernet + NSGA-III (timed: the issue's 60-minute budget), then random search with as many
    evaluations on the same supernet, and both fronts' hypervolumes."""
    from qtool.bitsearch import LocalExecutor, NSGA3Config, SupernetEvaluator, search
    from qtool.bitsearch.objectives import metric

    sp = problem.space
    t0 = time.perf_counter()
    ev = SupernetEvaluator(epochs=epochs, batch_size=128, lr=a.supernet_lr, sandwich=not a.no_sandwich,
                           sandwich_low=a.sandwich_low, distill=a.distill)
    res = search(problem, NSGA3Config(pop=pop, gens=gens, seed=a.seed, seed_uniform=not a.random_init), evaluator=ev,
                 executor=LocalExecutor(a.workers), workdir=wd / "nsga3", resume=a.resume, export_front=False)
    search_wall = time.perf_counter() - t0
    log = [json.loads(line) for line in (wd / "nsga3" / "evaluations.jsonl").read_text().splitlines() if line.strip()]
    n_evals = len({r["key"] for r in log if r["origin"] == "search"})
    base = {b["name"]: b for b in res.baselines}
    w8_bitops = base["w8a8"]["objectives"]["bitops"]

    def F_of(recs):
        return np.array([[1 - r["acc"], r["bitops"] / w8_bitops] for r in recs], dtype=float).reshape(-1, 2)

    t1 = time.perf_counter()
    rand_recs = []
    ex1 = LocalExecutor(a.workers)
    try:
        for c, acc in ex1.run(ev, list(dict.fromkeys(sp.random(n_evals, seed=a.seed + 1000)))):
            rand_recs.append({"key": c.key, "acc": acc, "bitops": metric("bitops").compute(c, problem.metrics, acc)})
    finally:
        ex1.close()
    random_wall = time.perf_counter() - t1
    nsga_F = F_of([{"acc": m["acc"], "bitops": m["objectives"]["bitops"]} for m in res.front])
    rand_F = _front(F_of(rand_recs))
    uniform = {n: base[n]["acc"] for n in ("w8a8", "w4a4", "w2a2") if n in base}
    return {
        "settings": {"pop": pop, "gens": gens, "supernet": ev.settings(), "supernet_steps": ev.n_steps(),
                     "initial_population": "random" if a.random_init else "uniform (w, a) pairs + random",
                     "val_images": int(len(problem.data.val)), "train_images": int(len(problem.data.train)),
                     "workers": a.workers, "seed": a.seed},
        "search": {"wall_s": search_wall, "supernet_train_s": res.supernet_train_s, "evaluations": n_evals,
                   "front": [{"key": m["key"], "acc": m["acc"], "bitops": m["objectives"]["bitops"]} for m in res.front],
                   "baselines": res.baselines, "supernet_uniform_acc": uniform,
                   "supernet_ranks_uniform_correctly": list(uniform.values()) == sorted(uniform.values(), reverse=True)},
        "random_search": {"wall_s": random_wall, "evaluations": len(rand_recs),
                          "front": [{"acc": 1 - f[0], "bitops": f[1] * w8_bitops} for f in rand_F]},
        "hypervolume": {"nsga3": hypervolume(nsga_F), "random": hypervolume(rand_F), "ref_point": [1.0, 1.1],
                        "axes": "top-1 error, BitOps / BitOps(uniform W8A8)"},
    }


def paired_difference(member: np.ndarray, baseline: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """member - baseline accuracy from per-image correctness ([seeds, images], the same images and seeds):
    the mean difference and a 95% bootstrap interval over the validation images (paired: each resample
    draws images, with both models' answers on them), so it says how much of a gap the image sample alone
    could make. Seed-to-seed spread is not in it: the per-seed accuracies show that."""
    d = (member.astype(np.float64) - baseline.astype(np.float64)).mean(axis=0)  # per image, over seeds
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"diff_pp": float(d.mean() * 100), "ci95_pp": [float(lo * 100), float(hi * 100)]}


def _finetune_stage(a, problem, spec: str, train_limit, ft_steps: int, stage: dict, wd: Path) -> dict:
    """The same QAT fine-tune (from the FP32 weights or the supernet's) for uniform W8A8 / W4A4, the front
    members picked against each and the `--also` references; does a member strictly dominate its baseline
    on (acc, BitOps)?"""
    from qtool.bitsearch import Candidate, LocalExecutor, SearchData
    from qtool.bitsearch.objectives import metric

    t2 = time.perf_counter()
    front = [{"key": m["key"], "acc": m["acc"], "objectives": {"bitops": m["bitops"]}} for m in stage["search"]["front"]]
    base = {b["name"]: b for b in stage["search"]["baselines"]}
    ft_data = problem.data if a.quick else SearchData.load(problem.fused, spec, train_limit=train_limit)
    init = wd / "nsga3" / "supernet.pt" if a.finetune_init == "supernet" else None
    picks = {name: pick_members(front, base[name], a.compare_top) for name in ("w8a8", "w4a4")}
    roles: dict[str, dict] = {}
    for name in ("w8a8", "w4a4"):
        b = base[name]
        roles.setdefault(b["key"], {"key": b["key"], "role": f"uniform {name}", "supernet_acc": b["acc"],
                                    "bitops": b["objectives"]["bitops"]})
        for m in picks[name]:
            roles.setdefault(m["key"], {"key": m["key"], "role": f"front member vs {name}", "supernet_acc": m["acc"],
                                        "bitops": m["objectives"]["bitops"]})
    log_file = wd / "nsga3" / "evaluations.jsonl"
    logged = {r["key"]: r["acc"] for r in map(json.loads, log_file.read_text().splitlines() if log_file.exists() else [])}
    pairs = {u.key.split("-")[problem.space.searched[0]]: u for u in problem.space.uniform_pairs()}  # "w4a8": ...
    for pair in [p.strip().lower() for p in a.also.split(",") if p.strip()]:  # reference points, not compared
        if pair not in pairs:
            raise SystemExit(f"--also: {pair!r} is not a uniform wXaY configuration of the space")
        c = pairs[pair]
        roles.setdefault(c.key, {"key": c.key, "role": f"uniform {pair} (reference)",
                                 "supernet_acc": logged.get(c.key),
                                 "bitops": metric("bitops").compute(c, problem.metrics, 0.0)})
    # Each candidate is fine-tuned with seeds seed .. seed + finetune_seeds - 1 (data order, augmentation);
    # the comparison uses the mean: one fine-tune moves by 0.1-0.3 pp between seeds on ResNet-20.
    correct: dict[str, dict[int, np.ndarray]] = {}  # key -> seed -> per-image correctness
    for k in range(a.finetune_seeds):
        qat = PerImageQAT(steps=ft_steps, batch_size=128, lr=a.finetune_lr, device=a.device, init_from=init,
                          distill=a.finetune_distill)
        qat.prepare(problem.fused, problem.space, ft_data, seed=a.seed + k)
        ex2 = LocalExecutor(a.workers)
        try:
            for c, ok in ex2.run(qat, [Candidate.from_key(key) for key in roles]):
                correct.setdefault(c.key, {})[k] = ok
        finally:
            ex2.close()
    for key, r in roles.items():
        r["finetuned_accs"] = [float(correct[key][k].mean()) for k in range(a.finetune_seeds)]
        r["finetuned_acc"] = float(np.mean(r["finetuned_accs"]))
    fine = roles

    def stacked(key):
        return np.stack([correct[key][k] for k in range(a.finetune_seeds)])

    comparisons = []
    for name in ("w8a8", "w4a4"):
        fb = fine[base[name]["key"]]
        members = [{"member": m["key"], "member_supernet_acc": m["acc"], "member_acc": fine[m["key"]]["finetuned_acc"],
                    "member_bitops": m["objectives"]["bitops"],
                    "vs_baseline": paired_difference(stacked(m["key"]), stacked(base[name]["key"])),
                    "dominates": fine[m["key"]]["finetuned_acc"] > fb["finetuned_acc"]
                    and m["objectives"]["bitops"] < fb["bitops"]} for m in picks[name]]
        comparisons.append({"baseline": name, "baseline_acc": fb["finetuned_acc"], "baseline_bitops": fb["bitops"],
                            "baseline_supernet_acc": fb["supernet_acc"], "members": members,
                            "dominates": any(m["dominates"] for m in members),
                            **({} if members else {"note": "no front member with fewer BitOps" if a.compare_top
                                                             else "no members requested (--compare-top 0)"})})
    tau = None
    v = [x for x in fine.values() if x["supernet_acc"] is not None]
    if len(v) >= 3:
        from scipy.stats import kendalltau

        tau = float(kendalltau([x["supernet_acc"] for x in v], [x["finetuned_acc"] for x in v]).statistic)
    return {"wall_s": time.perf_counter() - t2, "candidates": list(fine.values()), "comparisons": comparisons,
            "kendall_tau_supernet_vs_finetuned": tau, "val_images": int(len(ft_data.val))}


def plot_finetune(fine: dict, path: Path, title: str) -> None:
    """Fine-tuned top-1 vs BitOps: the uniform baselines and the front members picked against them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for c in fine["candidates"]:
        base = c["role"].startswith("uniform")
        ax.scatter(c["bitops"], c["finetuned_acc"] * 100, marker="s" if base else "o", s=60 if base else 30,
                   color="tab:red" if base else ("tab:blue" if "w8a8" in c["role"] else "tab:green"), zorder=3)
        if base:
            ax.annotate(c["role"].split()[1], (c["bitops"], c["finetuned_acc"] * 100), textcoords="offset points",
                        xytext=(6, -4), fontsize=8)
    for name, color in (("w8a8", "tab:blue"), ("w4a4", "tab:green")):
        ax.scatter([], [], color=color, s=30, label=f"front members picked vs {name}")
    ax.scatter([], [], color="tab:red", marker="s", s=60, label="uniform configurations")
    ax.set_xscale("log")
    ax.set_xlabel("BitOps")
    ax.set_ylabel("top-1 after the same fine-tune (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.search", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=str(MODELS / "resnet20_cifar10.onnx"))
    ap.add_argument("--workdir", default=None, help="default: benchmarks/results/search-work[-quick]")
    ap.add_argument("--resume", action="store_true", help="continue a killed run in --workdir")
    ap.add_argument("--pop", type=int, default=None)
    ap.add_argument("--gens", type=int, default=None)
    ap.add_argument("--supernet-epochs", type=float, default=None,
                    help="optimizer steps x 128 / train images; a sandwich step is 3 forward/backward passes")
    ap.add_argument("--supernet-lr", type=float, default=0.002)
    ap.add_argument("--no-sandwich", action="store_true", help="one uniformly sampled configuration per step")
    ap.add_argument("--distill", action="store_true", help="sandwich with in-place distillation")
    ap.add_argument("--sandwich-low", type=int, default=None,
                    help="bits of the sandwich's small end (default: 2, the smallest choice)")
    ap.add_argument("--finetune-steps", type=int, default=None, help="QAT steps (batch 128) per fine-tuned candidate")
    ap.add_argument("--finetune-lr", type=float, default=0.002,
                    help="0.01 costs 60-step fine-tunes of W8A8 / W4A4 2.0 / 2.8 points against 0.002 (measured)")
    ap.add_argument("--compare-top", type=int, default=2, help="front members fine-tuned per baseline")
    ap.add_argument("--also", default="", help="uniform configurations fine-tuned as reference points, e.g. "
                    "w4a8,w8a4 (reported, not compared: they are not front members)")
    ap.add_argument("--finetune-seeds", type=int, default=1,
                    help="fine-tunes per candidate (seeds --seed, --seed + 1, ...); compared on their mean")
    ap.add_argument("--val-limit", type=int, default=None, help="images scored per candidate during the search")
    ap.add_argument("--workers", type=int, default=1, help="processes scoring / fine-tuning candidates")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-init", action="store_true", help="NSGA-III starts from random genes only "
                    "(default: the 9 uniform (w, a) configurations, then random ones)")
    ap.add_argument("--stage", choices=("all", "search", "finetune"), default="all",
                    help="search: supernet + NSGA-III + random search, saved to WORKDIR/search_stage.json; "
                         "finetune: the fine-tune comparison from that file (e.g. on another machine)")
    ap.add_argument("--device", default="cpu", help="torch device of the fine-tunes (cpu, cuda)")
    ap.add_argument("--finetune-init", choices=("fp32", "supernet"), default="fp32",
                    help="fine-tunes start from the FP32 weights with fresh quantizers, or inherit the trained "
                         "supernet's weights, steps and norms (WORKDIR/nsga3/supernet.pt)")
    ap.add_argument("--finetune-distill", type=float, default=0.0,
                    help="weight of the FP32 model's soft labels in every fine-tune's loss (0: labels only)")
    ap.add_argument("--name", default=None, help="result name: results/NAME.json [search, search_quick]")
    a = ap.parse_args(argv)

    import torch

    from qtool.io import atomic_write_text, load_model
    from qtool.bitsearch import SearchProblem

    torch.set_num_threads(1)
    q = a.quick
    pop = a.pop or (4 if q else 20)
    gens = a.gens or (2 if q else 20)
    epochs = a.supernet_epochs or (0.5 if q else 1.5)
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

    problem = SearchProblem.from_model(model, spec, objectives="acc,bitops", bits=(2, 4, 8), train_limit=train_limit,
                                       val_limit=val_limit)
    sp = problem.space
    stage_file = wd / "search_stage.json"
    if a.stage in ("all", "search"):
        stage = _search_stage(a, problem, wd, pop, gens, epochs)
        stage.update({"setup": setup, "model": str(model_path), "data": spec})
        atomic_write_text(stage_file, json.dumps(stage, indent=2, default=float) + "\n")
        if a.stage == "search":
            print(f"search stage done: {stage['search']['evaluations']} evaluations in {stage['search']['wall_s']:.0f} s, "
                  f"HV nsga3 {stage['hypervolume']['nsga3']:.4f} vs random {stage['hypervolume']['random']:.4f}; "
                  f"wrote {stage_file}")
            return 0
    else:
        if not stage_file.exists():
            print(f"--stage finetune needs {stage_file} (run --stage search first)", file=sys.stderr)
            return 2
        stage = json.loads(stage_file.read_text())
    fine = _finetune_stage(a, problem, spec, train_limit, ft_steps, stage, wd)
    payload = {
        "setup": stage["setup"], "quick": q, "model": stage["model"], "data": stage["data"],
        "space": {"layers": len(sp.layers), "searched": len(sp.searched), "bits": list(sp.choices)},
        "settings": {**stage["settings"], "finetune_steps": ft_steps, "finetune_lr": a.finetune_lr,
                     "compare_top": a.compare_top, "finetune_device": a.device, "finetune_init": a.finetune_init,
                     "finetune_distill": a.finetune_distill,
                     "finetune_seed": a.seed, "finetune_seeds": a.finetune_seeds,
                     "finetune_val_images": fine.pop("val_images"), "workers_finetune": a.workers},
        "search": stage["search"], "random_search": stage["random_search"], "hypervolume": stage["hypervolume"],
        "finetune": fine,
    }
    hv = stage["hypervolume"]
    comparisons = fine["comparisons"]
    name = a.name or ("search_quick" if q else "search")
    out = write_result(name, payload, table="search")
    plot_finetune(fine, wd / f"{name}_finetune.png",
                  f"{ft_steps} fine-tune steps from {'the supernet' if a.finetune_init == 'supernet' else 'FP32'} "
                  f"({a.device}); whole val split")
    srch = stage["search"]
    print(f"{stage['setup']}: {srch['evaluations']} NSGA-III evaluations in {srch['wall_s']:.0f} s "
          f"(supernet {srch['supernet_train_s'] or 0:.0f} s); HV nsga3 {hv['nsga3']:.4f} vs random {hv['random']:.4f}")
    print("  supernet top-1 of uniform " + ", ".join(f"{n} {v:.4f}" for n, v in srch["supernet_uniform_acc"].items()))
    for c in comparisons:
        print(f"  vs uniform {c['baseline']} (fine-tuned top-1 {c['baseline_acc']:.4f}, BitOps {c['baseline_bitops']:.3g}):")
        for m in c["members"]:
            v = m["vs_baseline"]
            print(f"    {m['member']} top-1 {m['member_acc']:.4f} ({v['diff_pp']:+.2f} pp, 95% CI over val images "
                  f"[{v['ci95_pp'][0]:+.2f}, {v['ci95_pp'][1]:+.2f}]), BitOps {m['member_bitops']:.3g}: "
                  f"{'dominates' if m['dominates'] else 'does not dominate'}")
        if not c["members"]:
            print(f"    {c['note']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
