"""Random sampling: ``budget`` samples drawn uniformly without replacement from the subset."""
from __future__ import annotations

import torch

from .base import QueryContext, Strategy, register_strategy


@register_strategy
class RandomSampling(Strategy):
    name = "random"
    uses_lossnet = False

    def select(self, context: QueryContext, budget: int) -> torch.Tensor:
        order = torch.randperm(context.subset.numel(), generator=context.generator)[:budget]
        return context.subset[order]
