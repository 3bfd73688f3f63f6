"""modAL adapter: ActiveLearner.query with gradnorm_sampling picks rank_unlabeled's top-k, with egl_sampling
expected_gradient_length's top-k, with badge_sampling badge's picks."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("modAL")
skorch = pytest.importorskip("skorch")

from modAL.models import ActiveLearner  # noqa: E402

from gradnorm_engine import badge, expected_gradient_length, rank_unlabeled, top_k  # noqa: E402
from gradnorm_engine.integrations import modal  # noqa: E402

N_QUERY = 8


def _net(module, **kwargs):
    return skorch.NeuralNetClassifier(module, max_epochs=3, lr=0.2, batch_size=32, train_split=None,
                                      verbose=0, **kwargs)


def _expected(module, X_pool, k, **options):
    return rank_unlabeled(module, _pool_loader(X_pool), k, progress=False, **options)


def _pool_loader(X_pool):
    return DataLoader(TensorDataset(torch.from_numpy(X_pool)), batch_size=64)


def _two_rounds(learner, X_pool, y_pool, expected_for, **query_kwargs):
    """Two query/teach rounds; each query must return expected_for(module, X_pool)."""
    for _ in range(2):
        expected = expected_for(learner.estimator.module_, X_pool)
        query_idx, query_X = learner.query(X_pool, n_instances=N_QUERY, **query_kwargs)
        np.testing.assert_array_equal(np.asarray(query_idx), expected)
        np.testing.assert_array_equal(query_X, X_pool[query_idx])
        learner.teach(X_pool[query_idx], y_pool[query_idx])
        X_pool, y_pool = np.delete(X_pool, query_idx, axis=0), np.delete(y_pool, query_idx, axis=0)
    assert len(learner.X_training) == 20 + 2 * N_QUERY


def _learner(strategy, digits, mlp_class):
    X, y = digits
    return ActiveLearner(estimator=_net(mlp_class, criterion=nn.CrossEntropyLoss), query_strategy=strategy,
                         X_training=X[:20], y_training=y[:20])


def test_two_query_rounds_pick_the_largest_gradient_norms(digits, mlp_class):
    X, y = digits
    learner = _learner(modal.gradnorm_sampling, digits, mlp_class)
    _two_rounds(learner, X[20:], y[20:], lambda module, X_pool: _expected(module, X_pool, N_QUERY).indices.numpy())


def test_query_keywords_reach_score_pool(digits, mlp_class):
    X, y = digits
    net = _net(mlp_class, criterion=nn.CrossEntropyLoss).fit(X[:30], y[:30])
    learner = ActiveLearner(estimator=net, query_strategy=modal.gradnorm_sampling)
    query_idx, _ = learner.query(X[30:], n_instances=5, score="pseudo_label_ce", norm="tensor_sum")
    expected = _expected(net.module_, X[30:], 5, score="pseudo_label_ce", norm="tensor_sum")
    np.testing.assert_array_equal(np.asarray(query_idx), expected.indices.numpy())


def test_nllloss_net_is_scored_on_log_probabilities(digits, mlp_class):
    """skorch's default NLLLoss: the module outputs probabilities, trained on log(p + eps)."""
    X, y = digits
    net = skorch.NeuralNetClassifier(nn.Sequential(mlp_class(), nn.Softmax(dim=-1)), max_epochs=2,
                                     lr=0.2, train_split=None, verbose=0).fit(X[:30], y[:30])
    eps = torch.finfo(torch.float32).eps
    expected = _expected(net.module_, X[30:], 6, logits_fn=lambda p: torch.log(p + eps))
    scores = modal.gradnorm_scores(net, X[30:])
    assert scores.shape == (len(X) - 30,)
    picked = modal.gradnorm_sampling(net, X[30:], n_instances=6)
    picked = picked[0] if isinstance(picked, tuple) else picked
    np.testing.assert_array_equal(picked, expected.indices.numpy())
    np.testing.assert_allclose(np.sort(scores)[::-1][:6], expected.scores.numpy(), rtol=1e-6)


def test_plain_neuralnet_with_nllloss_is_scored_on_its_raw_log_probabilities(digits, mlp_class):
    """A plain skorch.NeuralNet hands the module's output to NLLLoss as it is: log-probabilities."""
    X, y = digits
    net = skorch.NeuralNet(nn.Sequential(mlp_class(), nn.LogSoftmax(dim=-1)), criterion=nn.NLLLoss, max_epochs=2,
                           lr=0.2, train_split=None, verbose=0).fit(X[:30], y[:30])
    expected = _expected(net.module_, X[30:], 6)
    picked = modal.gradnorm_sampling(net, X[30:], n_instances=6)
    picked = picked[0] if isinstance(picked, tuple) else picked
    np.testing.assert_array_equal(picked, expected.indices.numpy())


def test_returns_what_the_installed_modal_expects(digits, mlp_class, monkeypatch):
    X, y = digits
    net = _net(mlp_class, criterion=nn.CrossEntropyLoss).fit(X[:30], y[:30])
    monkeypatch.setattr(modal, "_strategies_return_metrics", lambda: True)
    indices, scores = modal.gradnorm_sampling(net, X[30:], n_instances=4)
    assert indices.shape == scores.shape == (4,)
    assert np.all(np.diff(scores) <= 0)
    monkeypatch.setattr(modal, "_strategies_return_metrics", lambda: False)
    np.testing.assert_array_equal(modal.gradnorm_sampling(net, X[30:], n_instances=4), indices)


def test_unfitted_learner_says_to_fit_first(digits, mlp_class):
    X, _ = digits
    learner = ActiveLearner(estimator=_net(mlp_class), query_strategy=modal.gradnorm_sampling)
    with pytest.raises(TypeError, match="fit"):
        modal.gradnorm_sampling(learner, X, n_instances=2)


def test_two_egl_query_rounds_pick_the_largest_expected_gradient_lengths(digits, mlp_class):
    X, y = digits
    learner = _learner(modal.egl_sampling, digits, mlp_class)

    def expected(module, X_pool):
        egl = expected_gradient_length(module, _pool_loader(X_pool), top_m=4, progress=False)
        np.testing.assert_allclose(modal.egl_scores(learner, X_pool, top_m=4), egl.numpy(), rtol=1e-6)
        return top_k(egl, N_QUERY).indices.numpy()

    _two_rounds(learner, X[20:], y[20:], expected, top_m=4)


def test_two_badge_query_rounds_pick_badges_picks(digits, mlp_class):
    X, y = digits
    learner = _learner(modal.badge_sampling, digits, mlp_class)

    def expected(module, X_pool):
        return badge(module, _pool_loader(X_pool), N_QUERY, generator=torch.Generator().manual_seed(3),
                     progress=False).numpy()

    _two_rounds(learner, X[20:], y[20:], expected, seed=3)


def test_badge_generator_layer_and_both_return_conventions(digits, mlp_class, monkeypatch):
    X, y = digits
    net = _net(mlp_class, criterion=nn.CrossEntropyLoss).fit(X[:30], y[:30])
    head = net.module_.net[2]
    want = badge(net.module_, _pool_loader(X[30:]), 5, layer=head, generator=torch.Generator().manual_seed(9),
                 progress=False).numpy()
    monkeypatch.setattr(modal, "_strategies_return_metrics", lambda: False)
    picked = modal.badge_sampling(net, X[30:], n_instances=5, layer=head, generator=torch.Generator().manual_seed(9))
    np.testing.assert_array_equal(picked, want)
    monkeypatch.setattr(modal, "_strategies_return_metrics", lambda: True)
    indices, norms = modal.badge_sampling(net, X[30:], n_instances=5, layer=head)   # seed 0
    np.testing.assert_array_equal(indices, badge(net.module_, _pool_loader(X[30:]), 5, progress=False,
                                                 generator=torch.Generator().manual_seed(0)).numpy())
    assert norms.shape == (5,) and np.all(norms > 0)
    indices, egl = modal.egl_sampling(net, X[30:], n_instances=4, norm="tensor_sum")
    assert indices.shape == egl.shape == (4,) and np.all(np.diff(egl) <= 0)
