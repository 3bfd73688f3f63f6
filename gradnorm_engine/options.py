"""The keyword options of ``score_pool`` and ``rank_unlabeled``, checked once, by one object.

    options = ScoringOptions.from_kwargs({"norm": "tensor_sum", "backend": "hooks"})
    job = options.make_job(model)   # the resolved run: measured parameters, loss, device, precision

The single-process stream and the sharded path both take a ``ScoringOptions``: whatever is wrong
with an option is found here, before any sample is read, and found the same way on every path.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .backends import check_backend_name
from .devices import check_device
from .inputs import InputReader
from .job import ScoringJob, make_job
from .reduction import check_norm
from .scores import ScoreFn


@dataclass(frozen=True)
class ScoringOptions:
    """Every option of a scoring call, with its default (README: Options)."""

    score: str | ScoreFn = "entropy"
    norm: str = "frobenius"
    backend: str = "auto"
    params: Iterable | None = None
    logits_fn: Callable[[Any], torch.Tensor] | None = None
    input_key: str | None = None
    input_keys: Sequence[str] | None = None
    exclude_keys: Sequence[str] = ()
    num_inputs: int = 1
    label_key: str | int | None = None
    device: str | torch.device | None = None
    autocast: str | None = None
    max_memory: int | None = None
    chunk_size: int | None = None
    progress: bool = True

    def __post_init__(self):
        check_norm(self.norm)
        check_backend_name(self.backend)
        if self.device is not None:
            check_device(self.device)   # an unknown name or a missing CUDA, in one line before any sample is read
        if self.chunk_size is not None and self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive number of samples, got {self.chunk_size}")
        for name in ("input_keys", "exclude_keys"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        self.input_reader(None)   # the input options' own checks
        if self.params is not None and not isinstance(self.params, (str, torch.Tensor)):
            # read more than once (the sharded path checks, then scores): a generator would be spent
            object.__setattr__(self, "params", tuple(self.params))

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_kwargs(cls, options: dict) -> ScoringOptions:
        """The options of a call; an unknown name raises TypeError listing the valid ones."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; score_pool/rank_unlabeled take "
                            f"{sorted(cls.names() + ['distributed'])}")
        return cls(**options)

    def make_job(self, model: nn.Module) -> ScoringJob:
        """The resolved run for ``model``; raises on a model, parameter list or score it cannot take."""
        return make_job(model, score=self.score, params=self.params, logits_fn=self.logits_fn,
                        device=self.device, autocast=self.autocast, max_memory=self.max_memory,
                        options={"chunk_size": self.chunk_size} if self.chunk_size else None)

    def input_reader(self, model: nn.Module | None, needs_targets: bool = False) -> InputReader:
        """How this call reads its loader's batches into ``model``'s inputs (and labels, when
        the score reads them)."""
        return InputReader(model, input_key=self.input_key, input_keys=self.input_keys,
                           exclude_keys=self.exclude_keys, num_inputs=self.num_inputs, label_key=self.label_key,
                           needs_targets=needs_targets)

    def digest(self) -> dict:
        """The options every rank of a sharded call must share (device aside: each rank has its own)."""
        score = self.score if isinstance(self.score, str) else getattr(self.score, "__qualname__",
                                                                       type(self.score).__name__)
        return {"norm": self.norm, "score": score, "backend": self.backend, "chunk_size": self.chunk_size,
                "autocast": self.autocast, "input_key": self.input_key, "input_keys": self.input_keys,
                "exclude_keys": self.exclude_keys, "num_inputs": self.num_inputs, "label_key": self.label_key}
