"""Activations with parameters: F.prelu (nn.PReLU).

y = x where x > 0, w_c * x elsewhere, with one w for all channels or one per channel (dim 1), so

    d loss_b / d w_c = sum over sample b's entries of channel c of  g * min(x, 0)
"""
from __future__ import annotations

import torch

from .ops import OpCall, per_sample_result, register_op_rule
from .registry import accum_dtype


def _prelu_check(call: OpCall) -> str | None:
    if call.lay(0) != (0, 1) or call.out_lay != (0, 1) or call.lay(1) is not None:
        return "the batch is not dim 0 of the input alone"
    if call.args[0].dim() < 2 and call.args[1].numel() > 1:
        return "per-channel weights on a 1-D input"
    return None


@register_op_rule("prelu", signature=("input", "weight"), check=_prelu_check, form=lambda c, slot: "per-channel sums")
def prelu_op(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    if 1 not in call.pins:
        return {}
    x, weight = call.args
    acc = accum_dtype(x, grad)
    local = grad.to(acc) * x.to(acc).clamp(max=0)
    batch = x.shape[0]
    if weight.numel() == 1:
        summed = local.reshape(batch, -1).sum(dim=1).reshape(batch, *weight.shape)
    else:
        summed = local.reshape(batch, x.shape[1], -1).sum(dim=2).reshape(batch, *weight.shape)
    return {1: per_sample_result(summed, wants_norm(1))}
