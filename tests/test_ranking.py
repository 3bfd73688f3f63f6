import pytest
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


def test_nan_scores_are_refused_by_name_not_dropped():
    scores = torch.tensor([0.5, float("nan"), 2.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="2 score.*NaN.*positions 1, 3"):
        best_positions(scores, 2)
    # infinities are ordered: they rank, nothing is lost
    assert best_positions(torch.tensor([1.0, float("inf"), float("-inf"), 2.0]), 4).tolist() == [1, 3, 0, 2]


def test_top_k_takes_one_dimensional_scores_only():
    from gradnorm_engine.api import top_k

    with pytest.raises(ValueError, match="1-D"):
        top_k(torch.ones(2, 2), 1)
    assert top_k(torch.tensor([3.0, 1.0, 2.0]), 2).indices.tolist() == [0, 2]
