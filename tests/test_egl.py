"""Expected gradient length, exact: sum_c p_c ||d CE(f(x), c) / d theta|| against a per-sample,
per-class loop in float64, for every backend, both norms, the top-m sum and its bound, masked
text models through hooks, and one forward per chunk."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnorm_engine import expected_gradient_length, score_pool
from gradnorm_engine.backends import BACKENDS
from tests.reference import max_rel_err
from tests.token_models import MaskedBag, TokenPool, pad_collate

pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_pool():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 5 * 5, 4)).double().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
    return model, torch.randn(7, 2, 5, 5, dtype=torch.float64)


def per_class_norms(model, inputs: dict, norm: str = "frobenius") -> tuple[torch.Tensor, torch.Tensor]:
    """(p [C], || d CE(f(x), c) / d theta || for every class c [C]) of one sample, by one backward per class."""
    logits = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    logits = getattr(logits, "logits", logits)
    p = logits.softmax(-1)[0].detach()
    norms = []
    params = [q for q in model.parameters() if q.requires_grad]
    for c in range(logits.shape[1]):
        grads = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([c])), params, retain_graph=True,
                                    allow_unused=True)
        sq = [g.double().pow(2).sum() for g in grads if g is not None]
        norms.append(torch.sqrt(sum(sq)) if norm == "frobenius" else sum(s.sqrt() for s in sq))
    return p, torch.stack(norms).detach()


def loop_egl(model, x, norm="frobenius", top_m=None) -> torch.Tensor:
    out = []
    for b in range(len(x)):
        p, norms = per_class_norms(model, x[b:b + 1], norm)
        keep = p.topk(top_m or len(p)).indices
        out.append((p[keep] * norms[keep]).sum())
    return torch.stack(out)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("norm", ["frobenius", "tensor_sum"])
def test_egl_matches_the_per_sample_per_class_loop(backend, norm):
    model, x = model_and_pool()
    got = expected_gradient_length(model, [x[:3], x[3:]], norm=norm, backend=backend, chunk_size=2, progress=False)
    assert got.dtype == torch.float64 and max_rel_err(got, loop_egl(model, x, norm)) <= 1e-10


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_top_m_sums_the_m_likeliest_classes_and_stays_within_its_bound(backend):
    model, x = model_and_pool()
    full = expected_gradient_length(model, [x], backend=backend, progress=False)
    part = expected_gradient_length(model, [x], top_m=2, backend=backend, progress=False)
    assert max_rel_err(part, loop_egl(model, x, top_m=2)) <= 1e-10
    for b in range(len(x)):
        p, norms = per_class_norms(model, x[b:b + 1])
        dropped = 1 - p.topk(2).values.sum()
        assert part[b] <= full[b] + 1e-12 and full[b] <= part[b] + dropped * norms.max() + 1e-12
    assert torch.equal(expected_gradient_length(model, [x], top_m=99, backend=backend, progress=False), full)


def test_a_masked_token_model_through_hooks_is_exact():
    torch.manual_seed(0)
    model = MaskedBag().double()
    pool = TokenPool(n=9)
    want = torch.stack([
        (lambda p_norms: (p_norms[0] * p_norms[1]).sum())(
            per_class_norms(model, {"input_ids": pool[i]["input_ids"][None],
                                    "attention_mask": pool[i]["attention_mask"][None]}))
        for i in range(len(pool))])
    loader = torch.utils.data.DataLoader(pool, batch_size=4, collate_fn=pad_collate)
    assert max_rel_err(expected_gradient_length(model, loader, backend="hooks", progress=False), want) <= 1e-10


def test_one_forward_per_chunk_and_one_backward_per_class():
    model, x = model_and_pool()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    expected_gradient_length(model, [x], backend="hooks", chunk_size=7, progress=False)
    # hooks: one forward for the chunk, plus the self-check's per-sample loop on its first 2 samples
    assert len(calls) == 1 + 2


def test_what_egl_refuses():
    model, x = model_and_pool()
    with pytest.raises(TypeError, match="score= does not apply"):
        expected_gradient_length(model, [x], score="entropy", progress=False)
    with pytest.raises(ValueError, match="top_m must be a positive"):
        expected_gradient_length(model, [x], top_m=0, progress=False)
    with pytest.raises(ValueError, match="unknown norm"):
        expected_gradient_length(model, [x], norm="l1", progress=False)
    assert score_pool(model, [x], progress=False).shape == (7,)   # the engine is left as it was
