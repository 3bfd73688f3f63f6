"""baal adapter: ActiveLearningLoop.step() labels rank_unlabeled's top-k of the pool (GradNorm), the top-k of
expected_gradient_length (ExpectedGradientLength) or badge's k picks (Badge)."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("baal")

from baal.active import ActiveLearningDataset, ActiveLearningLoop  # noqa: E402
from baal.modelwrapper import ModelWrapper, TrainingArgs  # noqa: E402

from gradnorm_engine import badge, expected_gradient_length, rank_unlabeled, top_k  # noqa: E402
from gradnorm_engine.integrations.baal import (  # noqa: E402
    Badge, ExpectedGradientLength, GradNorm, badge_loop, egl_loop, gradnorm_loop)

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


def _newly_labelled(al_dataset, step):
    before = al_dataset.labelled.copy()
    assert step()
    return np.flatnonzero(al_dataset.labelled & ~before)


def test_two_egl_steps_label_the_largest_expected_gradient_lengths(digits, cnn_class):
    al_dataset, model, wrapper = _setup(digits, cnn_class)
    loop = egl_loop(al_dataset, wrapper, query_size=QUERY, norm="tensor_sum")
    assert isinstance(loop, ActiveLearningLoop) and isinstance(loop.heuristic, ExpectedGradientLength)
    for _ in range(2):
        wrapper.train_on_dataset(al_dataset)
        pool_to_dataset = np.flatnonzero(~al_dataset.labelled)
        egl = expected_gradient_length(model, DataLoader(al_dataset.pool, batch_size=23), norm="tensor_sum",
                                       progress=False)
        expected = top_k(egl, QUERY).indices.numpy()
        ranks, _ = loop.heuristic.get_ranks(loop.heuristic.get_scores(al_dataset.pool))
        np.testing.assert_array_equal(ranks[:QUERY], expected)
        np.testing.assert_array_equal(_newly_labelled(al_dataset, loop.step), np.sort(pool_to_dataset[expected]))
    assert al_dataset.n_labelled == 20 + 2 * QUERY


def test_egl_ties_go_to_the_lower_pool_position(cnn_class):
    """Copies of one image have one EGL: the loop labels the first copies of the pool."""
    image = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    al_dataset = ActiveLearningDataset(TensorDataset(image.repeat(30, 1, 1, 1), torch.zeros(30, dtype=torch.int64)))
    al_dataset.label(np.arange(0, 30, 3))                             # pool: dataset 1, 2, 4, 5, 7, ...
    torch.manual_seed(0)
    loop = egl_loop(al_dataset, cnn_class(), query_size=4, top_m=3, max_sample=100)   # max_sample: the loop's
    assert loop.max_sample == 100 and loop.heuristic.score_options == {"progress": False}
    np.testing.assert_array_equal(_newly_labelled(al_dataset, loop.step), [1, 2, 4, 5])


def test_two_badge_steps_label_badges_picks(digits, cnn_class):
    al_dataset, model, wrapper = _setup(digits, cnn_class)
    loop = badge_loop(al_dataset, wrapper, query_size=QUERY)          # seed 0
    assert isinstance(loop.heuristic, Badge) and loop.heuristic.query_size == QUERY
    for _ in range(2):
        wrapper.train_on_dataset(al_dataset)
        pool_to_dataset = np.flatnonzero(~al_dataset.labelled)
        expected = badge(model, DataLoader(al_dataset.pool, batch_size=23), QUERY,
                         generator=torch.Generator().manual_seed(0), progress=False).numpy()
        scores = loop.heuristic.get_scores(al_dataset.pool)
        ranks, _ = loop.heuristic.get_ranks(scores)
        np.testing.assert_array_equal(ranks[:QUERY], expected)        # the picks, in pick order
        np.testing.assert_array_equal(loop.heuristic.last_picks.numpy(), expected)
        assert np.count_nonzero(scores) == QUERY
        np.testing.assert_array_equal(ranks[QUERY:], np.setdiff1d(np.arange(len(scores)), expected))
        np.testing.assert_array_equal(_newly_labelled(al_dataset, loop.step), np.sort(pool_to_dataset[expected]))
    assert al_dataset.n_labelled == 20 + 2 * QUERY


def test_badge_generator_advances_across_steps_and_seeds_differ(digits, cnn_class):
    al_dataset, model, wrapper = _setup(digits, cnn_class)
    wrapper.train_on_dataset(al_dataset)
    heuristic = Badge(model, QUERY, generator=torch.Generator().manual_seed(5), batch_size=40)
    loop = ActiveLearningLoop(al_dataset, heuristic.get_scores, heuristic=heuristic, query_size=QUERY)
    reference = torch.Generator().manual_seed(5)
    for _ in range(2):
        pool_to_dataset = np.flatnonzero(~al_dataset.labelled)
        expected = badge(model, DataLoader(al_dataset.pool, batch_size=40), QUERY, generator=reference,
                         progress=False).numpy()
        np.testing.assert_array_equal(_newly_labelled(al_dataset, loop.step), np.sort(pool_to_dataset[expected]))
    one, other = (Badge(model, QUERY, seed=s).get_scores(al_dataset.pool) for s in (1, 2))
    assert not np.array_equal(one, other)                               # the seed decides the draws
    np.testing.assert_array_equal(Badge(model, QUERY, seed=1).get_scores(al_dataset.pool), one)
    with pytest.raises(TypeError, match="seed"):
        Badge(model, QUERY, seed=None)
