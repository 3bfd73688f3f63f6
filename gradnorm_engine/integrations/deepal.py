"""A DeepAL / DeepAL+ strategy: ``query(n)`` returns the unlabeled samples with the largest
gradient norms.

DeepAL (ej0cl6/deep-active-learning) and DeepAL+ (SineZHAN/deepALplus) are codebases, not
packages. Their strategies are classes with ``query(n)``, built as ``Strategy(dataset, net)``
in DeepAL and ``Strategy(dataset, net, args_input, args_task)`` in DeepAL+; this one takes
both:

    strategy = GradNormSampling(dataset, net)                        # DeepAL
    strategy = GradNormSampling(dataset, net, args_input, args_task) # DeepAL+ (get_strategy)
    strategy.train()
    for rnd in range(rounds):
        query_idxs = strategy.query(n_query)
        strategy.update(query_idxs)
        strategy.train()

This module imports neither codebase; it is duck-typed on their interfaces:

- ``dataset.get_unlabeled_data() -> (unlabeled_idxs, unlabeled_data)``: ``unlabeled_idxs`` an
  int array of dataset indices, ``unlabeled_data`` a torch Dataset whose items start with the
  input (the handlers yield ``(x, y, index)``); ``dataset.labeled_idxs`` a bool array;
  ``dataset.get_labeled_data()`` for ``train()``.
- ``net``: the codebases' ``Net`` (the trained module at ``net.clf``, which DeepAL+'s
  ``net.get_model()`` returns; loader settings in ``net.params["test_args"]`` in DeepAL,
  ``net.params["loader_te_args"]`` in DeepAL+), or any object with a torch module at ``.clf``,
  ``.model`` or ``.module``, or a torch module itself. Tuple outputs ``(logits, embedding)`` are
  read at [0].
- The pool's transform: DeepAL's handlers have one fixed transform. DeepAL+'s
  ``get_unlabeled_data()`` builds the handler with ``args_task["transform_train"]`` (random crop
  and flip for the image sets) and its own strategies score that; ``pool_transform="test"`` (the
  default) scores a copy of that handler with ``args_task["transform"]``, the test transform.

Index mapping: the unlabeled data is scored in ``unlabeled_idxs`` order; ``query(n)`` ranks it
with ``rank_unlabeled(module, loader(unlabeled_data), n)`` and returns
``unlabeled_idxs[result.indices]``, i.e. dataset indices, as every DeepAL strategy does, ready
for ``update()``.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..api import rank_unlabeled
from ..badge import badge
from ..egl import expected_gradient_length
from ..ranking import top_k
from ._strategies import DEFAULT_SEED, badge_generator

DEFAULT_LOADER_ARGS = {"batch_size": 256}
# Where each codebase keeps the evaluation loader's settings: DeepAL+ first, then DeepAL.
LOADER_ARG_KEYS = ("loader_te_args", "test_args")
POOL_TRANSFORMS = ("test", "train")


class Strategy:
    """The strategy interface of DeepAL and DeepAL+: the data, the net, and what a round does."""

    def __init__(self, dataset: Any, net: Any, args_input: Any = None, args_task: dict | None = None):
        self.dataset = dataset
        self.net = net
        self.args_input = args_input   # DeepAL+: the command line's arguments (unused here)
        self.args_task = args_task     # DeepAL+: the data set's settings (transforms, loader args)

    def query(self, n: int) -> np.ndarray:
        """Dataset indices of the ``n`` samples to label next."""
        raise NotImplementedError

    def update(self, pos_idxs, neg_idxs=None) -> None:
        """Mark ``pos_idxs`` labeled (and ``neg_idxs`` unlabeled)."""
        self.dataset.labeled_idxs[pos_idxs] = True
        if neg_idxs is not None:
            self.dataset.labeled_idxs[neg_idxs] = False

    def train(self, data=None, model_name: str | None = None) -> None:
        """``net.train`` on ``data`` (default: the labeled data). DeepAL+'s ``model_name`` selects
        joint trainings (WAAL) that need nets of their own; no such training is offered here."""
        if model_name is not None:
            raise NotImplementedError(
                f"train(model_name={model_name!r}): GradNormSampling trains the net as net.train(data); "
                "a joint training such as WAAL's needs its own strategy and nets")
        if data is None:
            _, data = self.dataset.get_labeled_data()
        self.net.train(data)

    def get_model(self) -> nn.Module:
        """The torch module the strategy scores (DeepAL+'s ``get_model``)."""
        return find_module(self.net)

    def get_labeled_count(self) -> int:
        labeled_idxs, _ = self.dataset.get_labeled_data()
        return len(labeled_idxs)

    def predict(self, data):
        return self.net.predict(data)

    def predict_prob(self, data):
        return self.net.predict_prob(data)

    def predict_prob_dropout(self, data, n_drop: int = 10):
        return self.net.predict_prob_dropout(data, n_drop=n_drop)

    def predict_prob_dropout_split(self, data, n_drop: int = 10):
        return self.net.predict_prob_dropout_split(data, n_drop=n_drop)

    def get_embeddings(self, data):
        return self.net.get_embeddings(data)

    def get_grad_embeddings(self, data):
        return self.net.get_grad_embeddings(data)


class GradNormSampling(Strategy):
    """Query the unlabeled samples whose loss gradient has the largest norm.

    score(x) = || d loss(f(x)) / d theta ||, computed exactly per sample by
    ``gradnorm_engine.score_pool`` with ``score_options`` (``score="entropy"`` by default; also
    ``norm``, ``backend``, ``params``, ``logits_fn``, ``device``, ``autocast``, ...).

    ``loader_args``: DataLoader keyword arguments for the unlabeled pool (default: the net's
    evaluation loader settings, ``net.params["loader_te_args"]`` (DeepAL+) or
    ``net.params["test_args"]`` (DeepAL), else ``args_task["loader_te_args"]``, else batch_size
    256); shuffling is always off so positions map back to ``unlabeled_idxs``.

    ``pool_transform``: ``"test"`` (default) scores the pool with the task's test transform,
    ``args_task["transform"]`` (from ``args_task``, ``dataset.args_task`` or ``net.params``),
    where there is one (DeepAL+); ``"train"`` as ``get_unlabeled_data()`` gives it (DeepAL+'s
    own strategies: ``transform_train``, random crops and flips); or a transform (a callable)
    of your own. DeepAL's handlers carry one fixed transform, used in every case but the last.
    """

    def __init__(self, dataset: Any, net: Any, args_input: Any = None, args_task: dict | None = None, *,
                 loader_args: dict | None = None, pool_transform: str | Callable = "test", **score_options):
        super().__init__(dataset, net, args_input, args_task)
        if not callable(pool_transform) and pool_transform not in POOL_TRANSFORMS:
            raise ValueError(f"pool_transform must be 'test', 'train' or a transform (a callable), "
                             f"got {pool_transform!r}")
        self.loader_args = loader_args
        self.pool_transform = pool_transform
        score_options.setdefault("progress", False)
        self.score_options = score_options

    @property
    def module(self) -> nn.Module:
        """The torch module scored: ``net.get_model()`` / ``net.clf``, ``net.model``, ``net.module`` or ``net``."""
        return find_module(self.net)

    def query(self, n: int) -> np.ndarray:
        """Dataset indices of the ``n`` unlabeled samples with the largest scores, highest first."""
        module = self.module   # before reading the pool: an untrained net fails fast
        unlabeled_idxs, loader = self.pool_loader()   # the pool query() scores, never shuffled
        n = min(int(n), len(unlabeled_idxs))
        if n <= 0:
            raise ValueError(f"cannot query {n} samples from {len(unlabeled_idxs)} unlabeled ones; "
                             "ask for at least 1 while unlabeled samples remain")
        return unlabeled_idxs[self._positions(module, loader, n)]

    def _positions(self, module: nn.Module, loader: DataLoader, n: int) -> np.ndarray:
        """The pool positions query(n) picks: here the n largest scores (EGL and BADGE pick otherwise)."""
        return rank_unlabeled(module, loader, n, **self.score_options).indices.numpy()

    def pool_loader(self) -> tuple[np.ndarray, DataLoader]:
        """(unlabeled_idxs, the DataLoader ``query`` scores): the unlabeled data in that order,
        with ``pool_transform``, never shuffled."""
        unlabeled_idxs, unlabeled_data = self.dataset.get_unlabeled_data()
        data = self._with_pool_transform(unlabeled_data)
        return np.asarray(unlabeled_idxs), DataLoader(data, **{**self._loader_args(), "shuffle": False})

    def _task_args(self) -> list[dict]:
        """The dicts that may hold DeepAL+'s data set settings, in the order they are trusted."""
        found = [self.args_task, getattr(self.dataset, "args_task", None), getattr(self.net, "params", None)]
        return [a for a in found if isinstance(a, dict)]

    def _with_pool_transform(self, data):
        if callable(self.pool_transform):
            transform = self.pool_transform
        elif self.pool_transform == "train":
            return data
        else:
            transform = next((a["transform"] for a in self._task_args() if a.get("transform") is not None), None)
            if transform is None:   # DeepAL: the handler's own, fixed transform
                return data
        if not hasattr(data, "transform"):
            warnings.warn(
                f"pool_transform={self.pool_transform!r}: the unlabeled data ({type(data).__name__}) has no "
                "'transform' attribute to set, so the pool is scored as get_unlabeled_data() returns it",
                UserWarning, stacklevel=3)
            return data
        data = copy.copy(data)   # the dataset's own handler keeps its transform
        data.transform = transform
        return data

    def _loader_args(self) -> dict:
        if self.loader_args is not None:
            return dict(self.loader_args)
        # the net's own settings (net.params) first: its predict() uses them
        for source in [getattr(self.net, "params", None), *self._task_args()]:
            for key in LOADER_ARG_KEYS:
                if isinstance(source, dict) and isinstance(source.get(key), dict):
                    return dict(source[key])
        return dict(DEFAULT_LOADER_ARGS)


def find_module(net: Any) -> nn.Module:
    """The torch module inside a DeepAL / DeepAL+ net: ``net`` itself when it is one, else
    ``net.get_model()`` or ``net.clf``, ``net.model``, ``net.module``."""
    if isinstance(net, nn.Module):
        return net
    get_model = getattr(net, "get_model", None)
    if callable(get_model):
        try:
            module = get_model()
        except AttributeError:   # DeepAL+'s Net before train(): no .clf yet
            module = None
        if isinstance(module, nn.Module):
            return module
    for attr in ("clf", "model", "module"):
        module = getattr(net, attr, None)
        if isinstance(module, nn.Module):
            return module
    if isinstance(getattr(net, "net", None), type) and issubclass(net.net, nn.Module):
        raise TypeError(
            f"{type(net).__name__} has no trained model yet: DeepAL's and DeepAL+'s Net build the torch "
            "module at .clf in net.train(data); call strategy.train() before strategy.query()")
    raise TypeError(
        f"cannot find the torch module in {type(net).__name__}: expected a torch.nn.Module or an object "
        "holding one at .clf (DeepAL's and DeepAL+'s Net, after train()), .model or .module")


# --- Expected gradient length and BADGE ---------------------------------------------------------
# Both subclass GradNormSampling: they take what it takes (DeepAL's (dataset, net); with the
# DeepAL+ interface, (dataset, net, args_input, args_task) and its pool options too) and change
# only which positions query() picks from the unlabeled pool (_positions).

class EGLSampling(GradNormSampling):
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
        return top_k(expected_gradient_length(module, loader, top_m=self.top_m, **self.score_options),
                     n).indices.numpy()


class BadgeSampling(GradNormSampling):
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
        return badge(module, loader, n, layer=self.layer, generator=badge_generator(self.seed, self.generator),
                     **self.score_options).numpy()


__all__ = ["Strategy", "GradNormSampling", "EGLSampling", "BadgeSampling", "find_module"]
