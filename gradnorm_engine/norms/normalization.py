"""Normalisation layers with an affine part y = xhat * weight + bias, per channel / feature:
BatchNorm1d/2d/3d in eval mode (running statistics), GroupNorm, LayerNorm, RMSNorm.

xhat depends only on the sample itself (running statistics, or the sample's own groups /
features), so with g the output gradient

    weight: || sum_{positions} g * xhat ||^2      bias: || sum_{positions} g ||^2

where the sums run over every dim that shares one affine entry (not over the batch).
xhat is recomputed from the saved input in float32 (float64 for float64 input).
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import batch_norm_grad_sqnorm
from .registry import accum_dtype, register_norm_rule, wants


def _affine_norms(layer: nn.Module, g: torch.Tensor, xhat: torch.Tensor, shared_dims: tuple) -> dict:
    """Squared norms of sum over ``shared_dims`` of g*xhat (weight) and of g (bias)."""
    def per_entry(t: torch.Tensor) -> torch.Tensor:
        # sum(dim=()) would reduce every dim, batch included: skip it when nothing is shared
        return t.sum(dim=shared_dims) if shared_dims else t

    out = {}
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if wants(weight):
        out[weight] = per_entry(g * xhat).flatten(1).pow(2).sum(dim=1)
    if wants(bias):
        out[bias] = per_entry(g).flatten(1).pow(2).sum(dim=1)
    return out


@register_norm_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
def batch_norm_norms(layer: nn.modules.batchnorm._BatchNorm, inputs: tuple, grad_outputs: tuple) -> dict:
    """xhat = (x - running_mean) / sqrt(running_var + eps), per channel (dim 1)."""
    if layer.training or layer.running_mean is None:
        raise ValueError(
            f"the {type(layer).__name__} rule needs eval mode with running statistics; in training "
            "mode (or with track_running_stats=False) BatchNorm mixes the samples of a batch and "
            "per-sample gradients are not defined by one batched backward")
    x, g = inputs[0], grad_outputs[0]
    acc = accum_dtype(x, g)
    inv_std = torch.rsqrt(layer.running_var.to(acc) + layer.eps)
    # One fused pass over x and g on CUDA (gradnorm_engine.kernels), its torch reference elsewhere.
    weight_sq, bias_sq = batch_norm_grad_sqnorm(x, g, layer.running_mean.to(acc), inv_std)
    out = {}
    if wants(layer.weight):
        out[layer.weight] = weight_sq
    if wants(layer.bias):
        out[layer.bias] = bias_sq
    return out


@register_norm_rule(nn.GroupNorm)
def group_norm_norms(layer: nn.GroupNorm, inputs: tuple, grad_outputs: tuple) -> dict:
    """xhat from each sample's own group statistics (biased variance), affine per channel."""
    x, g = inputs[0], grad_outputs[0]
    acc = accum_dtype(x, g)
    batch = x.shape[0]
    grouped = x.to(acc).reshape(batch, layer.num_groups, -1)
    var, mean = torch.var_mean(grouped, dim=2, unbiased=False, keepdim=True)
    xhat = ((grouped - mean) * torch.rsqrt(var + layer.eps)).reshape(batch, x.shape[1], -1)  # (B, C, L)
    return _affine_norms(layer, g.to(acc).reshape(batch, x.shape[1], -1), xhat, (2,))


@register_norm_rule(nn.LayerNorm)
def layer_norm_norms(layer: nn.LayerNorm, inputs: tuple, grad_outputs: tuple) -> dict:
    """xhat over the trailing normalized_shape dims; affine entries shared over the dims between."""
    x, g = inputs[0], grad_outputs[0]
    acc = accum_dtype(x, g)
    n = len(layer.normalized_shape)
    dims = tuple(range(x.dim() - n, x.dim()))
    xf = x.to(acc)
    var, mean = torch.var_mean(xf, dim=dims, unbiased=False, keepdim=True)
    xhat = (xf - mean) * torch.rsqrt(var + layer.eps)
    return _affine_norms(layer, g.to(acc), xhat, tuple(range(1, x.dim() - n)))


if hasattr(nn, "RMSNorm"):
    @register_norm_rule(nn.RMSNorm)
    def rms_norm_norms(layer: nn.RMSNorm, inputs: tuple, grad_outputs: tuple) -> dict:
        """xhat = x / sqrt(mean(x^2) + eps) over the trailing normalized_shape dims."""
        x, g = inputs[0], grad_outputs[0]
        acc = accum_dtype(x, g)
        n = len(layer.normalized_shape)
        dims = tuple(range(x.dim() - n, x.dim()))
        eps = layer.eps if layer.eps is not None else torch.finfo(x.dtype).eps
        xf = x.to(acc)
        xhat = xf * torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + eps)
        return _affine_norms(layer, g.to(acc), xhat, tuple(range(1, x.dim() - n)))
