"""Expected gradient length (Settles et al., 2008): query the samples whose label would change the
model most, in expectation over its own prediction.

Training: cross-entropy only. Query: score(x) = sum_c p_c(x) || d CE(f(x), c) / d theta || over
the model's trainable parameters, exactly and batched by the engine
(``gradnorm_engine.expected_gradient_length``: one forward per chunk, one backward per class);
the ``budget`` largest scores are picked, ties by the lower position. ``norm`` as for
Ent-GradNorm ("tensor_sum" by default, the reference code's convention; "frobenius").
"""
from __future__ import annotations

import torch

from ...egl import expected_gradient_length
from .base import QueryContext, Strategy, register_strategy


@register_strategy
class ExpectedGradientLength(Strategy):
    name = "egl"
    uses_lossnet = False
    option_names = ("norm", "backend")

    def __init__(self, norm: str = "tensor_sum", backend: str = "auto"):
        super().__init__(norm=norm, backend=backend)
        self.norm, self.backend = norm, backend

    def select(self, context: QueryContext, budget: int) -> torch.Tensor:
        scores = expected_gradient_length(context.model, context.loader(context.subset), norm=self.norm,
                                          backend=self.backend, device=context.device, progress=context.progress)
        return self.top_by_score(context, scores, budget)

    def record_fields(self) -> dict:
        return {"norm": self.norm, "backend": self.backend}
