"""scikit-activeml query strategy: label the candidates with the largest gradient norms.

    from skactiveml.classifier import SkorchClassifier
    from gradnorm_engine.integrations.skactiveml import GradNormSampling

    clf = SkorchClassifier(MyNet, classes=classes, neural_net_param_dict={"max_epochs": 10})
    qs = GradNormSampling(score="entropy")
    clf.fit(X, y)                                   # y: np.nan marks unlabeled samples
    query_idx = qs.query(X, y, clf, fit_clf=False, batch_size=10)

``query`` follows scikit-activeml's pool-strategy contract: ``candidates`` (None: the unlabeled
samples of ``X``; int array: indices into ``X``; sample array: the candidates themselves),
``batch_size`` and ``return_utilities``. Utilities are the gradient-norm scores of the
candidates (np.nan elsewhere). The batch is the ``batch_size`` largest scores, highest first,
ties broken by the lower candidate position: exactly ``rank_unlabeled(module, candidates,
batch_size)``, mapped back to ``X`` when candidates index ``X``. No random tie-breaking.

``clf`` is a skactiveml ``SkorchClassifier``, a ``SklearnClassifier`` around a skorch net, or
any wrapper from which ``module_`` / ``neural_net_`` / ``estimator_`` lead to a torch module.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..api import score_pool, top_k
from ._requirements import require
from ._skorch import array_loader, logits_fn_for, torch_module

_base = require("skactiveml.base", distribution="scikit-activeml", adapter="skactiveml")
_sklearn_base = require("sklearn.base", distribution="scikit-learn", adapter="skactiveml")
_skactiveml_utils = require("skactiveml.utils", distribution="scikit-activeml", adapter="skactiveml")


class GradNormSampling(_base.SingleAnnotatorPoolQueryStrategy):
    """Query the candidates whose loss gradient has the largest norm.

    score(x) = || d loss(f(x)) / d theta ||, computed exactly per sample by
    ``gradnorm_engine.score_pool`` (``score``: "entropy", "categorical_entropy",
    "pseudo_label_ce" or a callable logits [B, C] -> [B]; ``norm``: "frobenius" or
    "tensor_sum"; ``backend``: "auto", "vmap", "loop", ...).

    Parameters
    ----------
    score, norm, backend, device : see ``gradnorm_engine.score_pool``.
    loader_batch_size : int, default=256
        Samples per loader batch when streaming candidates (does not change the scores).
    score_options : dict or None
        Further ``score_pool`` keyword options (``params``, ``logits_fn``, ``autocast``,
        ``max_memory``, ``chunk_size``, ``progress``).
    missing_label, random_state : as in every scikit-activeml strategy.
    """

    def __init__(
        self,
        score: Any = "entropy",
        norm: str = "frobenius",
        backend: str = "auto",
        device: Any = None,
        loader_batch_size: int = 256,
        score_options: dict | None = None,
        missing_label: Any = _base.MISSING_LABEL,
        random_state: Any = None,
    ):
        super().__init__(missing_label=missing_label, random_state=random_state)
        self.score = score
        self.norm = norm
        self.backend = backend
        self.device = device
        self.loader_batch_size = loader_batch_size
        self.score_options = score_options

    def query(
        self,
        X,
        y,
        clf,
        fit_clf: bool = True,
        sample_weight=None,
        candidates=None,
        batch_size: int = 1,
        return_utilities: bool = False,
    ):
        """Determine which candidates to label.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Training data set, labeled and unlabeled samples.
        y : array-like of shape (n_samples,)
            Labels, ``missing_label`` for unlabeled samples.
        clf : skactiveml classifier wrapping a PyTorch module (e.g. ``SkorchClassifier``).
        fit_clf : bool, default=True
            Fit a clone of ``clf`` on ``(X, y[, sample_weight])`` first (``clf`` itself is
            left untouched, as in every scikit-activeml strategy).
        sample_weight : array-like of shape (n_samples,), default=None
            Passed to the fit when ``fit_clf`` is True.
        candidates : None, int array of shape (n_candidates,), or array of shape (n_candidates, ...)
        batch_size : int, default=1
        return_utilities : bool, default=False

        Returns
        -------
        query_indices : np.ndarray of shape (batch_size,)
            Indices into ``X`` (candidates None or int array) or into ``candidates``.
        utilities : np.ndarray of shape (batch_size, n_samples) or (batch_size, n_candidates)
            Only if ``return_utilities``: row i holds the scores used to pick the i-th sample,
            with the samples picked before it (and non-candidates) set to np.nan.
        """
        X, y, candidates, batch_size, return_utilities = self._validate_data(
            X, y, candidates, batch_size, return_utilities, reset=True
        )
        X_cand, mapping = self._transform_candidates(candidates, X, y)
        _skactiveml_utils.check_type(fit_clf, "fit_clf", bool)
        if len(X_cand) == 0:
            raise ValueError("there is no candidate to query: every sample of X is labeled and no "
                             "candidates were given")

        if fit_clf:
            clf = _sklearn_base.clone(clf)
            clf = clf.fit(X, y, sample_weight) if sample_weight is not None else clf.fit(X, y)

        scores = self._scores(clf, X_cand)                        # [n_candidates]
        picked = top_k(scores, batch_size).indices.numpy()        # candidate positions, best first
        scores = scores.numpy().astype(float)

        if mapping is None:
            query_indices, utilities = picked, scores
        else:
            query_indices = np.asarray(mapping)[picked]
            utilities = np.full(len(X), np.nan)
            utilities[mapping] = scores

        if not return_utilities:
            return query_indices
        batch_utilities = np.repeat(utilities[None, :], batch_size, axis=0)
        for i in range(1, batch_size):
            batch_utilities[i, query_indices[:i]] = np.nan
        return query_indices, batch_utilities

    def _scores(self, clf: Any, X_cand: np.ndarray) -> torch.Tensor:
        module = torch_module(clf)
        options = dict(self.score_options or {})
        options.setdefault("logits_fn", logits_fn_for(clf))
        options.setdefault("progress", False)
        loader = array_loader(X_cand, module, self.loader_batch_size)
        return score_pool(module, loader, score=self.score, norm=self.norm, backend=self.backend,
                          device=self.device, **options)


__all__ = ["GradNormSampling"]
