"""scikit-activeml query strategies: label the candidates with the largest gradient norms
(``GradNormSampling``), expected gradient lengths (``EGLSampling``) or BADGE's picks
(``BadgeSampling``).

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
``EGLSampling`` is the same with ``expected_gradient_length``. ``BadgeSampling``'s batch is
``badge(module, candidates, batch_size)`` in pick order, its utilities the D^2 probabilities
each pick was drawn from, as scikit-activeml's own ``Badge`` reports them; its draws are seeded
from ``random_state`` (default 0) the scikit-activeml way.

``clf`` is a skactiveml ``SkorchClassifier``, a ``SklearnClassifier`` around a skorch net, or
any wrapper from which ``module_`` / ``neural_net_`` / ``estimator_`` lead to a torch module.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..api import score_pool, top_k
from ._requirements import require
from ._skorch import module_and_loader
from ..egl import expected_gradient_length
from ._strategies import DEFAULT_SEED, badge_generator, badge_picks

_base = require("skactiveml.base", distribution="scikit-activeml", adapter="skactiveml")
_sklearn_base = require("sklearn.base", distribution="scikit-learn", adapter="skactiveml")
_skactiveml_utils = require("skactiveml.utils", distribution="scikit-activeml", adapter="skactiveml")


class _TorchPoolQueryStrategy(_base.SingleAnnotatorPoolQueryStrategy):
    """What the strategies below share: scikit-activeml's query contract around a torch module;
    a strategy says how it picks (``_select``, or ``_scores`` for a top-k)."""

    def __init__(self, device: Any, loader_batch_size: int, missing_label: Any, random_state: Any):
        super().__init__(missing_label=missing_label, random_state=random_state)
        self.device = device
        self.loader_batch_size = loader_batch_size

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
            Only if ``return_utilities``: row i holds the utilities the i-th sample was picked
            by (the strategy's class docstring says which), with the samples picked before it
            (and non-candidates) set to np.nan.
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

        picked, rows = self._select(clf, X_cand, batch_size)      # candidate positions, [batch, n_candidates]
        if mapping is None:
            query_indices, utilities = picked, rows
        else:
            query_indices = np.asarray(mapping)[picked]
            utilities = np.full((batch_size, len(X)), np.nan)
            utilities[:, mapping] = rows
        return (query_indices, utilities) if return_utilities else query_indices

    def _select(self, clf: Any, X_cand: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(the picked candidate positions [batch_size], the utilities [batch_size, n_candidates])."""
        raise NotImplementedError

    def _module_loader(self, clf: Any, X_cand: np.ndarray, options: dict | None) -> tuple[Any, Any, dict]:
        """The torch module in ``clf``, a loader over the candidates, and ``options`` with the
        wrapper's logits and no progress bar unless asked."""
        return module_and_loader(clf, X_cand, self.loader_batch_size, options)


class _ScoreTopK(_TorchPoolQueryStrategy):
    """A batch of the ``batch_size`` largest per-sample values of ``_score_pool``, computed with
    ``norm``, ``backend``, ``device`` and ``score_options``."""

    def __init__(self, norm: str, backend: str, device: Any, loader_batch_size: int, score_options: dict | None,
                 missing_label: Any, random_state: Any):
        super().__init__(device, loader_batch_size, missing_label, random_state)
        self.norm = norm
        self.backend = backend
        self.score_options = score_options

    def _select(self, clf: Any, X_cand: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``batch_size`` candidates with the largest ``_scores``, highest first (ties: the lower
        position), and the utilities: the scores in every row, the earlier picks np.nan."""
        scores = self._scores(clf, X_cand)                        # [n_candidates]
        picked = top_k(scores, batch_size).indices.numpy()
        rows = np.repeat(scores.numpy().astype(float)[None, :], batch_size, axis=0)
        for i in range(1, batch_size):
            rows[i, picked[:i]] = np.nan
        return picked, rows

    def _scores(self, clf: Any, X_cand: np.ndarray) -> torch.Tensor:
        module, loader, options = self._module_loader(clf, X_cand, self.score_options)
        return self._score_pool(module, loader, norm=self.norm, backend=self.backend, device=self.device, **options)

    def _score_pool(self, module: Any, loader: Any, **options) -> torch.Tensor:
        raise NotImplementedError


class GradNormSampling(_ScoreTopK):
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
        super().__init__(norm, backend, device, loader_batch_size, score_options, missing_label, random_state)
        self.score = score

    def _score_pool(self, module: Any, loader: Any, **options) -> torch.Tensor:
        return score_pool(module, loader, score=self.score, **options)


class EGLSampling(_ScoreTopK):
    """Query the candidates with the largest expected gradient length.

    EGL(x) = sum_c p_c(x) || d CE(f(x), c) / d theta ||, computed exactly per sample by
    ``gradnorm_engine.expected_gradient_length``. The batch is the ``batch_size`` largest, ties
    by the lower candidate position; utilities are the EGL values (np.nan for non-candidates and
    for the samples picked earlier in the batch), as in ``GradNormSampling``.

    Parameters
    ----------
    norm, backend, device : see ``gradnorm_engine.score_pool``.
    top_m : int or None, default=None
        Sum over each sample's ``top_m`` likeliest classes only (None: every class).
    loader_batch_size : int, default=256
        Samples per loader batch when streaming candidates (does not change the values).
    score_options : dict or None
        Further ``score_pool`` keyword options but ``score`` (``params``, ``logits_fn``,
        ``autocast``, ``max_memory``, ``chunk_size``, ``progress``), as in ``GradNormSampling``.
    missing_label, random_state : as in every scikit-activeml strategy.
    """

    def __init__(
        self,
        norm: str = "frobenius",
        backend: str = "auto",
        device: Any = None,
        top_m: int | None = None,
        loader_batch_size: int = 256,
        score_options: dict | None = None,
        missing_label: Any = _base.MISSING_LABEL,
        random_state: Any = None,
    ):
        super().__init__(norm, backend, device, loader_batch_size, score_options, missing_label, random_state)
        self.top_m = top_m

    def _score_pool(self, module: Any, loader: Any, **options) -> torch.Tensor:
        return expected_gradient_length(module, loader, top_m=self.top_m, **options)


class BadgeSampling(_TorchPoolQueryStrategy):
    """Query BADGE's picks: k-means++ seeds over the candidates' last-layer gradient embeddings.

    The batch is ``gradnorm_engine.badge(module, candidates, batch_size)``, in pick order, from
    the factorised embeddings (never materialised; scikit-activeml's own ``Badge`` builds the
    [n, C x D] array). Utilities follow scikit-activeml's ``Badge``: row i is the probability
    each candidate had of being the i-th pick (row 0: ||g(x)||^2 normalised, the first pick its
    largest; then D^2 sampling), np.nan for the samples picked before it and non-candidates.

    Parameters
    ----------
    layer : torch.nn.Module or None, default=None
        The layer producing the logits (default: the module's last ``nn.Linear``); its output
        must be the module's output (logits), so a module ending in a softmax is refused.
    device : see ``gradnorm_engine.score_pool``.
    loader_batch_size : int, default=256
        Samples per loader batch when streaming candidates (does not change the picks).
    badge_options : dict or None
        Further keyword options of ``badge`` (``logits_fn``, ``progress``, input options).
    missing_label : as in every scikit-activeml strategy.
    random_state : int or np.random.RandomState, default=0
        Seeds the draws, the scikit-activeml way: each query draws its torch seed from the
        ``random_state_`` that scikit-activeml derives from ``random_state`` and the number of
        unlabeled samples, so a query's picks depend only on ``random_state``, ``y`` and the
        model (a resumed run picks alike), and differ between rounds. None: numpy's global state.
    """

    def __init__(
        self,
        layer: Any = None,
        device: Any = None,
        loader_batch_size: int = 256,
        badge_options: dict | None = None,
        missing_label: Any = _base.MISSING_LABEL,
        random_state: Any = DEFAULT_SEED,
    ):
        super().__init__(device, loader_batch_size, missing_label, random_state)
        self.layer = layer
        self.badge_options = badge_options

    def _select(self, clf: Any, X_cand: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        module, loader, options = self._module_loader(clf, X_cand, self.badge_options)
        generator = badge_generator(self.torch_seed())
        picks = badge_picks(module, loader, batch_size, generator=generator, layer=self.layer, device=self.device,
                            **options)
        return picks.positions.numpy(), picks.draw_weights()

    def torch_seed(self) -> int:
        """The seed of this query's torch generator, from ``random_state_`` (set by ``query``)."""
        return int(self.random_state_.randint(2**31))


__all__ = ["BadgeSampling", "EGLSampling", "GradNormSampling"]
