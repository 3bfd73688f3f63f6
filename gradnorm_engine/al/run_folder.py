"""The run folder of the active-learning loop: what is in it, and how it is written and read.

    config.json                          the settings (a resume must match them)
    results.jsonl                        one JSON object per (strategy, trial, cycle)
    checkpoints/<strategy>/trial<t>.pt   weights, L, U, random-number states, the run's records

Every file is written whole (temp file ``.tmp-<8 random characters><name>`` + ``os.replace``),
with the mode any new file of the process gets; results.jsonl is rebuilt from the checkpoints,
which are the source of truth. A resume reads only what belongs to the run: config.json, and in
checkpoints/ the folders of the run's strategies and the files of its trials; it removes the
temporary files a killed write left, and refuses (UsageError, before any work) what it cannot
read, write, or tell apart from the run's own files.
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
from ..torch_files import load_torch_file

RESULTS = "results.jsonl"
CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_NAME = re.compile(r"trial([1-9]\d*)\.pt")
# What a checkpoint holds (TrialState.to_checkpoint).
CHECKPOINT_KEYS = ("cycle", "labeled", "unlabeled", "model", "lossnet", "train_generator", "query_generator",
                   "torch_rng", "records")

# atomic_write_bytes's temporary files: TEMP_PREFIX, tempfile.mkstemp's 8 random characters, the name
# of the file being written. A resume removes those of the run's own files (a killed write's leftovers).
TEMP_PREFIX = ".tmp-"
_OWN_TEMP = re.escape(TEMP_PREFIX) + r"[a-z0-9_]{8}"
RUN_TEMP_NAME = re.compile(f"{_OWN_TEMP}(?:{re.escape(RESULTS)}|{re.escape(CONFIG)})")
CHECKPOINT_TEMP_NAME = re.compile(_OWN_TEMP + CHECKPOINT_NAME.pattern)

# The fixes a resume's refusals name.
RESTORE = "restore it from a copy, or start a new run in another --out"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader (or a crash) sees the old file or the new one, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=os.path.basename(path))
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


def results_path(out: str) -> str:
    """``out/results.jsonl``, or ``out`` itself when it names a .jsonl file."""
    return out if out.endswith(".jsonl") else os.path.join(out, RESULTS)


def read_results(out: str) -> list[dict]:
    """All records of ``out/results.jsonl`` (``out`` may also be the file itself)."""
    path = results_path(out)
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


def read_config(out: str) -> dict | None:
    """The settings in ``out/config.json``, or None when there is none; UsageError when it cannot be
    read, is not JSON, or holds something other than a JSON object."""
    path = os.path.join(out, CONFIG)
    if not os.path.lexists(path):
        return None
    fix = "restore the run's config.json, or start a new run in another --out"
    if not os.path.isfile(path):
        raise UsageError(f"--resume: {path} is not a file, and it holds the run's settings; {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeError) as err:
        reason = getattr(err, "strerror", None) or err
        raise UsageError(f"--resume: cannot read the run's settings in {path} ({reason}); {fix}") from None
    if not text.strip():
        raise UsageError(f"--resume: {path} is empty (not valid JSON), and it holds the run's settings; {fix}")
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--resume: {path} is not valid JSON ({err.msg} at line {err.lineno}), and it holds "
                         f"the run's settings; {fix}") from None
    if not isinstance(saved, dict):
        raise UsageError(f"--resume: {path} holds a {_json_kind(saved)}, not the run's settings (a JSON object); {fix}")
    return saved


# The JSON kinds the run files' fields are checked against, in words for the messages.
JSON_KIND_WORDS = {"string": "a string", "strings": "a list of strings", "integer": "an integer",
                   "integers": "a list of integers", "number": "a number", "boolean": "true or false",
                   "object": "a JSON object", "list": "a list"}


def is_json_kind(value, kind: str) -> bool:
    """Whether ``value`` (read from JSON) is of ``kind``, a key of JSON_KIND_WORDS (a bool is no number)."""
    if kind in ("strings", "integers"):
        return isinstance(value, list) and all(is_json_kind(v, kind[:-1]) for v in value)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "boolean": bool, "object": dict, "list": list}[kind])


def _json_kind(value) -> str:
    """The JSON name of ``value``'s type: object, list, string, number, boolean, null."""
    for kind, types in (("boolean", bool), ("number", (int, float)), ("string", str), ("list", list),
                        ("object", dict)):
        if isinstance(value, types):
            return kind
    return "null" if value is None else type(value).__name__


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


def holds_run(out: str) -> bool:
    """Whether ``out`` holds (part of) a run: its config.json, results.jsonl or checkpoints/."""
    return any(os.path.lexists(os.path.join(out, name)) for name in (CONFIG, RESULTS, CHECKPOINTS))


def check_writable(out: str, strategies: list[str], trials: int) -> None:
    """What a run of ``strategies`` x ``trials`` writes into ``out`` can be written: results.jsonl and
    every checkpoint a file or absent, checkpoints/ and each strategy's folder a writable folder or
    absent. UsageError naming the first that is not (checked before any work)."""
    results = os.path.join(out, RESULTS)
    if os.path.lexists(results) and not os.path.isfile(results):
        raise UsageError(f"--resume: {results} is not a file, and the run rewrites it every cycle; move it out of "
                         f"{out} (a resume rebuilds results.jsonl from the checkpoints)")
    root = os.path.join(out, CHECKPOINTS)
    for folder in (root, *(os.path.join(root, s) for s in strategies)):
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise UsageError(f"--resume: {folder} is a file, not a folder, and the run writes its checkpoints "
                             f"there; move the file out of {out}")
        if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"--resume: cannot write into {folder}, where the run writes its checkpoints; make "
                             "it writable (chmod u+w), or start a new run in another --out")
    for strategy in strategies:
        for trial in range(1, trials + 1):
            path = checkpoint_path(out, strategy, trial)
            if os.path.lexists(path) and not os.path.isfile(path):
                raise UsageError(f"--resume: {path} is not a file, and it is where the run keeps {strategy} trial "
                                 f"{trial}; {RESTORE}")


def check_checkpoint_folders(out: str, strategies: list[str], trials: int, known: list[str]) -> None:
    """Refuse what a resume would read as part of the run of ``strategies`` x ``trials`` but the run
    did not write: the folder of a strategy (a name in ``known``) that the run does not have, or a
    trial<t>.pt beyond its trials (a resume that adds the strategy or more trials would take them
    over). Anything else in checkpoints/ (entropy.bak/, old/, trial1-backup.pt) is left alone."""
    root = os.path.join(out, CHECKPOINTS)
    if not os.path.isdir(root):
        return
    move = f"move it out of {root} (a resume reads only the run's <strategy>/trial<t>.pt), or start a new run " \
           "in another --out"
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if name not in known or not os.path.isdir(folder):
            continue
        if name not in strategies:
            raise UsageError(f"--resume: {folder} holds checkpoints of {name}, a strategy the run in {out} does not "
                             f"have ({', '.join(strategies)}); {move}")
        for file in sorted(os.listdir(folder)):
            match = CHECKPOINT_NAME.fullmatch(file)
            if match and int(match.group(1)) > trials:
                raise UsageError(f"--resume: {os.path.join(folder, file)} is not a checkpoint of the run in {out}, "
                                 f"which has {trials} trial(s); {move}")


def remove_stale_temp_files(out: str, strategies: list[str]) -> None:
    """Remove the temporary files that writes killed part-way left in ``out``: those of the run's
    own files alone (results.jsonl, config.json, and checkpoints/<strategy>/trial<t>.pt of
    ``strategies``), by atomic_write_bytes's name pattern."""
    places = [(out, RUN_TEMP_NAME), *((os.path.join(out, CHECKPOINTS, s), CHECKPOINT_TEMP_NAME) for s in strategies)]
    for folder, pattern in places:
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if pattern.fullmatch(name) and os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)


def check_checkpoints_cover_results(out: str) -> None:
    """A resume continues from the checkpoints: results.jsonl records without one cannot go on
    (and rebuilding results.jsonl from the checkpoints would drop them)."""
    if not os.path.isfile(os.path.join(out, RESULTS)):
        return
    try:
        records = read_results(out)
    except UsageError:
        return   # a cut results.jsonl: the resume rebuilds it from the checkpoints
    runs = {(str(r.get("strategy")), r.get("trial")) for r in records if isinstance(r, dict)}
    missing = sorted((s, t) for s, t in runs if isinstance(t, int) and not os.path.isfile(checkpoint_path(out, s, t)))
    if missing:
        shown = ", ".join(f"{s} trial {t}" for s, t in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UsageError(
            f"--resume: {out}/results.jsonl holds records of {shown}, but their checkpoints "
            f"({out}/{CHECKPOINTS}/<strategy>/trial<t>.pt) are missing, and a run continues from its "
            "checkpoint; restore the checkpoints folder, or start a new run in another --out")


def load_trial_state(out: str, strategy: str, trial: int) -> dict | None:
    """(``strategy``, ``trial``)'s saved state (its checkpoint), or None when there is none yet.
    UsageError naming the file when it cannot be read or is not that (strategy, trial)'s checkpoint."""
    path = checkpoint_path(out, strategy, trial)
    if not os.path.exists(path):
        return None
    state = load_torch_file(path, what="the checkpoint", fix=RESTORE, weights_only=False)
    _check_checkpoint(state, path, strategy, trial)
    return state


def _check_checkpoint(state, path: str, strategy: str, trial: int) -> None:
    """``state`` is a checkpoint of (``strategy``, ``trial``): every key, and the records of its
    cycles 1..cycle, each once, all of that strategy and trial."""
    if not isinstance(state, dict):
        raise UsageError(f"--resume: {path} holds a {type(state).__name__}, not a checkpoint of the al loop; {RESTORE}")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise UsageError(f"--resume: {path} is not a checkpoint of the al loop (it lacks {', '.join(missing)}); "
                         f"{RESTORE}")
    records, cycle = state["records"], state["cycle"]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records) or not isinstance(cycle, int):
        raise UsageError(f"--resume: {path} is a damaged checkpoint (its cycle or records are not what the al loop "
                         f"writes); {RESTORE}")
    others = sorted({(str(r.get("strategy")), str(r.get("trial"))) for r in records} - {(strategy, str(trial))})
    if others:
        s, t = others[0]
        raise UsageError(f"--resume: {path} holds the records of {s} trial {t}, not of {strategy} trial {trial}: a "
                         f"copy of another checkpoint? Move it out of {os.path.dirname(os.path.dirname(path))}, or "
                         f"{RESTORE}")
    cycles = [r.get("cycle") for r in records]
    if cycles != list(range(1, cycle + 1)):
        raise UsageError(f"--resume: {path} holds records of cycles {cycles} after {cycle} cycle(s) done (each cycle "
                         f"once, in order, is what the al loop writes); {RESTORE}")


def load_all_records(out: str, strategies: list[str], trials: int) -> dict[tuple[str, int], list[dict]]:
    """The records of every (strategy, trial) of the run that has a checkpoint (the checkpoints are
    the source of truth): checkpoints/<strategy>/trial<t>.pt for ``strategies`` and t in 1..``trials``.
    Anything else in checkpoints/ (a .DS_Store, a backup copy) is not read."""
    found: dict[tuple[str, int], list[dict]] = {}
    for strategy in strategies:
        for trial in range(1, trials + 1):
            state = load_trial_state(out, strategy, trial)
            if state is not None:
                found[(strategy, trial)] = state["records"]
    return found
