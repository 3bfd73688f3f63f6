"""Which device a call, a command, a benchmark or the AL loop runs on, from what the user typed.

    check_device("cuda")                  # -> torch.device, or UsageError in one line with the fix
    resolve_device(args.device)           # the command line's --device: None/"auto" picks one
"""
from __future__ import annotations

import torch

from .errors import UsageError

VALID_FORMS = "'cpu', 'cuda', 'cuda:N' (N a GPU index), 'mps', or a torch.device"


def check_device(device: str | torch.device | int, flag: str | None = None) -> torch.device:
    """``torch.device(device)``, refused in one line (UsageError) where it names no device type, or a
    CUDA (MPS) device where there is none. ``flag``: the command-line option that gave it ("--device"),
    so the message names it as typed; without one it reads as the keyword ``device=``."""
    said = f"{flag} {device}" if flag else f"device={str(device) if isinstance(device, torch.device) else device!r}"
    unset = f"leave {flag} unset" if flag else "leave device unset"
    cpu = f"{flag} cpu" if flag else "device='cpu'"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        forms = "cpu, cuda, cuda:N (N a GPU index) or mps" if flag else VALID_FORMS
        raise UsageError(f"unknown device {said}; use {forms}, or {unset}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{said} but CUDA is not available on this machine (torch.cuda.is_available() is "
                             f"False); pass {cpu} or {unset}")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise UsageError(f"{said} but this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}; "
                             f"pass one of those, or {unset}")
    if resolved.type == "meta":
        raise UsageError(f"{said} holds no data: the model moved there would lose its weights and no score can be "
                         f"computed; pass {cpu}, a GPU, or {unset}")
    backend = getattr(torch, resolved.type, None) if resolved.type not in ("cpu", "cuda", "mps") else None
    if backend is not None and callable(getattr(backend, "is_available", None)) and not backend.is_available():
        raise UsageError(f"{said} but {resolved.type} is not available on this machine (torch.{resolved.type}"
                         f".is_available() is False); pass {cpu} or {unset}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{said} but MPS is not available on this machine (torch.backends.mps.is_available() "
                         f"is False); pass {cpu} or {unset}")
    return resolved


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto": CUDA when available, else CPU; "cuda" means the current CUDA device
    (``cuda:N`` with its index). An unusable name -> UsageError naming the fix (``check_device``)."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = check_device(device, "--device")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved
