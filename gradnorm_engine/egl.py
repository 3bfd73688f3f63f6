"""Expected gradient length (Settles et al., 2008): the gradient norm a label would bring, in
expectation over the model's own prediction.

    egl = expected_gradient_length(model, loader)              # -> [N], pool order
    egl = expected_gradient_length(model, loader, top_m=3)     # only the 3 likeliest classes

    EGL(x) = sum_c p_c(x) || d CE(f(x), c) / d theta ||        (p = softmax of the logits)

exactly, per sample, for any model the engine scores: one forward per chunk, then one backward
(with its per-layer rules) per class, so EGL costs about C backward passes where the entropy
score costs one; ``top_m=m`` sums only the m most probable classes of each sample, m backward
passes. What that leaves out is bounded by the probability mass it drops:

    EGL_m(x) <= EGL(x) <= EGL_m(x) + (1 - P_m(x)) * max_c || d CE(f(x), c) / d theta ||,

with P_m the m largest probabilities' sum: for a confident model a small m is close to exact.
``norm`` is as elsewhere: "frobenius" (the gradient's norm) or "tensor_sum" (the sum of each
parameter tensor's norm), taken per class before the expectation.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .api import score_each_sample
from .reduction import check_norm, reduce_sqnorms
from .scores import at_least_fp32, check_classes


def class_cross_entropies(top_m: int | None = None):
    """The objective of EGL: logits [B, C] -> (CE against each of the m likeliest classes [B, m],
    their probabilities [B, m]); every class when ``top_m`` is None."""

    def objective(logits: torch.Tensor, _targets=None) -> tuple[torch.Tensor, torch.Tensor]:
        check_classes(logits)
        logp = F.log_softmax(at_least_fp32(logits), dim=1)
        m = logits.shape[1] if top_m is None else min(top_m, logits.shape[1])
        probs, classes = logp.detach().exp().topk(m, dim=1)          # (B, m), likeliest first
        return -logp.gather(1, classes), probs

    return objective


def expected_gradient_length(model: nn.Module, loader: Iterable, *, top_m: int | None = None,
                             norm: str = "frobenius", distributed: bool | None = None, **options) -> torch.Tensor:
    """sum_c p_c(x) || d CE(f(x), c) / d theta || for every sample, in pool order.  -> [N]

    Takes score_pool's keyword options but ``score`` (EGL's losses are the classes'
    cross-entropies); ``top_m`` limits the sum to each sample's m likeliest classes (module
    docstring: what it costs and what it bounds).
    """
    if "score" in options:
        raise TypeError("expected_gradient_length differentiates the cross-entropy of every class, so score= does "
                        "not apply; drop it (score_pool takes score=)")
    check_norm(norm)
    if top_m is not None and (isinstance(top_m, bool) or not isinstance(top_m, int) or top_m < 1):
        raise ValueError(f"top_m must be a positive number of classes, got {top_m!r}")
    objective = class_cross_entropies(top_m)

    def per_chunk(engine, x) -> torch.Tensor:
        sq, probs = engine.sqnorms_per_loss(x, objective)            # (B, m, P), (B, m)
        batch, m, p = sq.shape
        per_class = reduce_sqnorms(sq.reshape(batch * m, p), norm).reshape(batch, m)
        return (probs.to(per_class.dtype) * per_class).sum(dim=1)

    return score_each_sample(model, loader, {**options, "norm": norm}, distributed, per_chunk=per_chunk,
                             what=f"expected gradient length, top_m={top_m}")
