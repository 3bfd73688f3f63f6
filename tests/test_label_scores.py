"""Label-aware scores: each sample's label comes from the loader (the tuple element after the
inputs, a mapping's labels entry, or label_key=) and stays with its sample through chunks and
every backend; a pool without labels is refused by name."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnorm_engine import rank_unlabeled, score_pool
from gradnorm_engine.backends import BACKENDS
from tests.reference import max_rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_pool():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    x = torch.randn(11, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (11,))
    return model, x, y


def loop_reference(model, x, loss) -> torch.Tensor:
    """|| d loss_b / d theta || by one backward per sample."""
    out = []
    for b in range(len(x)):
        grads = torch.autograd.grad(loss(model(x[b:b + 1]), b), list(model.parameters()))
        out.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    return torch.stack(out).detach()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_cross_entropy_of_the_true_label_matches_the_loop(backend):
    model, x, y = model_and_pool()
    want = loop_reference(model, x, lambda z, b: F.cross_entropy(z, y[b:b + 1]))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    got = score_pool(model, batches, score="cross_entropy", backend=backend, chunk_size=3, progress=False)
    assert max_rel_err(got, want) <= 1e-10
    mapping = [{"x": x, "labels": y}]
    assert max_rel_err(score_pool(model, mapping, score="cross_entropy", backend=backend, progress=False), want) <= 1e-10


def test_a_callable_of_logits_and_targets_and_a_named_label_entry():
    model, x, y = model_and_pool()

    def margin(logits, targets):   # the true class's logit against the best other one
        true = logits.gather(1, targets[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(targets, logits.shape[1]).bool(), -1e9).max(dim=1).values
        return other - true

    want = loop_reference(model, x, lambda z, b: margin(z, y[b:b + 1]).sum())
    got = score_pool(model, [{"x": x, "tag": y}], score=margin, label_key="tag", progress=False)
    assert max_rel_err(got, want) <= 1e-10
    res = rank_unlabeled(model, [(x, torch.zeros(11), y)], 3, score=margin, label_key=2, progress=False)
    assert torch.equal(res.indices, torch.argsort(want, descending=True, stable=True)[:3])


@pytest.mark.parametrize("batch, words", [
    (lambda x, y: x, "Tensors, which hold no labels"),
    (lambda x, y: (x,), "no labels at index 1"),
    (lambda x, y: {"x": x}, "no labels"),
])
def test_a_pool_without_labels_is_refused_by_name(batch, words):
    model, x, y = model_and_pool()
    with pytest.raises(ValueError, match=words) as info:
        score_pool(model, [batch(x, y)], score="cross_entropy", progress=False)
    assert "label-aware score" in str(info.value) and "label_key" in str(info.value)


def test_labels_of_another_length_than_the_inputs_are_refused():
    model, x, y = model_and_pool()
    with pytest.raises(ValueError, match="11 inputs but 5 labels"):
        score_pool(model, [(x, y[:5])], score="cross_entropy", progress=False)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("bad", [-100, -1, 4])
def test_labels_that_are_not_class_indices_are_refused_in_one_line(backend, bad):
    """-100 is cross_entropy's ignore_index: it scored 0 silently (the sample ranked last); a label
    past the logits raised torch's 'Target 4 is out of bounds' or, in vmap, an indexing error."""
    model, x, y = model_and_pool()
    y[6] = bad
    with pytest.raises(ValueError, match=rf"class indices 0\.\.3 of the model's 4 logits.*{bad}") as info:
        score_pool(model, [(x, y)], score="cross_entropy", backend=backend, progress=False)
    assert "\n" not in str(info.value) and "label-free score" in str(info.value)


def test_one_label_per_sample_is_needed_by_cross_entropy():
    model, x, y = model_and_pool()
    with pytest.raises(ValueError, match=r"one class index per sample.*\(11, 4\)"):
        score_pool(model, [(x, F.one_hot(y, 4).float())], score="cross_entropy", progress=False)
