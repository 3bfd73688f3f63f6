"""A DeepAL-style strategy: ``query(n)`` returns the unlabeled samples with the largest
gradient norms.

DeepAL (the "deep-active-learning" codebase) is not a package; its strategies are classes
``Strategy(dataset, net)`` with ``query(n)``, used as

    strategy = GradNormSampling(dataset, net)       # instead of e.g. EntropySampling(dataset, net)
    strategy.train()
    for rnd in range(rounds):
        query_idxs = strategy.query(n_query)
        strategy.update(query_idxs)
        strategy.train()

This module is self-contained and duck-typed on DeepAL's interfaces:

- ``dataset.get_unlabeled_data() -> (unlabeled_idxs, unlabeled_data)``: ``unlabeled_idxs`` an
  int array of dataset indices, ``unlabeled_data`` a torch Dataset whose items start with the
  input (DeepAL's handlers yield ``(x, y, index)``); ``dataset.labeled_idxs`` a bool array;
  ``dataset.get_labeled_data()`` for ``train()``.
- ``net``: DeepAL's ``Net`` (the trained module is ``net.clf``, loader settings in
  ``net.params["test_args"]``), or any object with a torch module at ``.clf``, ``.model`` or
  ``.module``, or a torch module itself. Tuple outputs ``(logits, embedding)`` are read at [0].

Index mapping: the unlabeled data is scored in ``unlabeled_idxs`` order; ``query(n)`` ranks it
with ``rank_unlabeled(module, loader(unlabeled_data), n)`` and returns
``unlabeled_idxs[result.indices]``, i.e. dataset indices, as every DeepAL strategy does, ready
for ``update()``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import DataLoader

from ..api import rank_unlabeled

DEFAULT_LOADER_ARGS = {"batch_size": 256}


class Strategy:
    """DeepAL's strategy interface: the data, the net, and what a round does with them."""

    def __init__(self, dataset: Any, net: Any):
        self.dataset = dataset
        self.net = net

    def query(self, n: int) -> np.ndarray:
        """Dataset indices of the ``n`` samples to label next."""
        raise NotImplementedError

    def update(self, pos_idxs, neg_idxs=None) -> None:
        """Mark ``pos_idxs`` labeled (and ``neg_idxs`` unlabeled)."""
        self.dataset.labeled_idxs[pos_idxs] = True
        if neg_idxs is not None:
            self.dataset.labeled_idxs[neg_idxs] = False

    def train(self) -> None:
        _, labeled_data = self.dataset.get_labeled_data()
        self.net.train(labeled_data)

    def predict(self, data):
        return self.net.predict(data)

    def predict_prob(self, data):
        return self.net.predict_prob(data)


class GradNormSampling(Strategy):
    """Query the unlabeled samples whose loss gradient has the largest norm.

    score(x) = || d loss(f(x)) / d theta ||, computed exactly per sample by
    ``gradnorm_engine.score_pool`` with ``score_options`` (``score="entropy"`` by default; also
    ``norm``, ``backend``, ``params``, ``logits_fn``, ``device``, ``autocast``, ...).
    ``loader_args`` are DataLoader keyword arguments for the unlabeled pool (default:
    ``net.params["test_args"]`` when the net has them, else batch_size 256); shuffling is
    always off so positions map back to ``unlabeled_idxs``.
    """

    def __init__(self, dataset: Any, net: Any, *, loader_args: dict | None = None, **score_options):
        super().__init__(dataset, net)
        self.loader_args = loader_args
        score_options.setdefault("progress", False)
        self.score_options = score_options

    @property
    def module(self) -> nn.Module:
        """The torch module scored: ``net.clf`` (DeepAL), ``net.model``, ``net.module`` or ``net``."""
        if isinstance(self.net, nn.Module):
            return self.net
        for attr in ("clf", "model", "module"):
            module = getattr(self.net, attr, None)
            if isinstance(module, nn.Module):
                return module
        raise TypeError(
            f"cannot find the torch module in {type(self.net).__name__}: expected a torch.nn.Module or "
            "an object holding one at .clf (DeepAL's Net, after train()), .model or .module")

    def query(self, n: int) -> np.ndarray:
        """Dataset indices of the ``n`` unlabeled samples with the largest scores, highest first."""
        unlabeled_idxs, unlabeled_data = self.dataset.get_unlabeled_data()
        unlabeled_idxs = np.asarray(unlabeled_idxs)
        n = min(int(n), len(unlabeled_idxs))
        if n <= 0:
            raise ValueError(f"cannot query {n} samples from {len(unlabeled_idxs)} unlabeled ones; "
                             "ask for at least 1 while unlabeled samples remain")
        loader = DataLoader(unlabeled_data, **{**self._loader_args(), "shuffle": False})
        ranked = rank_unlabeled(self.module, loader, n, **self.score_options)
        return unlabeled_idxs[ranked.indices.numpy()]

    def _loader_args(self) -> dict:
        if self.loader_args is not None:
            return dict(self.loader_args)
        params = getattr(self.net, "params", None)
        if isinstance(params, dict) and isinstance(params.get("test_args"), dict):
            return dict(params["test_args"])
        return dict(DEFAULT_LOADER_ARGS)


__all__ = ["Strategy", "GradNormSampling"]


# --- Expected gradient length and BADGE ---------------------------------------------------------
# Both subclass GradNormSampling: they take what it takes (DeepAL's (dataset, net); with the
# DeepAL+ interface, (dataset, net, args_input, args_task) and its pool options too) and change
# only how query() picks from the unlabeled pool.

import torch  # noqa: E402 - imported here, with the strategies appended below

from ..ranking import top_k  # noqa: E402
from ._strategies import DEFAULT_SEED, badge_generator, badge_picks, egl_scores  # noqa: E402


def _unlabeled_pool(strategy: GradNormSampling) -> tuple[np.ndarray, DataLoader]:
    """(unlabeled_idxs, the loader over the unlabeled data, never shuffled), as GradNormSampling
    builds them: its ``pool_loader()`` where it has one, else from ``get_unlabeled_data()``."""
    pool_loader = getattr(strategy, "pool_loader", None)
    if callable(pool_loader):
        return pool_loader()
    unlabeled_idxs, unlabeled_data = strategy.dataset.get_unlabeled_data()
    return np.asarray(unlabeled_idxs), DataLoader(unlabeled_data, **{**strategy._loader_args(), "shuffle": False})


class _PoolPositionsStrategy(GradNormSampling):
    """query(n) = unlabeled_idxs[self._positions(module, loader, n)]."""

    def query(self, n: int) -> np.ndarray:
        module = self.module   # before reading the pool: an untrained net fails fast
        unlabeled_idxs, loader = _unlabeled_pool(self)
        n = min(int(n), len(unlabeled_idxs))
        if n <= 0:
            raise ValueError(f"cannot query {n} samples from {len(unlabeled_idxs)} unlabeled ones; "
                             "ask for at least 1 while unlabeled samples remain")
        return unlabeled_idxs[self._positions(module, loader, n)]

    def _positions(self, module: nn.Module, loader: DataLoader, n: int) -> np.ndarray:
        raise NotImplementedError


class EGLSampling(_PoolPositionsStrategy):
    """Query the unlabeled samples with the largest expected gradient length.

    EGL(x) = sum_c p_c(x) || d CE(f(x), c) / d theta ||, computed exactly per sample by
    ``gradnorm_engine.expected_gradient_length`` (``top_m``: each sample's m likeliest classes
    only; ``egl_options``: ``norm``, ``backend``, ``params``, ``logits_fn``, ``device``, ...,
    as ``score_pool``'s, but ``score``). ``query(n)`` returns the dataset indices of the ``n``
    largest, highest first, ties by the lower position in ``unlabeled_idxs``. The other
    arguments are GradNormSampling's.
    """

    def __init__(self, dataset: Any, net: Any, *args, top_m: int | None = None, **options):
        super().__init__(dataset, net, *args, **options)
        self.top_m = top_m

    def _positions(self, module: nn.Module, loader: DataLoader, n: int) -> np.ndarray:
        return top_k(egl_scores(module, loader, top_m=self.top_m, **self.score_options), n).indices.numpy()


class BadgeSampling(_PoolPositionsStrategy):
    """Query BADGE's picks: k-means++ seeds over the unlabeled samples' gradient embeddings with
    respect to the layer producing the logits (DeepAL's and DeepAL+'s ``BadgeSampling`` take
    them from ``net.get_grad_embeddings``), computed factorised by ``gradnorm_engine.badge``.

    ``query(n)`` returns the dataset indices of BADGE's ``n`` picks, in pick order. ``seed``
    (default 0) seeds a new torch generator at every query, so a query's picks depend only on
    the model, the pool and the seed (a resumed run picks alike); ``generator`` (a
    ``torch.Generator``) is used as is instead and advances from query to query. ``layer``: the
    layer producing the logits (default: the module's last ``nn.Linear``; DeepAL's nets return
    ``(logits, embedding)``, the logits are read at [0]). ``badge_options``: ``logits_fn``,
    ``device`` and the input options of ``badge``; the other arguments are GradNormSampling's.
    """

    def __init__(self, dataset: Any, net: Any, *args, seed: int | None = DEFAULT_SEED,
                 generator: torch.Generator | None = None, layer: nn.Module | None = None, **options):
        super().__init__(dataset, net, *args, **options)
        badge_generator(seed, generator)   # a bad seed is refused here, not at the first query
        self.seed, self.generator, self.layer = seed, generator, layer

    def _positions(self, module: nn.Module, loader: DataLoader, n: int) -> np.ndarray:
        picks = badge_picks(module, loader, n, generator=badge_generator(self.seed, self.generator),
                            layer=self.layer, **self.score_options)
        return picks.positions.numpy()


__all__ = [*__all__, "EGLSampling", "BadgeSampling"]
