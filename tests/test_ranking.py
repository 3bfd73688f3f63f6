import torch

from gradnorm_engine.ranking import best_positions


def test_best_positions_equals_a_full_stable_sort():
    g = torch.Generator().manual_seed(4)
    for trial in range(50):
        n = int(torch.randint(1, 60, (1,), generator=g))
        scores = torch.randint(0, 4, (n,), generator=g).double() / 3  # many ties, fp64 like fp64 models
        k = int(torch.randint(1, n + 5, (1,), generator=g))
        want = torch.sort(-scores, stable=True).indices[:k]  # the rule, by sorting everything
        assert torch.equal(best_positions(scores, k), want), trial
    assert best_positions(torch.zeros(0), 3).numel() == 0
