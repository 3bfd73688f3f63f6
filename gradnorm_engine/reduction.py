"""Per-parameter squared norms [B, P] -> one score per sample [B].

Backends hand over squared norms and the square roots are taken here, once, at the end.
"""
from __future__ import annotations

import torch

NORMS = ("frobenius", "tensor_sum")


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose 'frobenius' (sqrt of the sum of all squares) "
                         "or 'tensor_sum' (sum over parameter tensors of each tensor's L2 norm)")
    return norm


def reduce_sqnorms(sqnorms: torch.Tensor, norm: str) -> torch.Tensor:
    """sqnorms [B, P] (column j: ||d loss_i / d param_j||^2) -> scores [B].

    frobenius:  sqrt(sum_j sqnorms[:, j])   (the gradient's norm over all parameters)
    tensor_sum: sum_j sqrt(sqnorms[:, j])   (what the public reference code sums)
    """
    if norm == "frobenius":
        return sqnorms.sum(dim=1).sqrt()
    if norm == "tensor_sum":
        return sqnorms.clamp_min(0).sqrt().sum(dim=1)
    raise ValueError(check_norm(norm))
