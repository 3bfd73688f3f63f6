"""The reference: one forward and one backward per sample, exactly as the public LPLgrad code.

Slow by design; every fast backend is tested against it.
"""
from __future__ import annotations

import torch

from ..inputs import ModelInputs
from ..job import measure_only
from .base import Backend


class LoopBackend(Backend):
    name = "loop"

    def chunk_size(self, example: torch.Tensor) -> int:
        return int(self.job.options.get("chunk_size") or 64)

    def sqnorms(self, x: ModelInputs | torch.Tensor) -> torch.Tensor:
        job = self.job
        x = ModelInputs.of(x)
        params = [p for _, p in job.params]
        out = torch.zeros(len(x), len(params), dtype=job.accum_dtype, device=x.device)
        with measure_only(job):  # a measured parameter with requires_grad=False is still measured
            for i in range(len(x)):
                loss = job.losses(x[i : i + 1])[0]
                if not loss.requires_grad:
                    continue  # the loss does not depend on any parameter: every norm is 0
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for j, g in enumerate(grads):
                    if g is not None:
                        out[i, j] = g.to(job.accum_dtype).pow(2).sum()
        return out
