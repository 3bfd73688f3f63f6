"""Per-sample losses whose parameter gradients the engine measures: logits [B, C] -> loss [B].

Every function here is applied row by row (no mixing across samples), so the gradient of
``loss.sum()`` with respect to a layer's output splits into independent per-sample parts.

Label-free scores take the logits alone; label-aware ones (``cross_entropy``, or a callable of
two required positional arguments) take ``(logits, targets)``, each sample's label read from
the loader (README: ``label_key``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import LabelError, SingleLogitError

ScoreFn = Callable[..., torch.Tensor]   # logits [B, C] (, targets [B]) -> per-sample loss [B]


def check_classes(logits: torch.Tensor) -> None:
    """The built-in scores need two or more classes: over one logit the softmax is constant."""
    if logits.shape[-1] < 2:
        raise SingleLogitError(
            f"the model gives {logits.shape[-1]} logit per sample: a softmax over one class is constant, so "
            "every score would be 0 and the ranking meaningless. For a binary classifier with one logit z, "
            "pass logits_fn=lambda out: torch.cat([torch.zeros_like(out), out], dim=1) (two classes with "
            "probabilities 1 - sigmoid(z) and sigmoid(z), the model's own), or a score= callable of your own")


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16 and bf16 logits in float32 (a softmax and its log in half precision lose the small
    probabilities); other dtypes as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(x) = -sum_c p_c log p_c with p = softmax(logits), natural log, in nats.  [B, C] -> [B]

    Computed from log_softmax, so it is finite for any finite logits.
    """
    check_classes(logits)
    logp = F.log_softmax(at_least_fp32(logits), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy exactly as the public LPLgrad / Ent-GradNorm code computes it:
    ``Categorical(probs=softmax(logits)).entropy()``, which clamps p to [eps, 1 - eps]
    (eps = the dtype's machine epsilon) before the log.  [B, C] -> [B]
    """
    check_classes(logits)
    x = at_least_fp32(logits)
    p = F.softmax(x, dim=-1)
    eps = torch.finfo(p.dtype).eps
    logp = p.clamp(min=eps, max=1 - eps).log()
    return -(p * logp).sum(dim=-1)


def pseudo_label_ce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the model's own argmax label (the label is a constant).  [B, C] -> [B]"""
    check_classes(logits)
    x = at_least_fp32(logits)
    target = x.detach().argmax(dim=-1)
    return F.cross_entropy(x, target, reduction="none")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against each sample's true label (GraNd's score).  [B, C], [B] -> [B]

    The labels must be class indices 0..C-1 (LabelError otherwise: torch's cross_entropy would
    score a label -100, its ignore_index, 0 without a word). Inside torch.func's transforms (the
    vmap backend) a sample's label cannot be looked at: that backend checks the chunk's labels
    first (check_labels).
    """
    check_classes(logits)
    x = at_least_fp32(logits)
    targets = targets.to(x.device)
    if not torch._C._functorch.is_functorch_wrapped_tensor(targets):
        check_labels(targets, x.shape[-1])
    return F.cross_entropy(x, targets.long(), reduction="none")


def check_labels(targets: torch.Tensor, num_classes: int) -> None:
    """LabelError unless ``targets`` [B] are class indices 0..num_classes-1 (integers, or whole floats)."""
    fix = ("drop the samples without a label from the pool (or score them with a label-free score such as "
           "'entropy'), or give the model one logit per class")
    if targets.dim() != 1:
        raise LabelError(f"cross_entropy takes one class index per sample (labels [B]), but the labels have shape "
                         f"{tuple(targets.shape)}: one-hot or soft labels? Pass their class indices "
                         "(labels.argmax(dim=1)), or a score=(logits, targets) callable of your own")
    bad = (targets < 0) | (targets >= num_classes)
    if targets.is_floating_point():
        bad |= targets != targets.round()
    if bool(bad.any()):
        values = sorted({v for v in targets[bad].tolist()}, key=str)
        shown = ", ".join(map(str, values[:5])) + (" ..." if len(values) > 5 else "")
        ignored = " (-100 is torch's ignore_index, which would score those samples 0)" if -100 in values else ""
        raise LabelError(f"cross_entropy needs labels that are class indices 0..{num_classes - 1} of the model's "
                         f"{num_classes} logits, but {int(bad.sum())} label(s) are {shown}{ignored}; {fix}")


SCORES: dict[str, ScoreFn] = {
    "entropy": entropy,
    "categorical_entropy": categorical_entropy,
    "pseudo_label_ce": pseudo_label_ce,
    "cross_entropy": cross_entropy,
}


@dataclass(frozen=True)
class Score:
    """A resolved score: ``fn`` and whether it reads labels (``fn(logits, targets)``)."""

    fn: ScoreFn
    needs_targets: bool
    name: str

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if not self.needs_targets:
            return self.fn(logits)
        if targets is None:
            raise ValueError(f"score {self.name} needs each sample's label, and none came with the inputs")
        return self.fn(logits, targets)


def takes_targets(fn: Callable) -> bool:
    """Whether a callable score reads labels: two or more required positional parameters."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 2


def resolve_score(score: str | ScoreFn | Score) -> Score:
    if isinstance(score, Score):
        return score
    if callable(score):
        return Score(score, takes_targets(score), getattr(score, "__qualname__", type(score).__name__))
    try:
        return Score(SCORES[score], takes_targets(SCORES[score]), repr(score))
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown score {score!r}; choose one of {sorted(SCORES)} or pass a callable "
            "logits [B, C] -> per-sample loss [B], or (logits [B, C], targets [B]) -> [B] for a label-aware one"
        ) from None
