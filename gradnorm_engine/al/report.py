"""From results.jsonl to figures and a markdown summary.

    paths = write_report("runs/demo")   # curves.png, times.png, per_class.png, summary.md
    print(accuracy_table(read_records("runs/demo"), fmt="text"))

- Learning curves: test accuracy (%) against labeled-set size, the mean over trials as a line
  and mean +- one standard deviation as a band (no band with a single trial).
- Table (like the paper's Table III): one row per strategy, one column per labeled-set size,
  "mean +- std" over trials (sample std, ddof=1; "mean" alone with one trial).
- Time: mean train and query seconds per cycle, per strategy.
- Per-class accuracy at the largest labeled size every strategy reached, mean over trials.
"""
from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict

from ..errors import UsageError
from ..extras import require
from .run_folder import JSON_KIND_WORDS, is_json_kind, read_results, results_path

CURVES = "curves.png"
TIMES = "times.png"
PER_CLASS = "per_class.png"
SUMMARY = "summary.md"


# What the report reads of every record, and its JSON type.
RECORD_FIELDS = {"strategy": "string", "trial": "integer", "cycle": "integer", "labeled": "integer",
                 "per_class_acc": "list", "train_s": "number", "query_s": "number"}


def read_records(run_dir: str) -> list[dict]:
    """The records of ``run_dir``'s results.jsonl, each with the fields the report reads
    (RECORD_FIELDS; test_acc may be null) and each (strategy, trial, cycle) once. UsageError, one
    line naming the record and what is wrong, otherwise: nothing is reported half or twice."""
    records = read_results(run_dir)
    path = results_path(run_dir)
    fix = ("`gradnorm-engine al --resume` with the run's options rewrites results.jsonl from its checkpoints, "
           "or mend the file by hand")
    seen: dict[tuple, int] = {}
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise UsageError(f"record {number} of {path} is not a JSON object; {fix}")
        missing = [k for k in RECORD_FIELDS if k not in record]
        if missing:
            raise UsageError(f"record {number} of {path} lacks {', '.join(missing)}, which the report needs; {fix}")
        for key, kind in RECORD_FIELDS.items():
            if not is_json_kind(record[key], kind):
                raise UsageError(f"record {number} of {path} holds {key} = {record[key]!r}, not "
                                 f"{JSON_KIND_WORDS[kind]}; {fix}")
        key = (record["strategy"], record["trial"], record["cycle"])
        if key in seen:
            raise UsageError(f"{path} holds {key[0]} trial {key[1]} cycle {key[2]} twice (records {seen[key]} and "
                             f"{number}): records of two runs mixed in one file; {fix}")
        seen[key] = number
    return records


def _strategy_order(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["strategy"] for r in records))


def accuracy_by_size(records: list[dict]) -> dict[str, dict[int, list[float]]]:
    """strategy -> labeled size -> test accuracies (one per trial)."""
    table: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        acc = r.get("test_acc")
        if isinstance(acc, (int, float)) and math.isfinite(acc):   # null/NaN (a hand-edited file): left out
            table[r["strategy"]][int(r["labeled"])].append(float(acc))
    return table


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float], plus_minus: str) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} {plus_minus} {std:.1f}"


def accuracy_table(records: list[dict], fmt: str = "markdown") -> str:
    """Test accuracy (%) mean +- std over trials, strategies x labeled sizes; ``fmt`` "markdown" or "text"."""
    table = accuracy_by_size(records)
    sizes = sorted({int(r["labeled"]) for r in records})
    strategies = _strategy_order(records)
    trials = {s: len({r["trial"] for r in records if r["strategy"] == s}) for s in strategies}
    header = ["strategy (trials)", *[f"{n:,}" for n in sizes]]
    rows = [[f"{s} ({trials[s]})", *[_cell(table[s].get(n, []), "±" if fmt == "markdown" else "+-") for n in sizes]]
            for s in strategies]
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    fmt_row = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt_row(header), "  ".join("-" * w for w in widths), *map(fmt_row, rows)])


def time_table(records: list[dict]) -> str:
    """Mean train / query seconds per cycle and totals per trial, per strategy (markdown)."""
    lines = ["| strategy | train s / cycle | query s / cycle | total s / trial |", "|---|---|---|---|"]
    for s in _strategy_order(records):
        rs = [r for r in records if r["strategy"] == s]
        trials = len({r["trial"] for r in rs})
        train = statistics.fmean(r["train_s"] for r in rs)
        query = statistics.fmean(r["query_s"] for r in rs)
        total = sum(r["train_s"] + r["query_s"] for r in rs) / trials
        lines.append(f"| {s} | {train:.2f} | {query:.2f} | {total:.1f} |")
    return "\n".join(lines)


def _final_size(records: list[dict]) -> int:
    """The largest labeled size that every strategy has a record for."""
    sizes = [{int(r["labeled"]) for r in records if r["strategy"] == s} for s in _strategy_order(records)]
    common = set.intersection(*sizes) if sizes else set()
    return max(common) if common else max(int(r["labeled"]) for r in records)


def per_class_means(records: list[dict], size: int) -> dict[str, list[float]]:
    """strategy -> per-class accuracy (%) at labeled size ``size``, mean over trials (NaN if never tested)."""
    out = {}
    for s in _strategy_order(records):
        rows = [r["per_class_acc"] for r in records if r["strategy"] == s and int(r["labeled"]) == size]
        if not rows:
            continue
        classes = len(rows[0])
        out[s] = [statistics.fmean(v) if (v := [row[c] for row in rows if row[c] is not None]) else math.nan
                  for c in range(classes)]
    return out


def _plt():
    matplotlib = require("matplotlib", extra="al", feature="the report's figures")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", extra="al", feature="the report's figures")


def plot_curves(records: list[dict], path: str, title: str | None = None) -> str:
    plt = _plt()
    table = accuracy_by_size(records)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for s in _strategy_order(records):
        sizes = sorted(table[s])
        stats = [mean_std(table[s][n]) for n in sizes]
        mean = [m for m, _ in stats]
        (line,) = ax.plot(sizes, mean, marker="o", label=s)
        if any(len(table[s][n]) > 1 for n in sizes):
            ax.fill_between(sizes, [m - d for m, d in stats], [m + d for m, d in stats], alpha=0.15,
                            color=line.get_color(), linewidth=0)
    ax.set_xlabel("labeled samples")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "Active learning: test accuracy (mean ± std over trials)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_times(records: list[dict], path: str) -> str:
    plt = _plt()
    strategies = _strategy_order(records)
    train = [statistics.fmean(r["train_s"] for r in records if r["strategy"] == s) for s in strategies]
    query = [statistics.fmean(r["query_s"] for r in records if r["strategy"] == s) for s in strategies]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs = range(len(strategies))
    ax.bar([x - 0.2 for x in xs], train, width=0.4, label="train")
    ax.bar([x + 0.2 for x in xs], query, width=0.4, label="query")
    ax.set_xticks(list(xs), strategies, rotation=20)
    ax.set_ylabel("seconds per cycle (mean)")
    ax.set_title("Train and query time per cycle")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_per_class(records: list[dict], path: str) -> str:
    plt = _plt()
    size = _final_size(records)
    means = per_class_means(records, size)
    classes = max(len(v) for v in means.values())
    fig, ax = plt.subplots(figsize=(max(6.4, 0.5 * classes + 2), 4.0))
    width = 0.8 / max(1, len(means))
    for i, (s, values) in enumerate(means.items()):
        ax.bar([c + (i - (len(means) - 1) / 2) * width for c in range(classes)],
               [0.0 if math.isnan(v) else v for v in values], width=width, label=s)
    ax.set_xticks(range(classes))
    ax.set_xlabel("class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Per-class accuracy at {size:,} labeled samples")
    ax.legend(fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dir: str, dest: str | None = None) -> dict[str, str]:
    """Figures and summary.md for the run in ``run_dir`` (written to ``dest``, default ``run_dir``)."""
    records = read_records(run_dir)
    if not records:
        raise UsageError(f"{run_dir} has no records yet; let `gradnorm-engine al` finish a cycle first")
    dest = dest or (run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir) or ".")
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise UsageError(f"--dest {dest} is a file, not a folder; choose a folder for the figures")
    os.makedirs(dest, exist_ok=True)
    paths = {
        "curves": plot_curves(records, os.path.join(dest, CURVES)),
        "times": plot_times(records, os.path.join(dest, TIMES)),
        "per_class": plot_per_class(records, os.path.join(dest, PER_CLASS)),
    }
    dataset = records[0].get("dataset", "?")
    trials = len({r["trial"] for r in records})
    summary = "\n".join([
        f"# Active learning on {dataset}",
        "",
        f"{len(records)} cycles recorded, {len(_strategy_order(records))} strategies, {trials} trial(s).",
        "",
        "## Test accuracy (%) by labeled-set size, mean ± std over trials",
        "",
        accuracy_table(records, fmt="markdown"),
        "",
        f"![learning curves]({CURVES})",
        "",
        "## Time",
        "",
        time_table(records),
        "",
        f"![train and query time]({TIMES})",
        "",
        f"## Per-class accuracy at {_final_size(records):,} labeled samples",
        "",
        f"![per-class accuracy]({PER_CLASS})",
        "",
    ])
    paths["summary"] = os.path.join(dest, SUMMARY)
    with open(paths["summary"], "w") as f:
        f.write(summary)
    return paths
