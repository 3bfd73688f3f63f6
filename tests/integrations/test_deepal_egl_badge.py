"""DeepAL / DeepAL+ adapter, EGL and BADGE: EGLSampling.query(n) returns the top-n of
expected_gradient_length, BadgeSampling.query(n) badge's n picks, as dataset indices.

The miniature DeepAL (and DeepAL+, where GradNormSampling takes its interface) are
test_deepal's."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gradnorm_engine import badge, expected_gradient_length, top_k
from gradnorm_engine.integrations.deepal import BadgeSampling, EGLSampling, GradNormSampling
from tests.integrations import test_deepal
from tests.integrations.test_deepal import N_QUERY, Data, Handler, Net


def _egl_picks(module, data, k, **options):
    egl = expected_gradient_length(module, DataLoader(data, batch_size=19), progress=False, **options)
    return top_k(egl, k).indices.numpy()


def _badge_picks(module, data, k, seed=0, **options):
    return badge(module, DataLoader(data, batch_size=64), k, generator=torch.Generator().manual_seed(seed),
                 progress=False, **options).numpy()


def _deepal_setup(digits, cnn_class, initial=20):
    X, y = digits
    dataset = Data(torch.from_numpy(X).reshape(-1, 1, 8, 8), torch.from_numpy(y), Handler)
    dataset.initialize_labels(initial)
    net = Net(lambda: cnn_class(with_embedding=True),
              {"n_epoch": 2, "train_args": {"batch_size": 32}, "test_args": {"batch_size": 64}})
    return dataset, net


def _two_rounds(strategy, dataset, unlabeled_view, expected_positions):
    """train, then two query/update/train rounds; each query must return the dataset indices of
    expected_positions(module, the unlabeled data as scored)."""
    strategy.train()
    for _ in range(2):
        unlabeled_idxs, data = unlabeled_view()
        query_idxs = strategy.query(N_QUERY)
        np.testing.assert_array_equal(query_idxs, unlabeled_idxs[expected_positions(strategy.module, data)])
        assert not dataset.labeled_idxs[query_idxs].any()
        strategy.update(query_idxs)
        strategy.train()
    assert dataset.labeled_idxs.sum() == 20 + 2 * N_QUERY


@pytest.mark.parametrize("make, expected", [
    (lambda d, n: EGLSampling(d, n, top_m=3), lambda m, data: _egl_picks(m, data, N_QUERY, top_m=3)),
    (lambda d, n: BadgeSampling(d, n), lambda m, data: _badge_picks(m, data, N_QUERY)),   # seed 0
], ids=["egl", "badge"])
def test_two_deepal_query_rounds(digits, cnn_class, make, expected):
    dataset, net = _deepal_setup(digits, cnn_class)
    strategy = make(dataset, net)
    assert isinstance(strategy, GradNormSampling)   # DeepAL's Strategy interface, as GradNormSampling
    _two_rounds(strategy, dataset, dataset.get_unlabeled_data, expected)


def test_plain_module_options_generator_and_layer(digits, cnn_class):
    dataset, _ = _deepal_setup(digits, cnn_class, initial=50)
    model = cnn_class()
    unlabeled_idxs, data = dataset.get_unlabeled_data()
    egl = EGLSampling(dataset, model, loader_args={"batch_size": 40}, norm="tensor_sum")
    np.testing.assert_array_equal(egl.query(4), unlabeled_idxs[_egl_picks(model, data, 4, norm="tensor_sum")])

    # a generator advances across queries: two queries draw as two badge calls on one generator
    strategy = BadgeSampling(dataset, model, generator=torch.Generator().manual_seed(8), layer=model.head)
    reference = torch.Generator().manual_seed(8)
    for _ in range(2):
        want = badge(model, DataLoader(data, batch_size=64), 5, layer=model.head, generator=reference, progress=False)
        np.testing.assert_array_equal(strategy.query(5), unlabeled_idxs[want.numpy()])
    # a seed starts every query afresh: the same pool and model, the same picks
    seeded = BadgeSampling(dataset, model, seed=8)
    np.testing.assert_array_equal(seeded.query(5), seeded.query(5))
    np.testing.assert_array_equal(seeded.query(5), unlabeled_idxs[_badge_picks(model, data, 5, seed=8)])
    with pytest.raises(ValueError, match="cannot query 0"):
        seeded.query(0)


def test_two_deepal_plus_query_rounds_score_the_test_transform(digits, cnn_class):
    """DeepAL+'s get_strategy builds Strategy(dataset, net, args_input, args_task): EGLSampling and
    BadgeSampling take it where GradNormSampling does, and score the same pool it scores."""
    plus_setup = getattr(test_deepal, "plus_setup", None)
    if plus_setup is None:
        pytest.skip("this GradNormSampling has no DeepAL+ interface (test_deepal has no plus_setup)")
    for make, expected in ((EGLSampling, lambda m, data: _egl_picks(m, data, N_QUERY)),
                           (BadgeSampling, lambda m, data: _badge_picks(m, data, N_QUERY))):
        dataset, net, args_input, args_task = plus_setup(digits, cnn_class)
        strategy = make(dataset, net, args_input, args_task)
        _two_rounds(strategy, dataset, lambda: test_deepal.unlabeled_view(dataset, args_task["transform"]), expected)
