"""The exact fallback of the hooks backend: vmap(grad) over a few parameters, or the loop."""
from __future__ import annotations

import torch

from ..inputs import ModelInputs
from ..job import Objective
from ..memory import is_out_of_memory
from .base import Backend
from .loop import LoopBackend
from .vmap import VmapBackend


class ExactFallback(Backend):
    """vmap(grad) over a few parameters; the per-sample loop if vmap cannot run the model.

    Runs the chunk in pieces of vmap's own chunk size: vmap holds one gradient per sample of
    every parameter it scores (a tied embedding can be large), the rules do not.
    """

    name = "hooks-fallback"

    def __init__(self, job):
        super().__init__(job)
        # vmap refuses some jobs up front (BatchNorm under autocast): those start on the loop
        self.engine: Backend = VmapBackend(job) if VmapBackend.supports(job) else LoopBackend(job)
        self.piece: int | None = None

    def sqnorms_per_loss(self, x: ModelInputs | torch.Tensor, objective: Objective | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = ModelInputs.of(x)
        if self.piece is None:
            self.piece = max(1, int(self.engine.chunk_size(x[:1])))
        # vmap holds K gradients per sample for K losses: pieces K times smaller (K from a first sample)
        piece = self.piece
        parts = []
        start = 0
        while start < len(x):
            part = self._run(x[start:start + piece], objective)
            parts.append(part)
            start += piece
            piece = max(1, self.piece // part[0].shape[1])
        sq = torch.cat([p[0] for p in parts])
        return sq, (None if objective is None else torch.cat([p[1] for p in parts]))

    def _run(self, x: ModelInputs, objective: Objective | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(self.engine, VmapBackend):
            try:
                return self.engine.sqnorms_per_loss(x, objective)
            except Exception as err:  # noqa: BLE001 - any vmap limitation; OOM goes up to halve the chunk
                if is_out_of_memory(err):
                    raise
                self.engine = LoopBackend(self.job)
        return self.engine.sqnorms_per_loss(x, objective)
