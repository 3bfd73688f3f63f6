"""norms/linear.py and norms/forms.py: the Linear rule and both exact forms vs the per-sample loop."""
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from gradnorm_engine.norms.forms import gram_sqnorm, prefer_gram, weight_sqnorm
from gradnorm_engine.testing import check_rule

SETTINGS = settings(max_examples=20, deadline=None)


@SETTINGS
@given(batch=st.sampled_from([1, 2, 3, 5]), seq=st.lists(st.integers(1, 4), max_size=2),
       d=st.integers(1, 6), p=st.integers(1, 6), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_rule_matches_per_sample_loop(batch, seq, d, p, bias, seed):
    torch.manual_seed(seed)
    check_rule(nn.Linear(d, p, bias=bias), torch.randn(batch, *seq, d))


@SETTINGS
@given(n=st.sampled_from([1, 2, 5]), t=st.integers(1, 6), d=st.integers(1, 5), p=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_both_forms_equal_the_materialised_gradient(n, t, d, p, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, t, d, generator=gen, dtype=torch.float64)
    g = torch.randn(n, t, p, generator=gen, dtype=torch.float64)
    expected = torch.einsum("ntp,ntd->npd", g, a).pow(2).sum(dim=(1, 2))
    for form in ("auto", "materialise", "gram"):
        torch.testing.assert_close(weight_sqnorm(a, g, form), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gram_sqnorm(a, g), expected, rtol=1e-10, atol=1e-12)


def test_forms_accumulate_in_float32_for_low_precision_inputs():
    a = torch.randn(3, 4, 5).bfloat16()
    g = torch.randn(3, 4, 2).bfloat16()
    for form in ("materialise", "gram"):
        assert weight_sqnorm(a, g, form).dtype == torch.float32
    expected = torch.einsum("ntp,ntd->npd", g.double(), a.double()).pow(2).sum(dim=(1, 2))
    torch.testing.assert_close(weight_sqnorm(a, g, "gram").double(), expected, rtol=1e-5, atol=1e-6)


def test_cost_model_prefers_gram_for_few_positions_and_wide_layers():
    assert prefer_gram(positions=16, out_features=512, in_features=4608)       # CIFAR layer4 conv
    assert not prefer_gram(positions=1024, out_features=64, in_features=576)   # CIFAR layer1 conv
    assert not prefer_gram(positions=8, out_features=4, in_features=4)


def test_unknown_form_is_refused():
    try:
        weight_sqnorm(torch.randn(1, 2, 3), torch.randn(1, 2, 3), "fast")
    except ValueError as err:
        assert "form" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_frozen_weight_is_left_out():
    layer = nn.Linear(3, 2)
    layer.weight.requires_grad_(False)
    result = check_rule(layer, torch.randn(4, 3))
    assert [p.name for p in result.params] == ["bias"]


def test_float32_gram_form_keeps_its_digits_on_attention_keys():
    """Key projection of softmax attention: inputs share a large direction, the gradients sum to
    zero over the keys. The Gram form centres both before its products (it lost 1-2 digits)."""
    from gradnorm_engine.norms.forms import weight_sqnorm

    torch.manual_seed(0)
    a = 1000 * torch.randn(1, 1, 64, dtype=torch.float64) + torch.randn(4, 8, 64, dtype=torch.float64)
    g = torch.randn(4, 8, 64, dtype=torch.float64)
    g = g - g.mean(dim=1, keepdim=True)
    truth = torch.einsum("btp,btd->bpd", g, a).pow(2).sum(dim=(1, 2))
    got = weight_sqnorm(a.float(), g.float(), form="gram").double()
    assert float(((got - truth).abs() / truth).max()) < 1e-4
