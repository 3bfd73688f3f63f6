"""The benchmark's picture: samples/s per method on a log scale, the floors as horizontal lines.

    plot_methods(report, "bench.png")

Bars are the per-sample-norm methods; ``forward`` (inference) and ``fwd_bwd`` (one training
step) are drawn as dashed lines across the chart, so the gap of each bar to the lines is how
far that method is from the physical floor. A method that could not run is named under the
axis with "n/a".
"""
from __future__ import annotations

from pathlib import Path

from ..extras import require
from .methods import FLOORS

FLOOR_STYLE = {"forward": ("tab:green", "forward (inference floor)"),
               "fwd_bwd": ("tab:red", "fwd_bwd (training-step floor)")}


def plot_methods(report: dict, path: str | Path) -> Path:
    matplotlib = require("matplotlib", extra="bench", feature="the benchmark plot")
    matplotlib.use("Agg")  # files only, no display needed
    plt = require("matplotlib.pyplot", extra="bench", feature="the benchmark plot")

    rows = report["rows"]
    bars = [r for r in rows if r["method"] not in FLOORS]
    floors = [r for r in rows if r["method"] in FLOORS and r["samples_per_s"]]
    measured = [r["samples_per_s"] for r in rows if r["samples_per_s"]]
    if not measured:
        raise ValueError("nothing was measured, so there is nothing to plot")

    fig, ax = plt.subplots(figsize=(1.3 * max(4, len(bars)) + 2, 4.5), layout="constrained")
    labels = [r["method"] if r["samples_per_s"] else f"{r['method']}\n(n/a)" for r in bars]
    values = [r["samples_per_s"] or 0 for r in bars]
    drawn = ax.bar(labels, values, color="tab:blue")
    for rect, r in zip(drawn, bars):
        if r["samples_per_s"]:
            ax.annotate(f"{r['samples_per_s']:.3g}", (rect.get_x() + rect.get_width() / 2, r["samples_per_s"]),
                        ha="center", va="bottom", fontsize=8)
    for r in floors:
        color, label = FLOOR_STYLE[r["method"]]
        ax.axhline(r["samples_per_s"], color=color, linestyle="--", label=f"{label}: {r['samples_per_s']:.3g}/s")
    ax.set_yscale("log")
    ax.set_ylim(min(measured) / 3, max(measured) * 3)
    ax.set_ylabel("samples / s (log scale)")
    h, s = report["header"], report["header"]["settings"]
    ax.set_title(f"per-sample gradient norms: {s.get('model')} {s.get('dtype')}, batch {s.get('batch_size')}\n"
                 f"{h['device']}, torch {h['torch']}", fontsize=10)
    if floors:
        ax.legend(loc="upper right", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
