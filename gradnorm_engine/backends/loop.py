"""The reference: one forward and one backward per sample, exactly as the public LPLgrad code.

Slow by design; every fast backend is tested against it.
"""
from __future__ import annotations

import torch

from ..inputs import ModelInputs
from ..job import Objective, measure_only
from .base import Backend


class LoopBackend(Backend):
    name = "loop"

    def chunk_size(self, example: torch.Tensor) -> int:
        return int(self.job.options.get("chunk_size") or 64)

    def sqnorms_per_loss(self, x: ModelInputs | torch.Tensor, objective: Objective | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        job = self.job
        x = ModelInputs.of(x)
        params = [p for _, p in job.params]
        out, weights = None, []
        with measure_only(job):  # a measured parameter with requires_grad=False is still measured
            for i in range(len(x)):
                losses, w = job.objective_losses(x[i : i + 1], objective)      # (1, K)
                if out is None:
                    out = torch.zeros(len(x), losses.shape[1], len(params), dtype=job.accum_dtype,
                                      device=x.device)
                weights.append(w)
                if not losses.requires_grad:
                    continue  # the losses do not depend on any parameter: every norm is 0
                for k in range(losses.shape[1]):
                    grads = torch.autograd.grad(losses[0, k], params, allow_unused=True,
                                                retain_graph=k < losses.shape[1] - 1)
                    for j, g in enumerate(grads):
                        if g is not None:
                            out[i, k, j] = g.to(job.accum_dtype).pow(2).sum()
        return out, (None if objective is None else torch.cat(weights))
