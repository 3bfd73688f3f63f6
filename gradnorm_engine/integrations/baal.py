"""baal heuristic: ``ActiveLearningLoop.step()`` labels the pool samples with the largest
gradient norms.

    from baal.active import ActiveLearningDataset
    from baal.modelwrapper import ModelWrapper, TrainingArgs
    from gradnorm_engine.integrations.baal import gradnorm_loop

    wrapper = ModelWrapper(model, TrainingArgs(optimizer=..., criterion=..., batch_size=64, epoch=5))
    loop = gradnorm_loop(al_dataset, wrapper, query_size=100)   # a baal ActiveLearningLoop
    for _ in range(rounds):
        wrapper.train_on_dataset(al_dataset)
        loop.step()

How it fits baal: ``ActiveLearningLoop.step()`` calls ``get_probabilities(pool, **kwargs)`` and
hands the result to ``heuristic.get_ranks``. A gradient-norm score needs the model and the pool
samples, not predictions, so one ``GradNorm`` object holding the model plays both parts:
``GradNorm.get_scores`` is the loop's ``get_probabilities`` (pool -> scores [N]) and the
``GradNorm`` object is its heuristic (scores -> ranking). ``gradnorm_loop`` wires the two;
building the loop by hand is the same:

    heuristic = GradNorm(wrapper)
    loop = ActiveLearningLoop(al_dataset, heuristic.get_scores, heuristic=heuristic, query_size=100)

The ranking is highest score first, ties by lower pool position, so one step labels exactly
``rank_unlabeled(model, DataLoader(al_dataset.pool), query_size).indices`` (pool positions).

baal's Bayesian layers (``patch_module``'s MC-Dropout, consistent dropout, weight drop) keep
dropping in eval mode. The scores are those of the deterministic model, as for any model the
engine scores in eval mode: ``get_scores`` sets those layers' drop rates to 0 while it scores
and restores them afterwards (a random mask per forward would make every score, and the
ranking, a random draw).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..api import score_pool
from ._requirements import require

_baal_active = require("baal.active", distribution="baal", adapter="baal")
_heuristics = require("baal.active.heuristics", distribution="baal", adapter="baal")

DEFAULT_BATCH_SIZE = 64


class GradNorm(_heuristics.AbstractHeuristic):
    """Rank baal's pool by per-sample gradient norm, largest first.

    score(x) = || d loss(f(x)) / d theta ||, computed exactly per sample by
    ``gradnorm_engine.score_pool`` with ``score_options`` (``score="entropy"`` by default;
    also ``norm``, ``backend``, ``params``, ``logits_fn``, ``input_key``, ``device``,
    ``autocast``, ``max_memory``, ``chunk_size``, ``progress``).

    Args:
        model: the ``torch.nn.Module`` to score, or a baal ``ModelWrapper`` (its ``.model``;
            its ``args.batch_size``, ``args.workers`` and ``args.collate_fn`` then load the pool).
        batch_size, workers, collate_fn: override how the pool is loaded (not the scores).
    """

    def __init__(
        self,
        model: Any,
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        collate_fn: Callable | None = None,
        **score_options,
    ):
        super().__init__(reverse=True)
        self.model = model
        args = getattr(model, "args", None)
        self.batch_size = batch_size or getattr(args, "batch_size", None) or DEFAULT_BATCH_SIZE
        self.workers = workers if workers is not None else getattr(args, "workers", 0)
        self.collate_fn = collate_fn or getattr(args, "collate_fn", None)
        score_options.setdefault("progress", False)
        self.score_options = score_options

    @property
    def module(self) -> nn.Module:
        """The torch module scored (the wrapper's ``.model`` for a ``ModelWrapper``)."""
        module = self.model if isinstance(self.model, nn.Module) else getattr(self.model, "model", None)
        if not isinstance(module, nn.Module):
            raise TypeError(f"GradNorm needs a torch.nn.Module or a baal ModelWrapper, got "
                            f"{type(self.model).__name__}")
        return module

    def get_scores(self, dataset: Dataset, batch_size: int | None = None, **loop_kwargs) -> np.ndarray:
        """The loop's ``get_probabilities``: every pool sample's score, in pool order.  -> [N]

        ``ActiveLearningLoop`` forwards its extra keyword arguments here; ``batch_size`` sets
        the loader batch, the others (``iterations``, ``half``, ``verbose``, ...) belong to
        prediction-based heuristics and are ignored.
        """
        loader = DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=False,
                            num_workers=self.workers, collate_fn=self.collate_fn)
        module = self.module
        with without_bayesian_dropout(module):
            return score_pool(module, loader, **self.score_options).numpy()

    def compute_score(self, predictions, target_predictions=None) -> np.ndarray:
        """The scores from ``get_scores`` are already the acquisition values.  [N] -> [N]"""
        scores = np.asarray(predictions)
        if scores.ndim != 1:
            raise ValueError(
                f"GradNorm ranks gradient-norm scores of shape [N], got an array of shape {scores.shape} "
                "(predictions?); build the loop with get_probabilities=heuristic.get_scores, or use "
                "gradnorm_engine.integrations.baal.gradnorm_loop")
        return scores

    def reorder_indices(self, scores) -> np.ndarray:
        """Pool positions by decreasing score; ties by lower position (as ``rank_unlabeled``)."""
        scores = np.concatenate(scores) if isinstance(scores, (list, tuple)) else np.asarray(scores)
        return np.argsort(-scores, kind="stable")


# The drop rates of baal's Bayesian layers: dropout's ``p``, weight drop's ``_weight_dropout``.
BAYESIAN_RATES = ("p", "_weight_dropout")


@contextlib.contextmanager
def without_bayesian_dropout(module: nn.Module) -> Iterator[None]:
    """Set the drop rates of baal's Bayesian layers inside ``module`` to 0; restore them after."""
    saved = []
    for m in module.modules():
        if type(m).__module__.startswith("baal.bayesian"):
            for rate in BAYESIAN_RATES:
                value = getattr(m, rate, None)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                    saved.append((m, rate, value))
    try:
        for m, rate, _ in saved:
            setattr(m, rate, 0.0)
        yield
    finally:
        for m, rate, value in saved:
            setattr(m, rate, value)


def gradnorm_loop(
    dataset: Any,
    model: Any,
    query_size: int = 1,
    *,
    max_sample: int = -1,
    uncertainty_folder: str | None = None,
    **gradnorm_options,
):
    """A baal ``ActiveLearningLoop`` whose ``step()`` labels the ``query_size`` pool samples with
    the largest gradient norms.

    ``dataset`` is the ``ActiveLearningDataset``; ``model`` a ``ModelWrapper`` or torch module;
    ``max_sample`` and ``uncertainty_folder`` as in ``ActiveLearningLoop``; ``gradnorm_options``
    go to ``GradNorm`` (``batch_size``, ``workers``, ``collate_fn`` and ``score_pool`` options).
    """
    heuristic = GradNorm(model, **gradnorm_options)
    return _baal_active.ActiveLearningLoop(
        dataset, heuristic.get_scores, heuristic=heuristic, query_size=query_size,
        max_sample=max_sample, uncertainty_folder=uncertainty_folder)


__all__ = ["GradNorm", "gradnorm_loop"]
