"""Per-sample sums of squares over many tensors: the vmap backend's reduction.

    out[b]    = sum_t sum_{i} tensors[t][b, i]^2          (per_tensor=False, shape [B])
    out[b, t] = sum_{i} tensors[t][b, i]^2                (per_tensor=True,  shape [B, T])

Accumulated in float32 (float64 stays float64).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def _accum_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check(tensors: Sequence[torch.Tensor]) -> int:
    if len(tensors) == 0:
        raise ValueError("per_sample_sumsq needs at least one tensor")
    batch = tensors[0].shape[0] if tensors[0].dim() > 0 else None
    for t in tensors:
        if t.dim() == 0 or t.shape[0] != batch:
            raise ValueError("every tensor must be shaped [B, ...] with the same B; got shapes "
                             f"{[tuple(t.shape) for t in tensors]}")
        if not t.is_floating_point():
            raise TypeError(f"per_sample_sumsq takes floating-point tensors, got {t.dtype}")
    return batch


def per_sample_sumsq_reference(tensors: Sequence[torch.Tensor], per_tensor: bool = False) -> torch.Tensor:
    """Plain torch: one reshape and square-sum per tensor."""
    batch = _check(tensors)
    acc = _accum_dtype(tensors)
    cols = [t.reshape(batch, -1).to(acc).pow(2).sum(dim=1) for t in tensors]  # each [B]
    out = torch.stack(cols, dim=1)                                             # [B, T]
    return out if per_tensor else out.sum(dim=1)


def per_sample_sumsq(tensors: Sequence[torch.Tensor], per_tensor: bool = False, impl: str = "auto") -> torch.Tensor:
    """[B, ...] tensors -> float32 [B] (or [B, len(tensors)] with ``per_tensor=True``)."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    return per_sample_sumsq_reference(list(tensors), per_tensor=per_tensor)
