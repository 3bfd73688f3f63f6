"""nn.Linear on inputs [B, d] or sequences [B, ..., d].

With a [B, T, d] (all dims between batch and features flattened into T) and g [B, T, p]:

    weight: ||sum_t g_t a_t^T||^2   (materialised or Gram form, whichever is cheaper)
    bias:   ||sum_t g_t||^2
"""
from __future__ import annotations

from torch import nn

from .forms import weight_sqnorm
from .registry import accum_dtype, register_norm_rule, wants


@register_norm_rule(nn.Linear)
def linear_norms(layer: nn.Linear, inputs: tuple, grad_outputs: tuple) -> dict:
    g = grad_outputs[0]
    batch = g.shape[0]
    a = inputs[0].reshape(batch, -1, layer.in_features)     # (B, T, d)
    g = g.reshape(batch, -1, layer.out_features)            # (B, T, p)
    out = {}
    if wants(layer.weight):
        out[layer.weight] = weight_sqnorm(a, g)
    if wants(layer.bias):
        out[layer.bias] = g.to(accum_dtype(g, layer.bias)).sum(dim=1).pow(2).sum(dim=1)
    return out
