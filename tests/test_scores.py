import pytest
import torch
from hypothesis import given, settings, strategies as st

from gradnorm_engine.scores import categorical_entropy, entropy, pseudo_label_ce, resolve_score


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 6), c=st.integers(2, 12), scale=st.floats(0.1, 30.0))
def test_entropy_is_softmax_entropy_in_nats(b, c, scale):
    logits = torch.randn(b, c, dtype=torch.float64) * scale
    p = logits.softmax(-1)
    want = -(p * p.log()).nan_to_num().sum(-1)
    assert torch.allclose(entropy(logits), want, atol=1e-12)
    assert torch.all(entropy(logits) <= torch.log(torch.tensor(float(c))) + 1e-9)


def test_categorical_entropy_matches_torch_distributions():
    logits = torch.randn(7, 10) * torch.tensor([[0.1], [1], [5], [20], [60], [100], [1e3]])
    want = torch.distributions.Categorical(probs=logits.softmax(-1)).entropy()
    assert torch.allclose(categorical_entropy(logits), want, atol=1e-7, rtol=1e-6)
    # gradients too: the clamp changes them for saturated rows
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    categorical_entropy(a).sum().backward()
    torch.distributions.Categorical(probs=b.softmax(-1)).entropy().sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7, rtol=1e-5)


def test_pseudo_label_ce_is_ce_against_argmax():
    logits = torch.randn(5, 4)
    want = torch.nn.functional.cross_entropy(logits, logits.argmax(-1), reduction="none")
    assert torch.allclose(pseudo_label_ce(logits), want)


def test_low_precision_logits_are_scored_in_fp32():
    logits = torch.randn(3, 5).bfloat16()
    assert entropy(logits).dtype == torch.float32


def test_resolve_score():
    assert resolve_score("entropy").fn is entropy and not resolve_score("entropy").needs_targets
    fn = lambda z: z.sum(-1)  # noqa: E731
    assert resolve_score(fn).fn is fn
    with pytest.raises(ValueError, match="unknown score"):
        resolve_score("bald")


def test_cross_entropy_reads_labels_and_a_two_argument_callable_is_label_aware():
    from gradnorm_engine.scores import cross_entropy, takes_targets

    logits = torch.randn(4, 3, dtype=torch.float64)
    targets = torch.tensor([0, 2, 1, 2])
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert torch.equal(resolve_score("cross_entropy")(logits, targets), want)
    assert resolve_score("cross_entropy").needs_targets and cross_entropy(logits, targets).shape == (4,)
    assert takes_targets(lambda z, t: z[:, 0]) and not takes_targets(lambda z: z[:, 0])
    assert not takes_targets(lambda z, t=None: z[:, 0])   # an optional second argument is not required
    with pytest.raises(ValueError, match="needs each sample's label"):
        resolve_score("cross_entropy")(logits)
