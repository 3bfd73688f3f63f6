"""norms/normalization.py: BatchNorm (eval), GroupNorm, LayerNorm, RMSNorm vs the per-sample loop."""
import math

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from torch import nn

from gradnorm_engine.testing import check_rule

SETTINGS = settings(max_examples=15, deadline=None)


def _randomise(layer, seed):
    """Running statistics and affine parameters as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in layer.named_buffers():
            if name == "running_mean":
                buf.copy_(torch.randn(buf.shape, generator=gen))
            elif name == "running_var":
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return layer


@SETTINGS
@given(nd=st.sampled_from([0, 1, 2, 3]), batch=st.sampled_from([1, 2, 3, 5]), channels=st.integers(1, 5),
       affine=st.booleans(), seed=st.integers(0, 2**16))
def test_batch_norm_eval_matches_per_sample_loop(nd, batch, channels, affine, seed):
    cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd]
    layer = _randomise(cls(channels, affine=affine), seed)
    torch.manual_seed(seed)
    check_rule(layer, torch.randn(batch, channels, *([3] * nd)))


@SETTINGS
@given(groups=st.integers(1, 3), per_group=st.integers(1, 3), spatial=st.lists(st.integers(1, 4), max_size=2),
       batch=st.sampled_from([1, 2, 3, 5]), affine=st.booleans(), seed=st.integers(0, 2**16))
def test_group_norm_matches_per_sample_loop(groups, per_group, spatial, batch, affine, seed):
    assume(per_group * math.prod(spatial) > 1)  # torch refuses groups of a single value
    layer = _randomise(nn.GroupNorm(groups, groups * per_group, affine=affine), seed)
    torch.manual_seed(seed)
    check_rule(layer, torch.randn(batch, groups * per_group, *spatial))


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=2), lead=st.lists(st.integers(1, 3), max_size=2),
       batch=st.sampled_from([1, 2, 3, 5]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_norm_matches_per_sample_loop(shape, lead, batch, bias, seed):
    layer = _randomise(nn.LayerNorm(shape, bias=bias), seed)
    torch.manual_seed(seed)
    check_rule(layer, torch.randn(batch, *lead, *shape))


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="torch without nn.RMSNorm")
@SETTINGS
@given(dim=st.integers(1, 5), lead=st.lists(st.integers(1, 3), max_size=2), batch=st.sampled_from([1, 3]),
       seed=st.integers(0, 2**16))
def test_rms_norm_matches_per_sample_loop(dim, lead, batch, seed):
    layer = _randomise(nn.RMSNorm(dim), seed)
    torch.manual_seed(seed)
    check_rule(layer, torch.randn(batch, *lead, dim))


def test_batch_norm_rule_refuses_batch_statistics():
    from gradnorm_engine.norms.normalization import batch_norm_norms

    layer = nn.BatchNorm1d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="running statistics"):
        batch_norm_norms(layer, (torch.randn(4, 3),), (torch.randn(4, 3),))


def test_layer_norm_without_affine_has_nothing_to_score():
    result = check_rule(nn.LayerNorm(4, elementwise_affine=False), torch.randn(3, 4))
    assert result.ok and result.params == []
