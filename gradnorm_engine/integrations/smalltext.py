"""small-text query strategies: label the unlabeled texts with the largest gradient norms (or
expected gradient lengths, or BADGE's picks).

    from small_text import PoolBasedActiveLearner
    from gradnorm_engine.integrations.smalltext import GradNormSampling

    learner = PoolBasedActiveLearner(clf_factory, GradNormSampling(), train_set)
    learner.initialize_data(initial_indices, train_set.y[initial_indices])
    picked = learner.query(num_samples=20)       # dataset indices, highest score first

The strategy scores the unlabeled part of the dataset with ``gradnorm_engine.score_pool`` on
the classifier's torch model (``clf.model``), reading it through the classifier's own collate
function, so it sees the inputs the classifier trains and predicts on: padded token ids for
small-text's PyTorch classifiers (KimCNN), ids and attention mask for its transformers
classifier (passed as ``input_ids=`` and ``attention_mask=``). It
returns the ``n`` indices with the largest scores, highest first, ties by the lower position
in ``indices_unlabeled``; ``scores_`` holds every unlabeled instance's score, in the order of
``indices_unlabeled``. Keyword options of the strategy (``score=``, ``norm=``, ``backend=``,
...) go to ``score_pool``.

``ExpectedGradientLengthSampling`` is the same with ``expected_gradient_length`` (exact and
batched, unlike small-text's own ``ExpectedGradientLength``: see its docstring);
``BadgeSampling`` returns ``badge(clf.model, unlabeled, n)``'s picks, seeded by ``seed=``
(default 0) or ``generator=``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..api import score_pool, top_k
from ._requirements import require
from ..egl import expected_gradient_length
from ._strategies import DEFAULT_SEED, badge_generator, badge_picks

_strategies = require("small_text.query_strategies", distribution="small-text", adapter="smalltext")
_data = require("small_text.integrations.pytorch.utils.data", distribution="small-text", adapter="smalltext")

DEFAULT_BATCH_SIZE = 64


class GradNormSampling(_strategies.QueryStrategy):
    """Selects the unlabeled instances whose prediction entropy has the largest parameter
    gradient (Ent-GradNorm / LPLgrad's query), computed exactly by gradnorm-engine."""

    def __init__(self, *, batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device | None = None,
                 **score_options):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = device
        self.score_options = dict(score_options)
        self.scores_: np.ndarray | None = None

    def query(self, clf: Any, dataset: Any, indices_unlabeled, indices_labeled, y, n: int = 10) -> np.ndarray:
        self._validate_query_input(indices_unlabeled, n)
        model = getattr(clf, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"{type(clf).__name__} holds no torch model (clf.model is {type(model).__name__}); "
                             f"{type(self).__name__} needs a trained small-text PyTorch or transformers classifier")
        unlabeled = np.asarray(indices_unlabeled)
        loader = _data.dataloader(dataset[unlabeled].data, self.batch_size, clf._create_collate_fn(), train=False)
        if _is_transformers_classifier(clf):
            loader = _TransformerBatches(loader)
        options = {"progress": False, "device": self.device or getattr(clf, "device", None), **self.score_options}
        return unlabeled[self._positions(model, loader, n, options)]

    def _positions(self, model: torch.nn.Module, loader: Any, n: int, options: dict) -> np.ndarray:
        """Positions in ``indices_unlabeled`` of the ``n`` picks: the largest ``_scores``, ties by
        the lower position; ``scores_`` keeps every instance's."""
        scores = self._scores(model, loader, options)
        self.scores_ = scores.numpy()
        return top_k(scores, n).indices.numpy()

    def _scores(self, model: torch.nn.Module, loader: Any, options: dict) -> torch.Tensor:
        return score_pool(model, loader, **options)

    def __str__(self) -> str:
        return f"{type(self).__name__}(batch_size={self.batch_size}, {self.score_options})"


class ExpectedGradientLengthSampling(GradNormSampling):
    """Selects the unlabeled instances with the largest expected gradient length,
    sum_c p_c(x) || d CE(f(x), c) / d theta ||, computed exactly and in batches by
    ``gradnorm_engine.expected_gradient_length`` (``top_m``: each instance's m likeliest classes
    only; keyword options as ``score_pool``'s, but ``score``).

    small-text's own ``ExpectedGradientLength`` runs one backward per instance and class and
    sums the absolute gradient entries (an L1 norm); this one is exact for the L2 gradient norm
    (``norm="frobenius"``) or the sum of per-tensor L2 norms (``"tensor_sum"``), batched through
    the engine's backends, and needs no ``num_classes``. Ties go to the lower position in
    ``indices_unlabeled``; ``scores_`` holds every unlabeled instance's EGL.
    """

    def __init__(self, *, top_m: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 device: str | torch.device | None = None, **egl_options):
        super().__init__(batch_size=batch_size, device=device, **egl_options)
        self.top_m = top_m

    def _scores(self, model: torch.nn.Module, loader: Any, options: dict) -> torch.Tensor:
        return expected_gradient_length(model, loader, top_m=self.top_m, **options)


class BadgeSampling(GradNormSampling):
    """Selects BADGE's picks: k-means++ seeds over the unlabeled instances' gradient embeddings
    with respect to the layer producing the logits, computed factorised by
    ``gradnorm_engine.badge`` (never the [n, C x D] embeddings), in pick order.

    ``seed`` (default 0) seeds a new torch generator at every query, so a query's picks depend
    only on the model, the instances and the seed; ``generator`` (a ``torch.Generator``) is
    used as is instead, advancing from query to query. ``layer``: the layer producing the
    logits (default: the model's last ``nn.Linear``: KimCNN's ``fc``, a Hugging Face
    classifier's head). Keyword options: ``logits_fn`` and the input options of ``badge``.
    Unlike small-text's own ``BADGE`` it needs no embeddings from the classifier and no
    ``num_classes``; ``scores_`` is each pick's gradient-embedding norm ||g(x)||, in pick order.
    """

    def __init__(self, *, seed: int | None = DEFAULT_SEED, generator: torch.Generator | None = None,
                 layer: torch.nn.Module | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 device: str | torch.device | None = None, **badge_options):
        super().__init__(batch_size=batch_size, device=device, **badge_options)
        badge_generator(seed, generator)   # a bad seed is refused here, not at the first query
        self.seed, self.generator, self.layer = seed, generator, layer

    def _positions(self, model: torch.nn.Module, loader: Any, n: int, options: dict) -> np.ndarray:
        picks = badge_picks(model, loader, n, generator=badge_generator(self.seed, self.generator),
                            layer=self.layer, **options)
        self.scores_ = picks.embedding_norms()
        return picks.positions.numpy()

    def __str__(self) -> str:
        return f"BadgeSampling(seed={self.seed}, batch_size={self.batch_size}, {self.score_options})"


def _is_transformers_classifier(clf: Any) -> bool:
    return type(clf).__module__.startswith("small_text.integrations.transformers")


class _TransformerBatches:
    """The transformers classifier's batches (ids, masks, labels, weights) as the model's keyword
    inputs, as the classifier calls it: ``model(input_ids=ids, attention_mask=masks)``."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for ids, masks, *_ in self.loader:
            yield {"input_ids": ids, "attention_mask": masks}


__all__ = ["BadgeSampling", "ExpectedGradientLengthSampling", "GradNormSampling"]
