"""baal heuristics: ``ActiveLearningLoop.step()`` labels the pool samples with the largest
gradient norms (``GradNorm``), expected gradient lengths (``ExpectedGradientLength``) or
BADGE's picks (``Badge``).

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

``ExpectedGradientLength`` (``egl_loop``) is the same with the expected gradient length,
``expected_gradient_length(model, pool)``'s top ``query_size``. ``Badge`` (``badge_loop``) maps
BADGE's set onto the ranking: its values are k - i for BADGE's i-th pick of k = ``query_size``
and 0 elsewhere, so the loop's top ``query_size`` are ``badge(model, pool, query_size)``
(the class docstring says more, and how the draws are seeded).

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
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..api import score_pool
from ..ranking import check_k
from ._requirements import require
from ..egl import expected_gradient_length
from ._strategies import DEFAULT_SEED, badge_generator, badge_picks

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

    loop_name = "gradnorm_loop"   # the function that builds a loop around this heuristic

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
            return self.pool_scores(module, loader)

    def pool_scores(self, module: nn.Module, loader: DataLoader) -> np.ndarray:
        """The acquisition values of the pool, in pool order.  -> [N]"""
        return score_pool(module, loader, **self.score_options).numpy()

    def compute_score(self, predictions, target_predictions=None) -> np.ndarray:
        """The scores from ``get_scores`` are already the acquisition values.  [N] -> [N]"""
        scores = np.asarray(predictions)
        if scores.ndim != 1:
            raise ValueError(
                f"{type(self).__name__} ranks the values of its own get_scores, of shape [N], got an array of "
                f"shape {scores.shape} (predictions?); build the loop with get_probabilities=heuristic.get_scores, "
                f"or use gradnorm_engine.integrations.baal.{self.loop_name}")
        return scores

    def reorder_indices(self, scores) -> np.ndarray:
        """Pool positions by decreasing score; ties by lower position (as ``rank_unlabeled``)."""
        scores = np.concatenate(scores) if isinstance(scores, (list, tuple)) else np.asarray(scores)
        return np.argsort(-scores, kind="stable")


class ExpectedGradientLength(GradNorm):
    """Rank baal's pool by expected gradient length, largest first.

    EGL(x) = sum_c p_c(x) || d CE(f(x), c) / d theta ||, computed exactly per sample by
    ``gradnorm_engine.expected_gradient_length`` (``top_m``: only each sample's m likeliest
    classes; ``egl_options``: ``norm``, ``backend``, ``params``, ``logits_fn``, ``device``, ...,
    as in ``score_pool``, but not ``score``). Used like ``GradNorm``: ``get_scores`` is the loop's
    ``get_probabilities``, the object its heuristic (``egl_loop`` wires both); one step labels
    the ``query_size`` largest values, ties by the lower pool position.
    """

    loop_name = "egl_loop"

    def __init__(self, model: Any, *, top_m: int | None = None, batch_size: int | None = None,
                 workers: int | None = None, collate_fn: Callable | None = None, **egl_options):
        super().__init__(model, batch_size=batch_size, workers=workers, collate_fn=collate_fn, **egl_options)
        self.top_m = top_m

    def pool_scores(self, module: nn.Module, loader: DataLoader) -> np.ndarray:
        return expected_gradient_length(module, loader, top_m=self.top_m, **self.score_options).numpy()


class Badge(GradNorm):
    """BADGE's picks as a baal heuristic: one step labels BADGE's ``query_size`` picks.

    BADGE chooses a set (k-means++ seeds over the last layer's gradient embeddings), not a
    score per sample, and baal's loop labels the top ``query_size`` of a heuristic's ranking.
    So ``get_scores(pool)`` runs ``gradnorm_engine.badge(module, pool, k)`` with k =
    ``min(query_size, len(pool))`` and returns k - i for the i-th pick and 0 for every other
    sample; ranked highest first, ties by the lower position, the top k are BADGE's picks in
    pick order and the rest follow in pool order. The values say when a sample was picked, not
    how informative it is alone (baal logs and saves them as the step's "uncertainty"). The loop
    must ask for the same ``query_size`` (``badge_loop`` builds it so): a larger one labels
    pool samples beyond BADGE's picks in position order. ``last_picks`` holds the last picks
    (positions in the pool ``get_scores`` was given).

    Seeding: ``generator`` (a ``torch.Generator``) is used as is and advances across steps;
    without one every step draws from a new generator seeded with ``seed`` (default 0), so a
    step's picks depend only on the model, the pool and the seed (a resumed run picks alike).
    ``layer``: the layer producing the logits (default: the model's last ``nn.Linear``);
    ``badge_options``: ``logits_fn``, ``device``, ``progress`` and the input options.
    """

    loop_name = "badge_loop"

    def __init__(self, model: Any, query_size: int, *, seed: int | None = DEFAULT_SEED,
                 generator: torch.Generator | None = None, layer: nn.Module | None = None,
                 batch_size: int | None = None, workers: int | None = None, collate_fn: Callable | None = None,
                 **badge_options):
        super().__init__(model, batch_size=batch_size, workers=workers, collate_fn=collate_fn, **badge_options)
        self.query_size = check_k(query_size)
        badge_generator(seed, generator)   # refuses a bad seed now, not at the first step
        self.seed, self.generator, self.layer = seed, generator, layer
        self.last_picks: torch.Tensor | None = None

    def pool_scores(self, module: nn.Module, loader: DataLoader) -> np.ndarray:
        k = min(self.query_size, len(loader.dataset))
        picks = badge_picks(module, loader, k, generator=badge_generator(self.seed, self.generator),
                            layer=self.layer, **self.score_options)
        self.last_picks = picks.positions
        return picks.pick_order_scores()


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


def gradnorm_loop(dataset: Any, model: Any, query_size: int = 1, **options):
    """A baal ``ActiveLearningLoop`` whose ``step()`` labels the ``query_size`` pool samples with
    the largest gradient norms.

    ``dataset`` is the ``ActiveLearningDataset``; ``model`` a ``ModelWrapper`` or torch module;
    ``max_sample=-1`` and ``uncertainty_folder=None`` as in ``ActiveLearningLoop``; the other
    ``options`` go to ``GradNorm`` (``batch_size``, ``workers``, ``collate_fn`` and ``score_pool``
    options).
    """
    return _loop(GradNorm(model, **_heuristic_options(options)), dataset, query_size, **options)


def egl_loop(dataset: Any, model: Any, query_size: int = 1, **options):
    """A baal ``ActiveLearningLoop`` whose ``step()`` labels the ``query_size`` pool samples with
    the largest expected gradient lengths; ``max_sample`` and ``uncertainty_folder`` as in
    ``gradnorm_loop``, the other ``options`` go to ``ExpectedGradientLength`` (``top_m``,
    ``batch_size``, ``workers``, ``collate_fn``, ``norm``, ``backend``, ...)."""
    return _loop(ExpectedGradientLength(model, **_heuristic_options(options)), dataset, query_size, **options)


def badge_loop(dataset: Any, model: Any, query_size: int = 1, **options):
    """A baal ``ActiveLearningLoop`` whose ``step()`` labels BADGE's ``query_size`` picks: the
    heuristic and the loop get the same ``query_size``. ``max_sample`` and ``uncertainty_folder``
    as in ``gradnorm_loop``, the other ``options`` go to ``Badge`` (``seed``, ``generator``,
    ``layer``, ``batch_size``, ``workers``, ``collate_fn``, ...)."""
    return _loop(Badge(model, query_size, **_heuristic_options(options)), dataset, query_size, **options)


LOOP_OPTIONS = ("max_sample", "uncertainty_folder")   # ActiveLearningLoop's, not the heuristic's


def _heuristic_options(options: dict) -> dict:
    return {name: value for name, value in options.items() if name not in LOOP_OPTIONS}


def _loop(heuristic: GradNorm, dataset: Any, query_size: int, *, max_sample: int = -1,
          uncertainty_folder: str | None = None, **_given_to_the_heuristic):
    return _baal_active.ActiveLearningLoop(
        dataset, heuristic.get_scores, heuristic=heuristic, query_size=query_size,
        max_sample=max_sample, uncertainty_folder=uncertainty_folder)


__all__ = ["Badge", "ExpectedGradientLength", "GradNorm", "badge_loop", "egl_loop", "gradnorm_loop"]
