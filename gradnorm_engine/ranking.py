"""The one ranking rule of the project: highest score first, ties by the lower position."""
from __future__ import annotations

import torch


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
