"""Search outputs in the workdir: front.json / front.csv, pareto.png, bits_heatmap.png, and per
front member its QuantPlan and QDQ model (front/<i>.plan.json, front/<i>.onnx) with the top-1 the
exported model reaches on onnxruntime (`acc_ort`, the fidelity check of the search's scores; the
uniform baselines get theirs the same way, and the plot shows those onnxruntime numbers)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from qtool.io import atomic_write_bytes, atomic_write_text, save_model
from qtool.bitsearch.objectives import metric
from qtool.bitsearch.space import FLOAT, Candidate


def ort_correct(model, data, threads: int | None = None) -> np.ndarray:
    """Whether onnxruntime classifies each validation image right (bool)."""
    from qtool.evaluation import make_session

    sess = make_session(model, threads=threads)
    name, val = sess.get_inputs()[0].name, data.val
    return np.concatenate([sess.run(None, {name: data.pre.apply(val.images[i:i + 256])})[0].argmax(1)
                           == val.labels[i:i + 256] for i in range(0, len(val), 256)])


def ort_accuracy(model, data) -> float:
    return float(ort_correct(model, data).mean())


def ort_check(problem, evaluator, c: Candidate) -> float:
    """Top-1 of candidate `c`'s exported QDQ model (evaluator weights + plan) on onnxruntime."""
    from exporters.qdq import apply_plan

    model, plan, _ = evaluator.materialize(c)
    return ort_accuracy(apply_plan(model, plan), problem.data)


def export_member(workdir: Path, problem, evaluator, member: dict) -> None:
    """Tuned weights + plan of one front member -> front/<i>.plan.json, front/<i>.fused.onnx (the
    fused graph with its weights, what `qtool export` takes) and front/<i>.onnx (QDQ, apply_plan)."""
    from exporters.qdq import apply_plan

    d = Path(workdir) / "front"
    d.mkdir(exist_ok=True)
    i = member["index"]
    model, plan, acc_torch = evaluator.materialize(Candidate.from_key(member["key"]))
    qdq = apply_plan(model, plan)
    plan.meta.update({"search_workdir": str(workdir), "front_index": i})
    plan.save(d / f"{i}.plan.json")
    save_model(model, d / f"{i}.fused.onnx")
    save_model(qdq, d / f"{i}.onnx")
    member["acc_materialized"] = acc_torch
    member["acc_ort"] = ort_accuracy(qdq, problem.data)
    member["plan_file"] = f"front/{i}.plan.json"
    member["model_file"] = f"front/{i}.fused.onnx"
    member["qdq_file"] = f"front/{i}.onnx"
    member["plan"] = json.loads(plan.to_json())


def write_all(workdir: Path, problem, result) -> None:
    workdir = Path(workdir)
    sp = problem.space
    payload = {"objectives": result.objectives, "constraints": problem.constraints,
               "layers": [l.node for l in sp.layers], "target": sp.target, "choices": sp.describe()["choices"],
               "fixed": {sp.layers[i].node: list(v) for i, v in sp.fixed.items()},
               "front": result.front, "baselines": result.baselines,
               "evaluated": result.evaluated, "reused": result.reused, "generations": result.generations,
               "wall_s": result.wall_s, "supernet_train_s": result.supernet_train_s}
    atomic_write_text(workdir / "front.json", json.dumps(payload, indent=2) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    nodes = [l.node for l in sp.layers]
    w.writerow(["index", "key"] + result.objectives + ["acc_ort", "plan_file"]
               + [f"{n}:w" for n in nodes] + [f"{n}:a" for n in nodes])
    for m in result.front:
        w.writerow([m["index"], m["key"]] + [m["objectives"][o] for o in result.objectives]
                   + [m.get("acc_ort", ""), m.get("plan_file", "")]
                   + [m["bits"][n]["w"] for n in nodes] + [m["bits"][n]["a"] for n in nodes])
    atomic_write_text(workdir / "front.csv", buf.getvalue())
    plot_pareto(workdir / "pareto.png", result)
    plot_heatmap(workdir / "bits_heatmap.png", result, nodes)


def _savefig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_pareto(path: Path, result, extra: list[tuple[str, dict]] | None = None,
                labels: dict[str, str] | None = None) -> None:
    """Accuracy against each other objective (one panel each; latency and size are the measured
    onnxruntime milliseconds and QDQ bytes): the front and the uniform baselines, at their top-1 on
    onnxruntime where re-checked (`acc_ort`), else the evaluator's. `extra`: more labelled points,
    (name, objectives dict with "acc" and the x objectives), e.g. another tool's result evaluated the
    same way; a point lacking an objective is left out of that panel. `labels`: axis labels by objective
    for callers whose numbers measure something else (default: the objective's label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    others = [o for o in result.objectives if o != "acc"]
    y_name = "acc" if "acc" in result.objectives else result.objectives[0]
    if y_name != "acc":
        others = result.objectives[1:]
    scale = 100.0 if y_name == "acc" else 1.0
    points = list(result.front) + list(result.baselines)
    on_ort = y_name == "acc" and bool(points) and all(m.get("acc_ort") is not None for m in points)

    def y(m: dict) -> float:
        return (m["acc_ort"] if on_ort else m["objectives"][y_name]) * scale

    fig, axes = plt.subplots(1, len(others), figsize=(4.5 * len(others), 3.8), squeeze=False)
    for ax, o in zip(axes[0], others):
        pts = sorted((m["objectives"][o], y(m)) for m in result.front)
        if pts:
            xs, ys = zip(*pts)
            # With more than two objectives this is a projection: points, not a staircase.
            ax.plot(xs, ys, "o-" if len(result.objectives) == 2 else "o", color="tab:blue", label="search front", ms=5)
        for b, mk in zip(result.baselines, ("s", "^", "v", "D", "P", "X")):
            ax.plot(b["objectives"][o], y(b), mk, color="tab:red", ms=8, label=f"uniform {b['name']}")
        for (name, objs), mk in zip(extra or [], ("*", "h", "p", "8", "<", ">")):
            if o in objs and y_name in objs:
                ax.plot(objs[o], objs[y_name] * scale, mk, color="tab:green", ms=10, label=name)
        ax.set_xlabel((labels or {}).get(o) or metric(o).label)
        ax.set_ylabel(("top-1 on onnxruntime (%)" if on_ort else "top-1 (%)") if y_name == "acc"
                      else metric(y_name).label)
        if o in ("flops", "bitops", "packed_size"):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor-tick labels overlap on a short log axis
        ax.grid(alpha=0.3)
    # One legend beside the panels: inside them it hides points once there are more than a few labels.
    handles = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=3, fontsize=7)
    fig.suptitle("bit-width search: Pareto front vs uniform baselines (same evaluator)")
    fig.tight_layout()  # else a panel's y label runs into its left neighbour
    _savefig(fig, path)
    plt.close(fig)


def plot_heatmap(path: Path, result, nodes: list[str]) -> None:
    """Front members (rows) x layers (columns), weight bits left panel, activation bits right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.front or []
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 0.5 * len(nodes) * 2 + 2), 1 + 0.35 * max(1, len(rows))), squeeze=False)
    for ax, kind, title in zip(axes[0], ("w", "a"), ("weight bits", "activation bits (layer input)")):
        mat = np.array([[m["effective_bits"][n][kind] for n in nodes] for m in rows], dtype=float).reshape(len(rows), len(nodes))
        cmap = matplotlib.colormaps["viridis"].with_extremes(over="lightgray")  # float (FLOAT > 8): grey, "f"
        im = ax.imshow(mat if len(rows) else np.zeros((1, len(nodes))), aspect="auto", cmap=cmap, vmin=2, vmax=8)
        for (r, c), v in np.ndenumerate(mat):
            ax.text(c, r, "f" if v == FLOAT else f"{int(v)}", ha="center", va="center", fontsize=7,
                    color="w" if v < 6 else "k")
        ax.set_title(title)
        ax.set_xlabel("layer (node order)")
        ax.set_ylabel("front member")
        ax.set_xticks(range(len(nodes)))
        ax.set_xticklabels([str(i) for i in range(len(nodes))], fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    _savefig(fig, path)
    plt.close(fig)
