"""The float64 per-sample loop: the answer every backend is checked against."""
from __future__ import annotations

import copy

import torch

from gradnorm_engine import score_pool


def as_float64(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.is_floating_point() else x


def reference_scores(model: torch.nn.Module, x: torch.Tensor, **options) -> torch.Tensor:
    """score_pool with backend="loop" on a float64 copy of the model and the inputs.  -> [N]"""
    ref_model = copy.deepcopy(model).double()
    return score_pool(ref_model, [as_float64(x)], backend="loop", progress=False, **options)


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: a relative error robust to individual tiny scores."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))
