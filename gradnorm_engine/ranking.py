"""The one ranking rule of the project: highest score first, ties by the lower position.

    best_positions(scores, k)            # -> LongTensor [min(k, n)]
    top_k(scores, k)                     # -> RankResult of a score vector [N]
    merge_top_k(scores, positions, k)    # several candidate lists -> the k best, same rule
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RankResult:
    """The ``k`` highest-scoring samples, best first (ties: lower pool position first)."""

    indices: torch.Tensor  # LongTensor [k], pool positions 0..N-1 in loader order
    scores: torch.Tensor   # FloatTensor [k], their scores
    pool_size: int         # N, how many samples were scored
    backend: str           # the backend that computed the scores
    norm: str              # "frobenius" or "tensor_sum"

    def __len__(self) -> int:
        return int(self.indices.numel())


def best_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the best min(k, n) of scores [n], highest first, ties by lower position.  -> [min(k, n)]

    The order of a stable sort of -scores, without sorting all n: every score above the k-th
    largest value, and every score equal to it, is a candidate (in position order, from
    nonzero); a stable sort of the few candidates finishes the job. NaN raises ValueError.
    """
    nan = torch.isnan(scores)
    if bool(nan.any()):   # NaN compares false with everything: it would drop or misplace samples
        where = nan.nonzero().flatten()
        shown = ", ".join(str(int(i)) for i in where[:20]) + (" ..." if where.numel() > 20 else "")
        raise ValueError(f"{where.numel()} score(s) are NaN, at positions {shown}; NaN cannot be ranked: "
                         "check the model (a diverged training run?) or those samples")
    k = min(k, scores.numel())
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    kth = torch.topk(scores, k, sorted=False).values.min()
    candidates = (scores >= kth).nonzero().flatten()
    return candidates[torch.sort(-scores[candidates], stable=True).indices[:k]]


def check_k(k) -> int:
    """k as an int: Python, numpy and 0-d torch integers are taken; bools and floats refused."""
    is_bool = isinstance(k, bool) or type(k).__name__ == "bool_" or \
        (isinstance(k, torch.Tensor) and k.dtype == torch.bool)
    try:
        value = None if is_bool else operator.index(k)
    except TypeError:
        value = None
    if value is None:
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if value <= 0:
        raise ValueError(f"k must be at least 1, got {value}")
    return value


def check_k_fits(k: int, pool_size: int) -> None:
    if k > pool_size:
        raise ValueError(f"k = {k} is larger than the pool ({pool_size} samples); ask for at most {pool_size}")


def top_k(scores: torch.Tensor, k: int, *, backend: str = "?", norm: str = "frobenius") -> RankResult:
    """Rank a score vector [N]: highest first, ties by lower position."""
    k = check_k(k)
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a 1-D tensor [N] of one score per sample, got {shape}")
    check_k_fits(k, scores.numel())
    order = best_positions(scores, k)
    return RankResult(indices=order, scores=scores[order], pool_size=scores.numel(), backend=backend, norm=norm)


def merge_top_k(scores: Sequence[torch.Tensor], positions: Sequence[torch.Tensor], k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of several candidate lists: highest score first, ties by lower position.

    scores[r], positions[r]: [k_r] candidates of list r (pool positions are distinct).
    -> (scores [min(k, sum k_r)], positions [same]), the same order ``top_k`` gives.
    """
    s = torch.cat(list(scores))
    p = torch.cat(list(positions))
    by_position = torch.argsort(p)
    s, p = s[by_position], p[by_position]
    best = best_positions(s, k)
    return s[best], p[best]
