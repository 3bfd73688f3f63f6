"""Entropy sampling: the ``budget`` subset samples whose softmax prediction has the largest entropy
H(x) = -sum_c p_c log p_c (nats). Cross-entropy training only."""
from __future__ import annotations

import torch

from ...scores import entropy
from .base import QueryContext, Strategy, register_strategy


@register_strategy
class Entropy(Strategy):
    name = "entropy"
    uses_lossnet = False

    def select(self, context: QueryContext, budget: int) -> torch.Tensor:
        return self.top_by_score(context, entropy(context.logits(context.subset)), budget)
