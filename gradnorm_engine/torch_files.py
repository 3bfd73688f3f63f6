"""Reading a torch.save file: the object it holds, or one line naming the file, the problem and the fix.

    state = load_torch_file(path, what="checkpoint", fix="save it with torch.save(model.state_dict(), path)")

torch.load fails on a truncated or damaged file with whatever error its damaged bytes lead to
(EOFError, UnpicklingError, IndexError, UnicodeDecodeError, a miniz RuntimeError, ...), none of
which names the file. Every failure here is a UsageError "cannot read <what> <path> (<why>); <fix>".
Used by ``gradnorm-engine rank --checkpoint`` and by the active-learning loop's checkpoints.
"""
from __future__ import annotations

import os
import pickle
import re
import tarfile
import zipfile
from typing import Any

import torch

from .errors import UsageError


# How the weights-only unpickler names an object it does not load.
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (.+?) was not an allowed global", re.S)


def is_torch_save_file(path: str) -> bool:
    """What torch.save writes: a zip archive, or (legacy formats) a pickle or a tar archive.

    Checked first because the unpicklers fail on arbitrary bytes with arbitrary errors.
    """
    with open(path, "rb") as f:
        if f.read(1) == b"\x80":  # a pickle (protocol 2 or newer)
            return True
    return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)


def load_torch_file(path: str, *, what: str, fix: str, weights_only: bool = True) -> Any:
    """The object torch.save wrote to ``path``, loaded onto the CPU (``weights_only``: tensors and
    plain containers only).  UsageError, one line naming ``path`` and ending in ``fix``, when the
    file is missing, unreadable, empty, not a torch.save file, damaged, or holds Python objects
    that ``weights_only`` refuses."""
    def refused(reason: str) -> UsageError:
        return UsageError(f"cannot read {what} {path} ({reason}); {fix}")

    if not os.path.exists(path):
        raise refused("it does not exist")
    if not os.path.isfile(path):
        raise refused("it is not a file")
    try:
        if os.path.getsize(path) == 0:
            raise refused("the file is empty")
        known_format = is_torch_save_file(path)
    except OSError as err:
        raise refused(f"{err.strerror or err}; check the path and its permissions") from None
    if not known_format:
        raise refused("not a torch.save file")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        found = _UNSUPPORTED_GLOBAL.search(str(err)) if weights_only else None
        if found:   # torch.save(model) and the like, or damaged bytes that read as a name
            name = " ".join(found.group(1).split())[:80]
            raise refused(f"it holds Python objects ({name}), not only tensors: a whole pickled model, or a "
                          "damaged file?") from None
        raise refused(_damaged(err)) from None
    except Exception as err:  # noqa: BLE001 - damaged bytes make the unpickler fail in any way
        raise refused(_damaged(err)) from None


def _damaged(err: Exception) -> str:
    """Why a damaged file failed: the error's type and its first sentence, in one short line."""
    first = " ".join(str(err).split()).split(". ")[0]
    if len(first) > 100:
        first = first[:97] + "..."
    return f"a truncated or damaged torch.save file: {type(err).__name__}" + (f": {first}" if first else "")
