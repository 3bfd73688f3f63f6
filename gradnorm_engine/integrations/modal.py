"""modAL query strategies: label the pool samples with the largest gradient norms (or expected
gradient lengths, or BADGE's picks).

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

``egl_sampling`` is the same with the expected gradient length (``expected_gradient_length``'s
top ``n_instances``; ``egl_scores`` returns every row's), ``badge_sampling`` returns BADGE's
``n_instances`` picks in pick order (``badge(module, X_pool, n_instances)``, seeded by ``seed=``,
default 0, or ``generator=``).

modAL changed what a strategy returns: 0.4.1 takes the indices alone, 0.4.2 takes
``(indices, metrics)``. The strategies read the installed modAL and return what it expects
(metrics: the picks' scores; for BADGE each pick's gradient-embedding norm).
"""
from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from ..api import score_pool, top_k
from ..egl import expected_gradient_length
from ..ranking import check_k
from ._requirements import require
from ._skorch import module_and_loader
from ._strategies import DEFAULT_SEED, badge_generator, badge_picks

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
    return _top(_score(classifier, X_pool, **score_options), n_instances)


def egl_scores(classifier: Any, X_pool: Any, *, batch_size: int = 256, top_m: int | None = None,
               **egl_options) -> np.ndarray:
    """Every pool row's expected gradient length.  X_pool [N, ...] -> float array [N]

    ``expected_gradient_length(module, X_pool, top_m=top_m, **egl_options)`` on the torch module
    inside ``classifier``; ``egl_options`` are ``score_pool``'s keyword options but ``score``.
    """
    return _egl(classifier, X_pool, batch_size=batch_size, top_m=top_m, **egl_options).numpy()


def egl_sampling(classifier: Any, X_pool: Any, n_instances: int = 1, **egl_options):
    """modAL query strategy: the ``n_instances`` pool positions with the largest expected gradient
    lengths, highest first, ties by the lower position. Returns what the installed modAL expects,
    as ``gradnorm_sampling`` does (0.4.2: ``(indices, their EGL)``)."""
    return _top(_egl(classifier, X_pool, **egl_options), n_instances)


def badge_sampling(classifier: Any, X_pool: Any, n_instances: int = 1, *, seed: int | None = DEFAULT_SEED,
                   generator: torch.Generator | None = None, layer: torch.nn.Module | None = None,
                   batch_size: int = 256, **badge_options):
    """modAL query strategy: BADGE's ``n_instances`` picks from the pool, in pick order.

    Exactly ``badge(module, X_pool, n_instances, layer=layer, generator=...)``: ``generator`` (a
    ``torch.Generator``, advancing from query to query) or, without one, a new generator seeded
    with ``seed`` (default 0) at every query. ``layer``: the layer producing the logits (default:
    the module's last ``nn.Linear``; its output must be the module's output, so a module ending
    in a softmax is refused). Returns ``indices`` (modAL 0.4.1) or ``(indices, ||g(x)|| of each
    pick)`` (modAL >= 0.4.2): BADGE's metric per pick is its gradient embedding's norm.
    """
    module, loader, options = module_and_loader(classifier, X_pool, batch_size, badge_options)
    picks = badge_picks(module, loader, check_k(n_instances), generator=badge_generator(seed, generator),
                        layer=layer, **options)
    indices = picks.positions.numpy()
    return (indices, picks.embedding_norms()) if _strategies_return_metrics() else indices


def _top(scores: torch.Tensor, n_instances: int):
    ranked = top_k(scores, int(n_instances))
    indices = ranked.indices.numpy()
    if _strategies_return_metrics():
        return indices, ranked.scores.numpy()
    return indices


def _score(classifier: Any, X_pool: Any, *, batch_size: int = 256, **score_options) -> torch.Tensor:
    return _on_module(score_pool, classifier, X_pool, batch_size, score_options)


def _egl(classifier: Any, X_pool: Any, *, batch_size: int = 256, **egl_options) -> torch.Tensor:
    return _on_module(expected_gradient_length, classifier, X_pool, batch_size, egl_options)


def _on_module(function, classifier: Any, X_pool: Any, batch_size: int, options: dict) -> torch.Tensor:
    """``function(module, loader(X_pool), **options)`` with the module's logits and no progress bar."""
    module, loader, options = module_and_loader(classifier, X_pool, batch_size, options)
    return function(module, loader, **options)


def _strategies_return_metrics() -> bool:
    """modAL >= 0.4.2 unpacks ``indices, metrics = strategy(...)``; its query() has ``return_metrics``."""
    return "return_metrics" in inspect.signature(_modal_base.BaseLearner.query).parameters


__all__ = ["badge_sampling", "egl_sampling", "egl_scores", "gradnorm_sampling", "gradnorm_scores"]
