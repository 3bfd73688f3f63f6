"""modAL adapter: ActiveLearner.query with gradnorm_sampling picks rank_unlabeled's top-k."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("modAL")
skorch = pytest.importorskip("skorch")

from modAL.models import ActiveLearner  # noqa: E402

from gradnorm_engine import rank_unlabeled  # noqa: E402
from gradnorm_engine.integrations import modal  # noqa: E402

N_QUERY = 8


def _net(module, **kwargs):
    return skorch.NeuralNetClassifier(module, max_epochs=3, lr=0.2, batch_size=32, train_split=None,
                                      verbose=0, **kwargs)


def _expected(module, X_pool, k, **options):
    loader = DataLoader(TensorDataset(torch.from_numpy(X_pool)), batch_size=64)
    return rank_unlabeled(module, loader, k, progress=False, **options)


def test_two_query_rounds_pick_the_largest_gradient_norms(digits, mlp_class):
    X, y = digits
    net = _net(mlp_class, criterion=nn.CrossEntropyLoss)
    learner = ActiveLearner(estimator=net, query_strategy=modal.gradnorm_sampling,
                            X_training=X[:20], y_training=y[:20])
    X_pool, y_pool = X[20:], y[20:]
    for _ in range(2):
        expected = _expected(learner.estimator.module_, X_pool, N_QUERY)
        query_idx, query_X = learner.query(X_pool, n_instances=N_QUERY)
        np.testing.assert_array_equal(np.asarray(query_idx), expected.indices.numpy())
        np.testing.assert_array_equal(query_X, X_pool[query_idx])
        learner.teach(X_pool[query_idx], y_pool[query_idx])
        X_pool, y_pool = np.delete(X_pool, query_idx, axis=0), np.delete(y_pool, query_idx, axis=0)
    assert len(learner.X_training) == 20 + 2 * N_QUERY


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
