"""LPLgrad (Gul et al., 2024): LossNet joint training + entropy-gradient-norm query.

Training: the main model and LossNet together (total = mean CE + lambda * ranking loss; see
``gradnorm_engine.al.trainer``), which shapes the model's features. Query: exactly Ent-GradNorm's
score || dH(x)/d theta || over the main model's parameters; LossNet is not used at query time.
"""
from __future__ import annotations

from .base import register_strategy
from .ent_gradnorm import EntGradNorm


@register_strategy
class LPLgrad(EntGradNorm):
    name = "lplgrad"
    uses_lossnet = True
