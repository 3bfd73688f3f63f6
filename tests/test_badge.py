"""BADGE: the factorised gradient-embedding distances equal the materialised ones, the k-means++
seeding picks as a direct implementation over materialised embeddings does, and the features
are the input of the layer producing the logits."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradnorm_engine.badge import (_sqdist_to, badge, gradient_embedding_factors, kmeans_pp_gradient_embeddings,
                                   last_layer_features)


def pool(n=40, d=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    p = torch.randn(n, c, generator=g, dtype=torch.float64).mul(2).softmax(dim=1)
    return h, p


def materialised(h, p) -> torch.Tensor:
    """[N, C*D]: the gradient of CE(logits, argmax) w.r.t. W of logits = W h, written out."""
    onehot = torch.nn.functional.one_hot(p.argmax(dim=1), p.shape[1]).to(p.dtype)
    return ((p - onehot)[:, :, None] * h[:, None, :]).flatten(1)


def direct_kmeans_pp(g: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """The seeding over materialised embeddings, as BADGE's reference code does it."""
    picked = [int(torch.argmax(g.norm(dim=1)))]
    nearest = (g - g[picked[0]]).pow(2).sum(dim=1)
    for _ in range(k - 1):
        weights = nearest.clone()
        weights[picked] = 0.0
        picked.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, (g - g[picked[-1]]).pow(2).sum(dim=1))
    return picked


def test_factorised_distances_equal_the_materialised_ones():
    h, p = pool()
    a, hh = gradient_embedding_factors(h, p)
    g = materialised(h, p)
    sq_norm = a.pow(2).sum(1) * hh.pow(2).sum(1)
    torch.testing.assert_close(sq_norm, g.pow(2).sum(1), rtol=1e-12, atol=1e-14)
    for c in (0, 7, 39):
        torch.testing.assert_close(_sqdist_to(c, a, hh, sq_norm), (g - g[c]).pow(2).sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seeding_picks_as_the_direct_implementation(seed):
    h, p = pool(seed=seed)
    got = kmeans_pp_gradient_embeddings(h, p, 12, torch.Generator().manual_seed(seed))
    want = direct_kmeans_pp(materialised(h, p), 12, torch.Generator().manual_seed(seed))
    assert got.tolist() == want and len(set(want)) == 12


def test_the_first_pick_is_the_largest_embedding_and_k_is_checked():
    h, p = pool()
    g = materialised(h, p)
    assert int(kmeans_pp_gradient_embeddings(h, p, 1)[0]) == int(torch.argmax(g.norm(dim=1)))
    with pytest.raises(ValueError, match="k must lie in 1..40"):
        kmeans_pp_gradient_embeddings(h, p, 41)


def test_equal_embeddings_are_all_taken_once_the_distances_run_out():
    h = torch.ones(4, 3, dtype=torch.float64)
    p = torch.tensor([[0.7, 0.3]] * 4, dtype=torch.float64)
    assert sorted(kmeans_pp_gradient_embeddings(h, p, 4).tolist()) == [0, 1, 2, 3]


def test_badge_reads_the_input_of_the_layer_producing_the_logits():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
    head = nn.Linear(6, 3)
    model = nn.Sequential(body, head).double()
    x = torch.randn(20, 4, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, torch.zeros(20)), batch_size=7)
    h, p = last_layer_features(model, loader, progress=False)
    assert torch.equal(h, body(x).detach()) and torch.equal(p, model(x).softmax(1).detach())
    picked = badge(model, loader, 5, generator=torch.Generator().manual_seed(3), progress=False)
    assert picked.tolist() == kmeans_pp_gradient_embeddings(h, p, 5, torch.Generator().manual_seed(3)).tolist()
    scaled = nn.Sequential(model, nn.Identity())
    with pytest.raises(ValueError, match="not the model's logits"):
        last_layer_features(nn.Sequential(body, head, nn.Softmax(dim=1)), loader, progress=False)
    assert last_layer_features(scaled, loader, progress=False)[0].shape == (20, 6)


def test_badge_takes_a_tensor_or_a_dataset_as_the_pool_and_checks_the_device():
    """A tensor pool is its rows and a Dataset is read in order, as score_pool reads them (a tensor
    was iterated row by row, each row taken for a batch); device= is checked in one line."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(20, 4, dtype=torch.float64)
    want = last_layer_features(model, [x], progress=False)
    for pool in (x, TensorDataset(x)):
        got = last_layer_features(model, pool, progress=False)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="unknown device") as info:
        last_layer_features(model, x, device="gpu", progress=False)
    assert "\n" not in str(info.value)
