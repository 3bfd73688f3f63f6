"""The run folder of the active-learning loop: what is in it, and how it is written and read.

    config.json                          the settings (a resume must match them)
    results.jsonl                        one JSON object per (strategy, trial, cycle)
    checkpoints/<strategy>/trial<t>.pt   weights, L, U, random-number states, the run's records

Every file is written whole (temp file + ``os.replace``), with the mode any new file of the
process gets; results.jsonl is rebuilt from the checkpoints, which are the source of truth.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
from typing import Any

import torch

from ..errors import UsageError

RESULTS = "results.jsonl"
CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_NAME = re.compile(r"trial(\d+)\.pt")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader (or a crash) sees the old file or the new one, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, _new_file_mode())   # mkstemp makes 0600; run files are as readable as any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the process umask."""
    return 0o666 & ~_process_umask()


def _process_umask() -> int:
    """The umask, read without changing it (setting it, even for a moment, races with other
    threads creating files); where /proc does not say, the umask at import."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


def _read_umask_once() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _read_umask_once()


def atomic_torch_save(obj: Any, path: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _json_safe(value):
    """NaN/Inf are not JSON; they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def write_results(out: str, records: list[dict]) -> None:
    lines = "".join(json.dumps(_json_safe(r)) + "\n" for r in records)
    atomic_write_bytes(os.path.join(out, RESULTS), lines.encode())


def read_results(out: str) -> list[dict]:
    """All records of ``out/results.jsonl`` (``out`` may also be the file itself)."""
    path = out if out.endswith(".jsonl") else os.path.join(out, RESULTS)
    if not os.path.isfile(path):
        raise UsageError(f"{path} does not exist; run `gradnorm-engine al --out DIR` first")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UsageError(f"{path} line {number} is not a JSON record ({err.msg}); the file was "
                                     "cut or edited: `gradnorm-engine al --resume` rewrites it from the "
                                     "checkpoints") from err
    return records


def checkpoint_path(out: str, strategy: str, trial: int) -> str:
    return os.path.join(out, CHECKPOINTS, strategy, f"trial{trial}.pt")


def make_out_folder(out: str) -> None:
    """Create the run folder ``out``, or raise UsageError saying why it cannot be one."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder; choose a folder for the run")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the --out folder {out} ({err.strerror or err}); choose a folder "
                         "you can write to") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write into the --out folder {out}; choose a folder you can write to")


def check_checkpoints_cover_results(out: str) -> None:
    """A resume continues from the checkpoints: results.jsonl records without one cannot go on
    (and rebuilding results.jsonl from the checkpoints would drop them)."""
    if not os.path.isfile(os.path.join(out, RESULTS)):
        return
    try:
        runs = {(r.get("strategy"), r.get("trial")) for r in read_results(out)}
    except UsageError:
        return   # a cut results.jsonl: the resume rebuilds it from the checkpoints
    missing = sorted((s, t) for s, t in runs if not os.path.isfile(checkpoint_path(out, str(s), int(t))))
    if missing:
        shown = ", ".join(f"{s} trial {t}" for s, t in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UsageError(
            f"--resume: {out}/results.jsonl holds records of {shown}, but their checkpoints "
            f"({out}/{CHECKPOINTS}/<strategy>/trial<t>.pt) are missing, and a run continues from its "
            "checkpoint; restore the checkpoints folder, or start a new run in another --out")


def load_trial_state(path: str) -> dict | None:
    """A (strategy, trial)'s saved state (its checkpoint), or None when there is none yet."""
    return torch.load(path, map_location="cpu", weights_only=False) if os.path.exists(path) else None


def load_all_records(out: str) -> dict[tuple[str, int], list[dict]]:
    """Records of every run that has a checkpoint (the checkpoints are the source of truth).
    Anything else in checkpoints/ (a .DS_Store, a backup copy) is left alone."""
    found: dict[tuple[str, int], list[dict]] = {}
    root = os.path.join(out, CHECKPOINTS)
    if not os.path.isdir(root):
        return found
    for strategy in sorted(os.listdir(root)):
        folder = os.path.join(root, strategy)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            match = CHECKPOINT_NAME.fullmatch(name)
            if match:
                state = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=False)
                found[(strategy, int(match.group(1)))] = state["records"]
    return found
