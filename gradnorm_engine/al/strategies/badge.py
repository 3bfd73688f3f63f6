"""BADGE (Ash et al., ICLR 2020): k-means++ seeding on last-layer gradient embeddings.

Training: cross-entropy only. Query: each subset sample's gradient embedding is the gradient
of the cross-entropy against its own prediction with respect to the weight of the layer that
produces the logits, (p - e_yhat) h^T; the ``budget`` picks are k-means++ seeds over those
embeddings (diverse and uncertain at once). The engine computes the distances factorised
(gradnorm_engine.badge), never the [|S|, C x D] embeddings; the random draws come from the
trial's query generator, so a run and its resume pick alike.
"""
from __future__ import annotations

import torch

from ...badge import badge
from .base import QueryContext, Strategy, register_strategy


@register_strategy
class Badge(Strategy):
    name = "badge"
    uses_lossnet = False

    def select(self, context: QueryContext, budget: int) -> torch.Tensor:
        positions = badge(context.model, context.loader(context.subset), budget, generator=context.generator,
                          device=context.device, progress=context.progress)
        return context.subset[positions]
