"""What every query strategy shares: the ``Strategy`` base class, its ``QueryContext`` and the registry.

    strategy = make_strategy("lplgrad", norm="tensor_sum")
    strategy.uses_lossnet               # True: train the model jointly with LossNet
    picked = strategy.select(context, budget)   # LongTensor [budget], pool indices from context.subset

A strategy declares the training it needs (``uses_lossnet``) and, from the trained model(s) and
the candidate subset S, returns the ``budget`` pool indices to label. The loop reads only these
two things, so a new strategy is one small file plus one import line in ``__init__``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from ...errors import UsageError
from ...ranking import best_positions
from ..datasets import ImageTensors
from ..lossnet import LossNet, stage_taps
from ..trainer import autocast_for, to_model_layout


@dataclass
class QueryContext:
    """Everything a strategy may look at when it picks samples.

    ``labeled`` and ``subset`` are LongTensors of pool indices (positions in ``data``); ``subset``
    is the random candidate set S drawn from the unlabeled pool this cycle.
    """

    model: nn.Module
    data: ImageTensors
    labeled: torch.Tensor
    subset: torch.Tensor
    device: torch.device
    lossnet: LossNet | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    batch_size: int = 256
    progress: bool = False

    def loader(self, indices: torch.Tensor) -> DataLoader:
        """A DataLoader of normalised inputs [b, C, H, W] for ``indices``, in order, on ``device``."""
        return self.data.loader(indices, self.device, self.batch_size)

    @torch.no_grad()
    def _apply(self, indices: torch.Tensor, fn) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        if self.lossnet is not None:
            self.lossnet.eval()
        try:
            out = []
            for x in self.loader(indices):
                with autocast_for(self.device):
                    out.append(fn(to_model_layout(x, self.device)).float())
            return torch.cat(out)
        finally:
            self.model.train(was_training)

    def logits(self, indices: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits [n, K] (fp32, on ``device``)."""
        return self._apply(indices, self.model)

    def embeddings(self, indices: torch.Tensor) -> torch.Tensor:
        """Penultimate features [n, D] from ``model.embed`` (or the input of a torchvision ``fc``)."""
        embed = getattr(self.model, "embed", None)
        if not callable(embed) or isinstance(embed, nn.Module):
            embed = _fc_input(self.model)
        return self._apply(indices, embed)

    def predicted_losses(self, indices: torch.Tensor) -> torch.Tensor:
        """LossNet's predicted loss [n] for each sample (needs ``lossnet``)."""
        if self.lossnet is None:
            raise ValueError("this strategy needs a LossNet, but the model was trained without one")
        taps = stage_taps(self.model)
        lossnet = self.lossnet
        return self._apply(indices, lambda x: lossnet(taps(x)[1]))


def _fc_input(model: nn.Module):
    """x -> the input of ``model.fc`` (torchvision classifiers), captured by a forward hook."""
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Module):
        raise ValueError(f"{type(model).__name__} has no embed(x) method or fc layer to read penultimate "
                         "features from; add an embed(x) -> [B, D] method")
    captured: list[torch.Tensor] = []

    def run(x: torch.Tensor) -> torch.Tensor:
        handle = fc.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
        try:
            model(x)
        finally:
            handle.remove()
        return captured.pop().flatten(1)
    return run


class Strategy:
    """A query strategy: ``select(context, budget) -> LongTensor [budget]`` of pool indices.

    Class attributes the loop reads:
      name          the registry name (CLI, records)
      uses_lossnet  True: the model is trained jointly with LossNet; False: cross-entropy only
      option_names  the options the strategy takes (the loop passes each strategy only these;
                    any other option is refused)
    """

    name: ClassVar[str] = ""
    uses_lossnet: ClassVar[bool] = False
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options):
        self.check_options(options)
        self.options = options

    @classmethod
    def check_options(cls, options: dict) -> None:
        """UsageError naming the options ``cls`` does not take, and the ones it does."""
        unknown = sorted(set(options) - set(cls.option_names))
        if unknown:
            takes = ", ".join(cls.option_names) if cls.option_names else "no options"
            raise UsageError(f"strategy {cls.name!r} has no option {', '.join(map(repr, unknown))}; "
                             f"it takes {takes}")

    def select(self, context: QueryContext, budget: int) -> torch.Tensor:
        raise NotImplementedError

    def record_fields(self) -> dict:
        """What the last query adds to its cycle's record (the engine strategies: norm, backend)."""
        return {}

    def top_by_score(self, context: QueryContext, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """The ``budget`` subset members with the largest scores [len(subset)], ties by position."""
        order = best_positions(scores.detach().float().cpu(), budget)
        return context.subset[order]


STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    if cls.name in STRATEGIES:
        raise ValueError(f"strategy name {cls.name!r} is taken by {STRATEGIES[cls.name].__name__}")
    STRATEGIES[cls.name] = cls
    return cls


def make_strategy(name: str, **options) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise UsageError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}") from None
    cls.check_options(options)
    return cls(**options)
