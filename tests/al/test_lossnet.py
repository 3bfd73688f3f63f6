"""LossNet shapes, the stage taps, and the pairwise ranking loss against hand computations."""
import pytest
import torch
import torchvision

from gradnorm_engine.al.lossnet import (LossNet, has_stage_taps, lossnet_for, ranking_loss, ranking_loss_reference,
                                     stage_channels, stage_taps)
from gradnorm_engine.al.models import cifar_resnet18, small_cnn


def test_lossnet_shapes_on_cifar_resnet_taps():
    model = cifar_resnet18(num_classes=10, in_channels=3, width=4)
    x = torch.randn(6, 3, 16, 16)
    logits, features = stage_taps(model)(x)
    assert logits.shape == (6, 10)
    assert [tuple(f.shape) for f in features] == [(6, 4, 16, 16), (6, 8, 8, 8), (6, 16, 4, 4), (6, 32, 2, 2)]
    lossnet = lossnet_for(model, x[:1])
    assert lossnet.channels == (4, 8, 16, 32)
    # per tap Linear(C, 128) -> ReLU, then Linear(4 * 128, 1)
    assert [t[0].in_features for t in lossnet.taps] == [4, 8, 16, 32]
    assert all(t[0].out_features == 128 for t in lossnet.taps)
    assert (lossnet.head.in_features, lossnet.head.out_features) == (512, 1)
    assert lossnet(features).shape == (6,)


def test_lossnet_is_gap_linear_relu_concat_linear():
    torch.manual_seed(1)
    lossnet = LossNet([3, 5], hidden=4)
    feats = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    hidden = [torch.relu(tap[0](f.mean(dim=(2, 3)))) for tap, f in zip(lossnet.taps, feats)]
    expected = lossnet.head(torch.cat(hidden, dim=1)).squeeze(1)
    torch.testing.assert_close(lossnet(feats), expected)
    with pytest.raises(ValueError, match="2 feature maps"):
        lossnet(feats[:1])


def test_torchvision_resnet_taps_layer1_to_layer4_with_hooks():
    model = torchvision.models.resnet18(num_classes=7)
    assert has_stage_taps(model)
    taps = stage_taps(model)
    assert stage_taps(model) is taps  # hooks registered once
    logits, features = taps(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 7)
    assert [f.shape[1] for f in features] == [64, 128, 256, 512]
    assert stage_channels(model, torch.randn(1, 3, 32, 32)) == [64, 128, 256, 512]
    assert "_lossnet_taps" not in model.state_dict()


def test_model_without_stages_is_refused():
    model = small_cnn()
    assert not has_stage_taps(model)
    with pytest.raises(ValueError, match="stage outputs"):
        stage_taps(model)


def test_ranking_loss_by_hand():
    # B = 4: pairs (0, 3) and (1, 2).
    pred = torch.tensor([0.5, 2.0, 1.0, 0.2])
    target = torch.tensor([3.0, 1.0, 2.0, 0.5])
    # pair (0,3): target 3 > 0.5 -> s = +1, max(0, 1 - (0.5 - 0.2)) = 0.7
    # pair (1,2): target 1 < 2   -> s = -1, max(0, 1 + (2.0 - 1.0)) = 2.0
    expected = (0.7 + 2.0) / 2
    assert ranking_loss(pred, target).item() == pytest.approx(expected)
    assert ranking_loss_reference(pred.tolist(), target.tolist()) == pytest.approx(expected)


def test_ranking_loss_satisfied_margin_and_ties():
    # correctly ordered with a gap above the margin: zero loss
    assert ranking_loss(torch.tensor([3.0, 0.0]), torch.tensor([2.0, 1.0])).item() == 0.0
    # equal targets count as s = -1: max(0, 1 + (p_i - p_j)) = 1 + 0.5
    assert ranking_loss(torch.tensor([0.5, 0.0]), torch.tensor([1.0, 1.0])).item() == pytest.approx(1.5)


def test_ranking_loss_odd_batch_drops_the_middle_sample():
    pred = torch.tensor([0.0, 1.0, 100.0, 2.0, 0.3])
    target = torch.tensor([1.0, 0.0, -50.0, 1.0, 2.0])
    # pairs (0,4) and (1,3); the middle sample (index 2) must not matter
    expected = ranking_loss_reference(pred.tolist(), target.tolist())
    assert ranking_loss(pred, target).item() == pytest.approx(expected)
    pred2, target2 = pred.clone(), target.clone()
    pred2[2], target2[2] = -7.0, 9.0
    assert ranking_loss(pred2, target2).item() == pytest.approx(expected)


def test_ranking_loss_single_sample_is_zero_and_differentiable():
    pred = torch.tensor([0.3], requires_grad=True)
    loss = ranking_loss(pred, torch.tensor([1.0]))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None


def test_ranking_loss_gradient_does_not_reach_the_target():
    pred = torch.randn(6, requires_grad=True)
    target = torch.randn(6, requires_grad=True)
    ranking_loss(pred, target).backward()
    assert target.grad is None
    assert pred.grad is not None


@pytest.mark.parametrize("b", [2, 3, 8, 9])
def test_ranking_loss_matches_reference_on_random_batches(b):
    pred, target = torch.randn(b, dtype=torch.float64), torch.randn(b, dtype=torch.float64)
    assert ranking_loss(pred, target).item() == pytest.approx(ranking_loss_reference(pred.tolist(), target.tolist()))


def test_taps_of_a_deep_copied_torchvision_resnet_feed_the_copy():
    import copy

    import torchvision

    from gradnorm_engine.al.lossnet import stage_taps

    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=3).eval()
    stage_taps(original)(torch.randn(1, 3, 32, 32))
    twin = copy.deepcopy(original)
    x = torch.randn(2, 3, 32, 32)
    logits, features = stage_taps(twin)(x)
    assert [f.shape[1] for f in features] == [64, 128, 256, 512]
    torch.testing.assert_close(stage_taps(original)(x)[1][3], features[3])
