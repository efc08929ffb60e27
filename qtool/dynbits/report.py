"""Reports of `qtool dynamic` in its output directory: report.json, bitflops_hist.png (per-sample BitFLOPs
of the deployed model on the val split), easy_hard.png (the val images with the lowest / highest chosen
BitFLOPs), acc_vs_bitflops.png (dynamic vs static at their average BitFLOPs)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from qtool.io import atomic_write_bytes, atomic_write_text

GRID = 8  # images per row of easy_hard.png


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _figure(*args, **kw):
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kw)


def histogram(out: Path, report: dict, bitflops: np.ndarray) -> None:
    fig, ax = _figure(figsize=(6, 3.6))
    lo, hi = float(bitflops.min()), float(bitflops.max())
    if hi <= lo:  # every sample chose the same BitFLOPs: one bar around it
        lo, hi = lo * 0.98, hi * 1.02
    ax.hist(bitflops, bins=min(40, max(5, len(np.unique(bitflops)))), range=(lo, hi), color="tab:blue", alpha=0.8)
    ax.axvline(report["target_bitflops"], color="k", ls="--", label="target")
    ax.axvline(float(bitflops.mean()), color="tab:blue", ls="-", label="dynamic average")
    for s in report["static"]:
        ax.axvline(s["bitflops"], color="tab:red", ls=":", label=f"static {s['name']}")
    ax.set_xlabel("BitFLOPs per sample (sum MACs x b_w x b_a)")
    ax.set_ylabel("val images")
    ax.legend(fontsize=7)
    _save(fig, out / "bitflops_hist.png")


def easy_hard(out: Path, val, ev) -> None:
    n = min(GRID, len(ev.bitflops) // 2 or 1)
    order = np.argsort(ev.bitflops, kind="stable")
    rows = [("easiest", order[:n]), ("hardest", order[::-1][:n])]
    fig, axes = _figure(2, n, figsize=(1.4 * n, 3.6), squeeze=False)
    pred = ev.logits.argmax(1)
    for r, (what, idx) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(idx):
                continue
            i = idx[c]
            img = val.images[i].transpose(1, 2, 0)
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None)
            name = val.classes[val.labels[i]] if val.classes else str(val.labels[i])
            ok = "ok" if pred[i] == val.labels[i] else f"-> {val.classes[pred[i]]}"
            ax.set_title(f"{name} {ok}\n{ev.bitflops[i]:.3g}", fontsize=6)
        axes[r][0].text(-0.3, 0.5, what, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
    fig.suptitle("lowest / highest chosen BitFLOPs (val)", fontsize=9)
    _save(fig, out / "easy_hard.png")


def acc_plot(out: Path, report: dict) -> None:
    fig, ax = _figure(figsize=(5.5, 3.8))
    d = report["dynamic"]
    ax.scatter([d["avg_bitflops"]], [d["acc_ort"] * 100], color="tab:blue", marker="*", s=120, label="dynamic (ORT)")
    for s in report["static"]:
        ax.scatter([s["bitflops"]], [s["acc_ort"] * 100], color="tab:red", marker="o", label=f"static {s['name']} (ORT)")
    ax.axvline(report["target_bitflops"], color="k", ls="--", lw=0.8, label="target")
    ax.set_xlabel("average BitFLOPs per sample")
    ax.set_ylabel("val top-1 (%)")
    ax.legend(fontsize=7)
    _save(fig, out / "acc_vs_bitflops.png")


def write_report(out: Path, report: dict, val, ev) -> None:
    histogram(out, report, ev.bitflops)
    easy_hard(out, val, ev)
    acc_plot(out, report)
    report["files"] = {"report": "report.json", "histogram": "bitflops_hist.png", "easy_hard": "easy_hard.png",
                       "accuracy_plot": "acc_vs_bitflops.png", "controller": "controller.onnx",
                       "manifest": "manifest.json", "static": "static.onnx" if (out / "static.onnx").exists() else None}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=float) + "\n")
