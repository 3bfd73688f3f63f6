"""Ent-GradNorm (Wang et al., AAAI 2022): query by the norm of the entropy's parameter gradient.

Training: cross-entropy only. Query: for every x in the subset S, score(x) = || dH(x)/d theta ||
with H the softmax entropy of the eval-mode model and theta all its trainable parameters; the
``budget`` largest scores are picked. The scores come from the engine
(``gradnorm_engine.rank_unlabeled``); ``norm="tensor_sum"`` (sum of each parameter tensor's L2
norm, the public reference code's convention) by default, ``norm="frobenius"`` on request.
"""
from __future__ import annotations

import torch

from ...api import rank_unlabeled
from .base import QueryContext, Strategy, register_strategy


@register_strategy
class EntGradNorm(Strategy):
    name = "ent-gradnorm"
    uses_lossnet = False
    option_names = ("norm", "backend", "score")

    def __init__(self, norm: str = "tensor_sum", backend: str = "auto", score: str = "entropy"):
        super().__init__(norm=norm, backend=backend, score=score)
        self.norm = norm
        self.backend = backend
        self.score = score
        self.last_backend: str | None = None  # which engine backend ran the last query

    def record_fields(self) -> dict:
        if self.last_backend is None:
            return {}
        return {"norm": self.norm, "score": self.score, "backend": self.last_backend}

    def select(self, context: QueryContext, budget: int) -> torch.Tensor:
        result = rank_unlabeled(context.model, context.loader(context.subset), k=budget, score=self.score,
                                norm=self.norm, backend=self.backend, device=context.device,
                                progress=context.progress)
        self.last_backend = result.backend
        return context.subset[result.indices.cpu()]
