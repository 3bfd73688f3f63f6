"""small-text query strategy: label the unlabeled texts with the largest gradient norms.

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
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..api import score_pool, top_k
from ._requirements import require

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
                             "GradNormSampling needs a trained small-text PyTorch or transformers classifier")
        unlabeled = np.asarray(indices_unlabeled)
        loader = _data.dataloader(dataset[unlabeled].data, self.batch_size, clf._create_collate_fn(), train=False)
        if _is_transformers_classifier(clf):
            loader = _TransformerBatches(loader)
        options = {"progress": False, "device": self.device or getattr(clf, "device", None), **self.score_options}
        scores = score_pool(model, loader, **options)
        self.scores_ = scores.numpy()
        return unlabeled[top_k(scores, n).indices.numpy()]

    def __str__(self) -> str:
        return f"GradNormSampling(batch_size={self.batch_size}, {self.score_options})"


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


__all__ = ["GradNormSampling"]
