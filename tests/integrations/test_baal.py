"""baal adapter: ActiveLearningLoop.step() labels rank_unlabeled's top-k of the pool."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("baal")

from baal.active import ActiveLearningDataset, ActiveLearningLoop  # noqa: E402
from baal.modelwrapper import ModelWrapper, TrainingArgs  # noqa: E402

from gradnorm_engine import rank_unlabeled  # noqa: E402
from gradnorm_engine.integrations.baal import GradNorm, gradnorm_loop  # noqa: E402

QUERY = 10


def _setup(digits, cnn_class):
    X, y = digits
    images = torch.from_numpy(X).reshape(-1, 1, 8, 8)                 # (N, 1, 8, 8)
    al_dataset = ActiveLearningDataset(TensorDataset(images, torch.from_numpy(y)), random_state=0)
    al_dataset.label_randomly(20)
    model = cnn_class()
    wrapper = ModelWrapper(model, TrainingArgs(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
        batch_size=32, epoch=2, use_cuda=False, workers=0))
    return al_dataset, model, wrapper


def test_two_loop_steps_label_the_largest_gradient_norms(digits, cnn_class):
    al_dataset, model, wrapper = _setup(digits, cnn_class)
    loop = gradnorm_loop(al_dataset, wrapper, query_size=QUERY)
    assert isinstance(loop, ActiveLearningLoop)
    for _ in range(2):
        wrapper.train_on_dataset(al_dataset)
        pool_to_dataset = np.flatnonzero(~al_dataset.labelled)
        expected = rank_unlabeled(model, DataLoader(al_dataset.pool, batch_size=23), QUERY, progress=False)
        ranks, _ = loop.heuristic.get_ranks(loop.heuristic.get_scores(al_dataset.pool))
        np.testing.assert_array_equal(ranks[:QUERY], expected.indices.numpy())

        labelled_before = al_dataset.labelled.copy()
        assert loop.step()
        newly_labelled = np.flatnonzero(al_dataset.labelled & ~labelled_before)
        np.testing.assert_array_equal(newly_labelled, np.sort(pool_to_dataset[expected.indices.numpy()]))
    assert al_dataset.n_labelled == 20 + 2 * QUERY


def test_hand_built_loop_with_score_options(digits, cnn_class):
    al_dataset, model, wrapper = _setup(digits, cnn_class)
    wrapper.train_on_dataset(al_dataset)
    heuristic = GradNorm(model, batch_size=50, score="pseudo_label_ce", norm="tensor_sum")
    loop = ActiveLearningLoop(al_dataset, heuristic.get_scores, heuristic=heuristic, query_size=5,
                              iterations=20)                          # a BALD habit: ignored
    pool_to_dataset = np.flatnonzero(~al_dataset.labelled)
    expected = rank_unlabeled(model, DataLoader(al_dataset.pool, batch_size=50), 5,
                              score="pseudo_label_ce", norm="tensor_sum", progress=False)
    labelled_before = al_dataset.labelled.copy()
    assert loop.step()
    np.testing.assert_array_equal(np.flatnonzero(al_dataset.labelled & ~labelled_before),
                                  np.sort(pool_to_dataset[expected.indices.numpy()]))


def test_predictions_instead_of_scores_are_refused(digits, cnn_class):
    al_dataset, _, wrapper = _setup(digits, cnn_class)
    loop = ActiveLearningLoop(al_dataset, wrapper.predict_on_dataset, heuristic=GradNorm(wrapper),
                              query_size=5, iterations=1, verbose=False)
    with pytest.raises(ValueError, match="get_scores"):
        loop.step()


def test_mc_dropout_patched_models_are_scored_without_their_dropout(digits):
    """baal's patch_module keeps dropout on in eval mode; the scores must still be those of the
    deterministic model (equal on every call), and the layers get their rates back."""
    from baal.bayesian.dropout import patch_module

    X, y = digits
    al_dataset = ActiveLearningDataset(TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), random_state=0)
    al_dataset.label_randomly(20)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
    patched = patch_module(plain, inplace=False)
    assert patched(torch.from_numpy(X[:4])).ne(patched(torch.from_numpy(X[:4]))).any()  # stochastic
    heuristic = GradNorm(patched)
    first, second = heuristic.get_scores(al_dataset.pool), heuristic.get_scores(al_dataset.pool)
    np.testing.assert_array_equal(first, second)
    want = rank_unlabeled(plain, DataLoader(al_dataset.pool, batch_size=64), QUERY, progress=False)
    ranks, _ = heuristic.get_ranks(first)
    np.testing.assert_array_equal(ranks[:QUERY], want.indices.numpy())
    assert [m.p for m in patched.modules() if type(m).__module__.startswith("baal")] == [0.5]
