"""Learning Loss for Active Learning (Yoo & Kweon, CVPR 2019): query by LossNet's predicted loss.

Training as LPLgrad (main model + LossNet). Query: the ``budget`` subset samples with the largest
predicted loss l_hat(x).
"""
from __future__ import annotations

import torch

from .base import QueryContext, Strategy, register_strategy


@register_strategy
class LearningLoss(Strategy):
    name = "learning-loss"
    uses_lossnet = True

    def select(self, context: QueryContext, budget: int) -> torch.Tensor:
        return self.top_by_score(context, context.predicted_losses(context.subset), budget)
