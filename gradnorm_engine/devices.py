"""Which device a command, a benchmark or the AL loop runs on, from what the user typed."""
from __future__ import annotations

import torch

from .errors import UsageError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto": CUDA when available, else CPU; "cuda" means the current CUDA device
    (``cuda:N`` with its index). An unusable name -> UsageError naming the fix."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device} asked for, but CUDA is not available here; use --device cpu")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved
