"""Per-sample losses whose parameter gradients the engine measures: logits [B, C] -> loss [B].

Every function here is applied row by row (no mixing across samples), so the gradient of
``loss.sum()`` with respect to a layer's output splits into independent per-sample parts.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(x) = -sum_c p_c log p_c with p = softmax(logits), natural log, in nats.  [B, C] -> [B]

    Computed from log_softmax, so it is finite for any finite logits.
    """
    logp = F.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy exactly as the public LPLgrad / Ent-GradNorm code computes it:
    ``Categorical(probs=softmax(logits)).entropy()``, which clamps p to [eps, 1 - eps]
    (eps = the dtype's machine epsilon) before the log.  [B, C] -> [B]
    """
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    p = F.softmax(x, dim=-1)
    eps = torch.finfo(p.dtype).eps
    logp = p.clamp(min=eps, max=1 - eps).log()
    return -(p * logp).sum(dim=-1)


def pseudo_label_ce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the model's own argmax label (the label is a constant).  [B, C] -> [B]"""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    target = x.detach().argmax(dim=-1)
    return F.cross_entropy(x, target, reduction="none")


SCORES: dict[str, ScoreFn] = {
    "entropy": entropy,
    "categorical_entropy": categorical_entropy,
    "pseudo_label_ce": pseudo_label_ce,
}


def resolve_score(score: str | ScoreFn) -> ScoreFn:
    if callable(score):
        return score
    try:
        return SCORES[score]
    except KeyError:
        raise ValueError(
            f"unknown score {score!r}; choose one of {sorted(SCORES)} or pass a callable "
            "logits [B, C] -> per-sample loss [B]"
        ) from None
