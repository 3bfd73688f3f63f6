"""The benchmark's records: the header (machine, versions, command), tables, JSON, markdown.

    report = {"header": environment_header(device, argv, settings), "rows": rows,
              "chunk_sweep": [...], "scaling": [...]}
    write_json(report, path); print(format_table(rows, METHOD_COLUMNS))
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from .runner import device_label

# (key, heading, format) of each printed column
METHOD_COLUMNS = [
    ("method", "method", "{}"), ("samples_per_s", "samples/s", "{:.1f}"), ("time_per_call_ms", "ms/call", "{:.1f}"),
    ("spread_pct", "spread %", "{:.1f}"), ("samples_per_call", "samples/call", "{}"),
    ("peak_mem_mb", "peak MiB", "{:.0f}"), ("max_rel_err", "max rel err", "{:.1e}"),
    ("ratio_to_fwd_bwd", "x fwd_bwd", "{:.2f}"), ("error_or_notes", "error / notes", "{}"),
]
SWEEP_COLUMNS = [("chunk_size", "chunk", "{}"), *METHOD_COLUMNS[:3], *METHOD_COLUMNS[5:7], METHOD_COLUMNS[-1]]
SCALING_COLUMNS = [
    ("pool_size", "pool", "{:,}"), ("backend", "backend", "{}"), ("seconds", "seconds", "{:.2f}"),
    ("samples_per_s", "samples/s", "{:.0f}"), ("us_per_sample", "us/sample", "{:.1f}"),
    ("size_vs_smallest", "size x", "{:.0f}"), ("time_vs_smallest", "time x", "{:.2f}"),
    ("peak_mem_mb", "peak MiB", "{:.1f}"),
]

PEAK_MEMORY_NOTE = {
    "cuda": "peak_mem_mb: torch.cuda.max_memory_allocated() during the method's calls minus "
            "memory_allocated() before them (working memory on top of model and inputs)",
    "cpu": "peak_mem_mb: growth of the process's resident-set high-water mark (VmHWM, reset through "
           "/proc/self/clear_refs) over the resident set before the method's calls, after handing free "
           "heap pages back with malloc_trim; approximate (fragmentation counts, and memory the C "
           "allocator keeps from earlier work may be reused unseen)",
}


def environment_header(device: torch.device, argv: Sequence[str] | None, settings: dict) -> dict:
    """Everything needed to read or rerun the numbers: versions, machine, command, definitions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from .. import __version__

    header = {
        "command": "gradnorm-engine " + " ".join(argv) if argv is not None else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_label(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "gradnorm_engine": __version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": _load_average(),
        "settings": settings,
        "peak_mem_method": PEAK_MEMORY_NOTE["cuda" if device.type == "cuda" else "cpu"],
        "definitions": {
            "samples_per_s": "samples scored per call / median seconds per call",
            "max_rel_err": "max over samples of |score - loop| / loop, against the per-sample loop in float64 "
                           "on the same samples; null for the floors",
            "ratio_to_fwd_bwd": "seconds per sample / fwd_bwd's seconds per sample (1 = one training step)",
            "spread_pct": "interquartile range of the timed calls over their median (max - min below 4 repeats)",
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        header["gpu_memory_gib"] = round(props.total_memory / 1024**3, 1)
        header["gpu_multiprocessors"] = props.multi_processor_count
    return header


def finish_header(header: dict) -> dict:
    header["load_average_at_end"] = _load_average()
    return header


def format_table(rows: Sequence[dict], columns) -> str:
    """A plain-text table, columns padded, missing values as '-'."""
    cells = [[heading for _, heading, _ in columns]]
    for r in rows:
        cells.append([_cell(_value(r, key), fmt) for key, _, fmt in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: Sequence[dict], columns) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(_value(r, k), f).replace("|", "/") for k, _, f in columns) + " |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    """The whole report as markdown: command, machine, and each table present."""
    h = report["header"]
    out = [f"## {h['device']}: {_title(report)}", "",
           f"Command: `{h['command']}`", "",
           f"{h['date_utc']}; torch {h['torch']}, triton {h['triton']}, CUDA {h['cuda']}, python {h['python']}; "
           f"CPU: {h['cpu']} ({h['cpu_count']} logical cores, {h['torch_threads']} torch threads); "
           f"load average at start {h['load_average_at_start']}, at end {h.get('load_average_at_end')}.", ""]
    if report.get("rows"):
        s = h["settings"]
        out += [f"Methods: {s.get('model_description', s.get('model'))}, {s.get('dtype')}, batch {s.get('batch_size')}, "
                f"median of {s.get('repeats')} timed calls after {s.get('warmup')} warm-up calls, "
                f"{s.get('n_batches')} input batches rotated; `loop` times {s.get('loop_samples')} samples per call.", "",
                format_markdown(report["rows"], METHOD_COLUMNS), ""]
    if report.get("chunk_sweep"):
        out += ["Engine backends by chunk size (hot path `sqnorms` on one chunk):", "",
                format_markdown(report["chunk_sweep"], SWEEP_COLUMNS), ""]
    if report.get("scaling"):
        first = report["scaling"][0]
        out += [f"Pool-size scaling: `rank_unlabeled` on synthetic pools ({first['model']}, {first['dtype']}):", "",
                format_markdown(report["scaling"], SCALING_COLUMNS), ""]
    out += [h["peak_mem_method"] + ".", ""]
    return "\n".join(out)


def write_json(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_finite(report), f, indent=2, allow_nan=False, default=str)
        f.write("\n")


def _finite(value):
    """Strict JSON has no NaN/Infinity: such a float is written as the string "nan"/"inf"."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _title(report: dict) -> str:
    s = report["header"]["settings"]
    parts = []
    if report.get("rows") or report.get("chunk_sweep"):
        parts.append(f"{s.get('model')} {s.get('dtype')}")
    if report.get("scaling"):
        parts.append("pool scaling")
    return ", ".join(parts)


def _value(row: dict, key: str):
    if key == "error_or_notes":
        return row.get("error") or row.get("notes")
    return row.get(key)


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:
        return "nan"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


