"""Per-sample losses whose parameter gradients the engine measures: logits [B, C] -> loss [B].

Every function here is applied row by row (no mixing across samples), so the gradient of
``loss.sum()`` with respect to a layer's output splits into independent per-sample parts.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import SingleLogitError

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def check_classes(logits: torch.Tensor) -> None:
    """The built-in scores need two or more classes: over one logit the softmax is constant."""
    if logits.shape[-1] < 2:
        raise SingleLogitError(
            f"the model gives {logits.shape[-1]} logit per sample: a softmax over one class is constant, so "
            "every score would be 0 and the ranking meaningless. For a binary classifier with one logit z, "
            "pass logits_fn=lambda out: torch.cat([torch.zeros_like(out), out], dim=1) (two classes with "
            "probabilities 1 - sigmoid(z) and sigmoid(z), the model's own), or a score= callable of your own")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(x) = -sum_c p_c log p_c with p = softmax(logits), natural log, in nats.  [B, C] -> [B]

    Computed from log_softmax, so it is finite for any finite logits.
    """
    check_classes(logits)
    logp = F.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy exactly as the public LPLgrad / Ent-GradNorm code computes it:
    ``Categorical(probs=softmax(logits)).entropy()``, which clamps p to [eps, 1 - eps]
    (eps = the dtype's machine epsilon) before the log.  [B, C] -> [B]
    """
    check_classes(logits)
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    p = F.softmax(x, dim=-1)
    eps = torch.finfo(p.dtype).eps
    logp = p.clamp(min=eps, max=1 - eps).log()
    return -(p * logp).sum(dim=-1)


def pseudo_label_ce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the model's own argmax label (the label is a constant).  [B, C] -> [B]"""
    check_classes(logits)
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
