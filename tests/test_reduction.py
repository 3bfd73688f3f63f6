import pytest
import torch

from gradnorm_engine.reduction import reduce_sqnorms


def test_both_conventions_on_known_numbers():
    sq = torch.tensor([[9.0, 16.0], [1.0, 0.0]])  # per-tensor norms 3, 4 and 1, 0
    assert torch.equal(reduce_sqnorms(sq, "frobenius"), torch.tensor([5.0, 1.0]))
    assert torch.equal(reduce_sqnorms(sq, "tensor_sum"), torch.tensor([7.0, 1.0]))


def test_unknown_norm():
    with pytest.raises(ValueError, match="frobenius"):
        reduce_sqnorms(torch.ones(1, 1), "l1")
