"""scikit-activeml adapter: GradNormSampling.query picks rank_unlabeled's top-k of the candidates."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("skactiveml")
pytest.importorskip("skorch")

from skactiveml.classifier import SkorchClassifier  # noqa: E402
from skactiveml.utils import check_random_state, unlabeled_indices  # noqa: E402

from gradnorm_engine import badge, expected_gradient_length, rank_unlabeled, top_k  # noqa: E402
from gradnorm_engine.integrations.skactiveml import BadgeSampling, EGLSampling, GradNormSampling  # noqa: E402

BATCH = 8


def _clf(module_class):
    return SkorchClassifier(module_class, classes=np.arange(10), random_state=0,
                            neural_net_param_dict={"max_epochs": 3, "lr": 0.2, "batch_size": 32,
                                                   "train_split": None, "verbose": 0})


def _ranked(clf, X_cand, k, **options):
    loader = DataLoader(TensorDataset(torch.from_numpy(X_cand)), batch_size=50)
    return rank_unlabeled(clf.neural_net_.module_, loader, k, progress=False, **options)


def test_two_query_rounds_pick_the_largest_gradient_norms(digits, mlp_class):
    X, y_true = digits
    y = np.full(len(X), np.nan)
    y[:20] = y_true[:20]
    clf, qs = _clf(mlp_class), GradNormSampling(random_state=0)
    for _ in range(2):
        clf.fit(X, y)
        unlabeled = unlabeled_indices(y)
        expected = unlabeled[_ranked(clf, X[unlabeled], BATCH).indices.numpy()]
        query_idx, utilities = qs.query(X, y, clf, fit_clf=False, batch_size=BATCH, return_utilities=True)
        np.testing.assert_array_equal(query_idx, expected)
        assert utilities.shape == (BATCH, len(X))
        assert np.isnan(utilities[:, :20]).all()                      # labeled samples
        for i in range(BATCH):                                         # earlier picks masked
            assert np.isnan(utilities[i, query_idx[:i]]).all()
            assert np.nanargmax(utilities[i]) == query_idx[i]
        y[query_idx] = y_true[query_idx]
    assert np.count_nonzero(~np.isnan(y)) == 20 + 2 * BATCH


def test_candidate_indices_and_candidate_samples(digits, mlp_class):
    X, y_true = digits
    y = np.full(len(X), np.nan)
    y[:30] = y_true[:30]
    clf = _clf(mlp_class).fit(X, y)
    qs = GradNormSampling(norm="tensor_sum")
    candidates = np.arange(100, 200)
    expected = _ranked(clf, X[candidates], 5, norm="tensor_sum").indices.numpy()

    query_idx = qs.query(X, y, clf, fit_clf=False, candidates=candidates, batch_size=5)
    np.testing.assert_array_equal(query_idx, candidates[expected])

    query_idx, utilities = qs.query(X, y, clf, fit_clf=False, candidates=X[candidates], batch_size=5,
                                    return_utilities=True)
    np.testing.assert_array_equal(query_idx, expected)                # positions in the candidates
    assert utilities.shape == (5, len(candidates))


def test_fit_clf_fits_a_clone_and_leaves_clf_alone(digits, mlp_class):
    X, y_true = digits
    y = np.full(len(X), np.nan)
    y[:30] = y_true[:30]
    clf = _clf(mlp_class)
    query_idx = GradNormSampling().query(X, y, clf, batch_size=3)
    assert query_idx.shape == (3,) and np.isnan(y[query_idx]).all()
    assert not hasattr(clf, "neural_net_")


def _two_rounds(digits, mlp_class, qs, expected_for):
    """Two fit/query/label rounds; each query must return expected_for(clf, unlabeled). -> the utilities"""
    X, y_true = digits
    y = np.full(len(X), np.nan)
    y[:20] = y_true[:20]
    clf = _clf(mlp_class)
    rounds = []
    for _ in range(2):
        clf.fit(X, y)
        unlabeled = unlabeled_indices(y)
        expected = expected_for(clf, unlabeled)
        query_idx, utilities = qs.query(X, y, clf, fit_clf=False, batch_size=BATCH, return_utilities=True)
        np.testing.assert_array_equal(query_idx, expected)
        assert utilities.shape == (BATCH, len(X)) and np.isnan(utilities[:, :20]).all()
        for i in range(BATCH):                                         # earlier picks masked
            assert np.isnan(utilities[i, query_idx[:i]]).all()
        rounds.append(utilities)
        y[query_idx] = y_true[query_idx]
    assert np.count_nonzero(~np.isnan(y)) == 20 + 2 * BATCH
    return rounds


def test_two_egl_query_rounds_pick_the_largest_expected_gradient_lengths(digits, mlp_class):
    X, _ = digits
    seen = []

    def expected(clf, unlabeled):
        loader = DataLoader(TensorDataset(torch.from_numpy(X[unlabeled])), batch_size=50)
        egl = expected_gradient_length(clf.neural_net_.module_, loader, norm="tensor_sum", progress=False)
        seen.append((unlabeled, egl.numpy()))
        return unlabeled[top_k(egl, BATCH).indices.numpy()]

    rounds = _two_rounds(digits, mlp_class, EGLSampling(norm="tensor_sum"), expected)
    for utilities, (unlabeled, egl) in zip(rounds, seen):              # the utilities are the EGL values
        np.testing.assert_allclose(utilities[0, unlabeled], egl, rtol=1e-6)


def test_two_badge_query_rounds_pick_badges_picks(digits, mlp_class):
    X, _ = digits

    def expected(clf, unlabeled):
        # scikit-activeml's own seeding: random_state and the number of unlabeled samples
        seed = int(check_random_state(7, len(unlabeled) + 1).randint(2**31))
        loader = DataLoader(TensorDataset(torch.from_numpy(X[unlabeled])), batch_size=50)
        picks = badge(clf.neural_net_.module_, loader, BATCH, generator=torch.Generator().manual_seed(seed),
                      progress=False).numpy()
        return unlabeled[picks]

    for utilities in _two_rounds(digits, mlp_class, BadgeSampling(random_state=7), expected):
        np.testing.assert_allclose(np.nansum(utilities, axis=1), 1.0, rtol=1e-9)   # D^2 probabilities
    assert BadgeSampling().random_state == 0                          # a fixed seed by default


def test_badge_candidates_utilities_and_layer(digits, mlp_class):
    X, y_true = digits
    y = np.full(len(X), np.nan)
    y[:30] = y_true[:30]
    clf = _clf(mlp_class).fit(X, y)
    module = clf.neural_net_.module_
    candidates = np.arange(100, 160)
    qs = BadgeSampling(layer=module.net[2])
    query_idx, utilities = qs.query(X, y, clf, fit_clf=False, candidates=X[candidates], batch_size=4,
                                    return_utilities=True)
    seed = int(check_random_state(0, int(np.isnan(y).sum()) + 1).randint(2**31))
    loader = DataLoader(TensorDataset(torch.from_numpy(X[candidates])), batch_size=50)
    np.testing.assert_array_equal(query_idx, badge(module, loader, 4, generator=torch.Generator().manual_seed(seed),
                                                   progress=False).numpy())
    assert utilities.shape == (4, len(candidates))
    assert np.argmax(utilities[0]) == query_idx[0]                     # the first pick: the largest ||g||
    np.testing.assert_array_equal(qs.query(X, y, clf, fit_clf=False, candidates=X[candidates], batch_size=4),
                                  query_idx)                           # same random_state, same y: same picks
