"""modAL query strategy: label the pool samples with the largest gradient norms.

    from modAL.models import ActiveLearner
    from gradnorm_engine.integrations.modal import gradnorm_sampling

    learner = ActiveLearner(estimator=net, query_strategy=gradnorm_sampling,  # net: skorch classifier
                            X_training=X0, y_training=y0)
    query_idx, query_X = learner.query(X_pool, n_instances=10)

The strategy scores every row of ``X_pool`` with ``gradnorm_engine.score_pool`` on the torch
module inside the learner (``learner.estimator.module_``) and returns the ``n_instances``
positions with the largest scores, highest first (ties: lower position first), exactly
``rank_unlabeled(module, X_pool, n_instances).indices``. Extra keyword arguments of
``learner.query`` (``score=``, ``norm=``, ``backend=``, ``device=``, ...) go to ``score_pool``.

modAL changed what a strategy returns: 0.4.1 takes the indices alone, 0.4.2 takes
``(indices, metrics)``. The strategy reads the installed modAL and returns what it expects.
"""
from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from ..api import score_pool, top_k
from ._requirements import require
from ._skorch import array_loader, logits_fn_for, torch_module

_modal_base = require("modAL.models.base", distribution="modAL-python", adapter="modal")


def gradnorm_scores(classifier: Any, X_pool: Any, *, batch_size: int = 256, **score_options) -> np.ndarray:
    """Every pool row's gradient-norm score.  X_pool [N, ...] -> float array [N]

    ``classifier`` is a modAL learner, a skorch net or a torch module; ``score_options`` are
    ``score_pool``'s keyword options (default ``score="entropy"``, ``norm="frobenius"``).
    """
    return _score(classifier, X_pool, batch_size=batch_size, **score_options).numpy()


def gradnorm_sampling(classifier: Any, X_pool: Any, n_instances: int = 1, **score_options):
    """modAL query strategy: the ``n_instances`` pool positions with the largest scores.

    Returns ``indices`` (modAL 0.4.1) or ``(indices, scores of those indices)`` (modAL >= 0.4.2),
    whichever the installed ``ActiveLearner.query`` expects.
    """
    ranked = top_k(_score(classifier, X_pool, **score_options), int(n_instances))
    indices = ranked.indices.numpy()
    if _strategies_return_metrics():
        return indices, ranked.scores.numpy()
    return indices


def _score(classifier: Any, X_pool: Any, *, batch_size: int = 256, **score_options) -> torch.Tensor:
    module = torch_module(classifier)
    score_options.setdefault("logits_fn", logits_fn_for(classifier))
    score_options.setdefault("progress", False)
    return score_pool(module, array_loader(X_pool, module, batch_size), **score_options)


def _strategies_return_metrics() -> bool:
    """modAL >= 0.4.2 unpacks ``indices, metrics = strategy(...)``; its query() has ``return_metrics``."""
    return "return_metrics" in inspect.signature(_modal_base.BaseLearner.query).parameters


__all__ = ["gradnorm_sampling", "gradnorm_scores"]
