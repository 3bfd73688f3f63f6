"""per_parameter_sqnorms: every sample's squared norm per parameter tensor (or group), in pool
order, exact against a per-sample loop for every backend; the groupings sum the right columns."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnorm_engine import per_parameter_sqnorms, score_pool
from gradnorm_engine.backends import BACKENDS
from tests.reference import max_rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_pool():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5)).double().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(9, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (9,))
    return model, x, y


def loop_sqnorms(model, x, loss) -> torch.Tensor:
    """[N, P]: || d loss_b / d p ||^2 by one backward per sample."""
    params = list(model.parameters())
    rows = []
    for b in range(len(x)):
        grads = torch.autograd.grad(loss(model(x[b:b + 1]), b), params)
        rows.append(torch.stack([g.pow(2).sum() for g in grads]))
    return torch.stack(rows).detach()


def entropy(z):
    logp = z.log_softmax(-1)
    return -(logp.exp() * logp).sum()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_per_parameter_squared_norms_match_the_loop_in_pool_order(backend):
    model, x, _ = model_and_pool()
    want = loop_sqnorms(model, x, lambda z, b: entropy(z))
    got, names = per_parameter_sqnorms(model, [x[:4], x[4:]], backend=backend, chunk_size=2, progress=False)
    assert names == [n for n, _ in model.named_parameters()]
    assert got.shape == (9, len(names)) and got.dtype == torch.float64
    assert max_rel_err(got.flatten(), want.flatten()) <= 1e-10
    frobenius = score_pool(model, [x], backend=backend, progress=False)
    assert max_rel_err(got.sum(dim=1).sqrt(), frobenius) <= 1e-12


def test_groupings_by_module_prefix_and_callable():
    model, x, _ = model_and_pool()
    full, names = per_parameter_sqnorms(model, [x], progress=False)
    by_module, modules = per_parameter_sqnorms(model, [x], group="module", progress=False)
    assert modules == ["0", "1", "4"]
    torch.testing.assert_close(by_module, torch.stack([full[:, 0:2].sum(1), full[:, 2:4].sum(1), full[:, 4:6].sum(1)], 1))
    by_prefix, prefixes = per_parameter_sqnorms(model, [x], group=["4", "0", "1.weight", "1"], progress=False)
    assert prefixes == ["4", "0", "1.weight", "1"]
    torch.testing.assert_close(by_prefix, torch.stack([full[:, 4:6].sum(1), full[:, 0:2].sum(1), full[:, 2], full[:, 3]], 1))
    by_kind, kinds = per_parameter_sqnorms(model, [x], group=lambda n: n.rpartition(".")[2], progress=False)
    assert kinds == ["weight", "bias"]
    torch.testing.assert_close(by_kind, torch.stack([full[:, 0::2].sum(1), full[:, 1::2].sum(1)], 1))
    with pytest.raises(ValueError, match="cover no prefix of 4.weight"):
        per_parameter_sqnorms(model, [x], group=["0", "1"], progress=False)
    with pytest.raises(TypeError, match="norm= does not apply"):
        per_parameter_sqnorms(model, [x], norm="tensor_sum", progress=False)


def test_params_subset_and_a_label_aware_score():
    model, x, y = model_and_pool()
    want = loop_sqnorms(model, x, lambda z, b: F.cross_entropy(z, y[b:b + 1]))
    got, names = per_parameter_sqnorms(model, [(x, y)], score="cross_entropy", params=["4.weight", "0.bias"],
                                       progress=False)
    assert names == ["0.bias", "4.weight"]
    assert max_rel_err(got.flatten(), want[:, [1, 4]].flatten()) <= 1e-10
