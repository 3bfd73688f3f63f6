"""The contract every backend keeps: a chunk of inputs in, per-parameter squared norms out."""
from __future__ import annotations

import torch

from ..inputs import ModelInputs
from ..job import Objective, ScoringJob


class Backend:
    """One way of getting per-sample gradient norms.

    ``sqnorms(x)`` takes a chunk of inputs x [B, ...] already on ``job.device`` (``ModelInputs``,
    or one input tensor) and returns
    [B, P] in ``job.accum_dtype``, where column j is ||d loss_i / d theta_j||^2 for the j-th
    parameter of ``job.params``. ``sqnorms_per_loss(x, objective)`` does the same for the K losses
    of an objective (job.Objective) from one forward: ([B, K, P], weights [B, K]). The backend may
    keep state between chunks (hooks, compiled functions) and releases it in ``close``; it never
    changes a parameter, buffer or ``.grad``.
    """

    name: str = "?"

    def __init__(self, job: ScoringJob):
        self.job = job

    def chunk_size(self, example: ModelInputs | torch.Tensor) -> int:
        """How many samples to put in one chunk, given one sample ``example`` [1, ...]."""
        return int(self.job.options.get("chunk_size") or 256)

    def sqnorms(self, x: ModelInputs | torch.Tensor) -> torch.Tensor:
        return self.sqnorms_per_loss(x, None)[0][:, 0]

    def sqnorms_per_loss(self, x: ModelInputs | torch.Tensor, objective: Objective | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
