"""The thin trainer: learns, handles odd batches, detaches LossNet's features after detach_epoch."""
import math

import pytest
import torch

from gradnorm_engine.al.datasets import load_digits
from gradnorm_engine.al.lossnet import lossnet_for
from gradnorm_engine.al.models import cifar_resnet18, small_cnn
from gradnorm_engine.al.trainer import TrainConfig, _batches, evaluate, train


pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _fit(data, idx, config, *, with_lossnet, seed=0):
    torch.manual_seed(seed)
    model = cifar_resnet18(num_classes=10, in_channels=1, width=4)
    lossnet = lossnet_for(model, data.train.batch(torch.tensor([0]), "cpu")[0]) if with_lossnet else None
    stats = train(model, data.train, idx, config, device=CPU, lossnet=lossnet,
                  generator=torch.Generator().manual_seed(seed))
    return model, lossnet, stats


def test_small_cnn_learns_digits(digits):
    torch.manual_seed(0)
    model = small_cnn(num_classes=10, in_channels=1)
    idx = torch.arange(300)
    stats = train(model, digits.train, idx, TrainConfig(epochs=15, lr=0.1, milestones=(12,), batch_size=16,
                                                        progress=False), device=CPU,
                  generator=torch.Generator().manual_seed(0))
    assert stats.history[-1] < stats.history[0]
    acc, per_class = evaluate(model, digits.test, CPU, num_classes=10)
    assert acc > 55.0
    assert len(per_class) == 10 and all(0.0 <= a <= 100.0 for a in per_class)
    # overall accuracy is the test-size-weighted mean of the per-class accuracies
    counts = torch.bincount(digits.test.labels, minlength=10).tolist()
    assert acc == pytest.approx(sum(a * c for a, c in zip(per_class, counts)) / sum(counts))


def test_joint_training_odd_batches_and_ranking_loss(digits):
    config = TrainConfig(epochs=2, lr=0.05, batch_size=7, progress=False)  # 23 = 7+7+9 (odd batches)
    model, lossnet, stats = _fit(digits, torch.arange(23), config, with_lossnet=True)
    assert stats.final_ranking is not None and math.isfinite(stats.final_ranking)
    assert all(math.isfinite(v) for v in stats.history)


def test_the_training_defaults_are_the_methods():
    """method.md: SGD momentum 0.9, weight decay 5e-4, batch 128; total = mean CE + 1 * L_pair
    with margin 1 (the ranking loss itself is checked by hand in test_lossnet.py)."""
    config = TrainConfig(epochs=1, lr=0.1)
    assert (config.momentum, config.weight_decay, config.batch_size) == (0.9, 5e-4, 128)
    assert (config.loss_weight, config.margin) == (1.0, 1.0)


def test_the_ranking_term_uses_the_configured_margin(digits):
    """The same data and seeds, margins 1 and 0: the hinge max(0, -s*d + margin) differs."""
    ranking = []
    for margin in (1.0, 0.0):
        config = TrainConfig(epochs=1, lr=0.05, batch_size=8, margin=margin, progress=False)
        _, _, stats = _fit(digits, torch.arange(16), config, with_lossnet=True)
        ranking.append(stats.final_ranking)
    assert ranking[0] > ranking[1] >= 0.0


def test_detached_features_leave_the_main_model_as_in_ce_training(digits):
    """From detach_epoch 0 LossNet cannot shape f: f's weights equal CE-only training exactly."""
    idx = torch.arange(40)
    detached = TrainConfig(epochs=2, lr=0.05, batch_size=16, detach_epoch=0, progress=False)
    joint, _, _ = _fit(digits, idx, detached, with_lossnet=True)
    alone, _, _ = _fit(digits, idx, detached, with_lossnet=False)
    for (name, a), b in zip(joint.state_dict().items(), alone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # without detaching, the ranking loss changes f
    attached = TrainConfig(epochs=2, lr=0.05, batch_size=16, detach_epoch=None, progress=False)
    shaped, _, _ = _fit(digits, idx, attached, with_lossnet=True)
    assert not torch.equal(shaped.linear.weight, alone.linear.weight)


def test_batches_cover_every_index_once_and_never_leave_a_single_sample():
    for n, b in [(10, 3), (9, 4), (5, 8), (129, 128)]:
        parts = _batches(n, b, torch.Generator().manual_seed(0))
        assert sorted(torch.cat(parts).tolist()) == list(range(n))
        assert all(p.numel() >= 2 for p in parts)


def test_train_needs_two_samples(digits):
    with pytest.raises(ValueError, match="at least 2"):
        train(small_cnn(), digits.train, torch.tensor([0]), TrainConfig(epochs=1, lr=0.1, progress=False), device=CPU)
