"""Normalisation layers with an affine part y = xhat * weight + bias, per channel / feature:
BatchNorm1d/2d/3d in eval mode (running statistics), GroupNorm, LayerNorm, RMSNorm, and their
functional forms (F.batch_norm, F.group_norm, F.layer_norm, F.rms_norm, F.instance_norm).

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
from .layout import regroup
from .ops import OpCall, per_sample_result, register_op_rule
from .registry import accum_dtype, register_norm_rule, wants


def _per_entry(t: torch.Tensor, shared: tuple) -> torch.Tensor:
    """``t`` summed over the ``shared`` dims (those sharing one affine entry)."""
    # sum(dim=()) would reduce every dim, batch included: skip it when nothing is shared
    return t.sum(dim=shared) if shared else t


def group_xhat(x: torch.Tensor, groups: int, eps: float, acc: torch.dtype) -> torch.Tensor:
    """GroupNorm's xhat from each sample's own group statistics (biased variance).  -> [B, C, L] in ``acc``"""
    grouped = x.to(acc).reshape(x.shape[0], groups, -1)
    var, mean = torch.var_mean(grouped, dim=2, unbiased=False, keepdim=True)
    return (grouped - mean).mul_(torch.rsqrt(var + eps)).reshape(x.shape[0], x.shape[1], -1)


def layer_norm_xhat(x: torch.Tensor, dims: tuple, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over ``dims`` (biased variance), in x's dtype."""
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
    return (x - mean).mul_(torch.rsqrt(var + eps))


def rms_xhat(x: torch.Tensor, dims: tuple, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over ``dims``, in x's dtype."""
    return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)


def _trailing_dims(ndim: int, n: int) -> tuple[tuple, tuple]:
    """(the last ``n`` dims, normalised; the dims between the batch and them, sharing an entry)."""
    return tuple(range(ndim - n, ndim)), tuple(range(1, ndim - n))


def _affine_norms(layer: nn.Module, g: torch.Tensor, xhat: torch.Tensor, shared_dims: tuple) -> dict:
    """Squared norms of sum over ``shared_dims`` of g*xhat (weight) and of g (bias)."""
    out = {}
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if wants(weight):
        out[weight] = _per_entry(g * xhat, shared_dims).flatten(1).pow(2).sum(dim=1)
    if wants(bias):
        out[bias] = _per_entry(g, shared_dims).flatten(1).pow(2).sum(dim=1)
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
    xhat = group_xhat(x, layer.num_groups, layer.eps, acc)                                    # (B, C, L)
    return _affine_norms(layer, g.to(acc).reshape(x.shape[0], x.shape[1], -1), xhat, (2,))


@register_norm_rule(nn.LayerNorm)
def layer_norm_norms(layer: nn.LayerNorm, inputs: tuple, grad_outputs: tuple) -> dict:
    """xhat over the trailing normalized_shape dims; affine entries shared over the dims between."""
    x, g = inputs[0], grad_outputs[0]
    acc = accum_dtype(x, g)
    normalised, shared = _trailing_dims(x.dim(), len(layer.normalized_shape))
    return _affine_norms(layer, g.to(acc), layer_norm_xhat(x.to(acc), normalised, layer.eps), shared)


if hasattr(nn, "RMSNorm"):
    @register_norm_rule(nn.RMSNorm)
    def rms_norm_norms(layer: nn.RMSNorm, inputs: tuple, grad_outputs: tuple) -> dict:
        """xhat = x / sqrt(mean(x^2) + eps) over the trailing normalized_shape dims."""
        x, g = inputs[0], grad_outputs[0]
        acc = accum_dtype(x, g)
        normalised, shared = _trailing_dims(x.dim(), len(layer.normalized_shape))
        eps = layer.eps if layer.eps is not None else torch.finfo(x.dtype).eps
        return _affine_norms(layer, g.to(acc), rms_xhat(x.to(acc), normalised, eps), shared)


# --------------------------------------------------------------------------- op rules
# The functional forms, wherever the samples are: F.layer_norm on a permuted tensor (ConvNeXt's
# LayerNorm2d), on [T, B, d], on Swin's windows. Each sample's rows are regrouped first, so
# xhat and g are [B, S, *affine shape] with S every position that shares one affine entry.

def affine_sums(call: OpCall, g: torch.Tensor, xhat: torch.Tensor, weight, bias, wants_norm, shared=(1,)) -> dict:
    """{weight slot: sum over the ``shared`` dims of g * xhat, bias slot: of g}, as squared norms
    [B] or gradients. ``xhat`` is the rule's own temporary (overwritten)."""
    out = {}
    if weight in call.pins:
        out[weight] = per_sample_result(_per_entry(xhat.mul_(g), shared), wants_norm(weight))
    if bias is not None and bias in call.pins:
        out[bias] = per_sample_result(_per_entry(g, shared), wants_norm(bias))
    return out


def _trailing_check(call: OpCall) -> str | None:
    shape = call.arg(1)
    n = 1 if isinstance(shape, int) else len(shape)
    if call.lay(0) is None or call.lay(0)[0] >= call.args[0].dim() - n:
        return "the batch is a normalised dim"
    if any(call.lay(i) is not None for i in range(1, len(call.args))):
        return "only the input may be batched"
    return None


def _trailing_rows(call: OpCall, grad: torch.Tensor, acc: torch.dtype):
    """(x, g) as [B, ..., *normalized_shape] in ``acc`` (views where the layout allows: a
    permuted input, ConvNeXt's, is not copied), the normalised dims and the dims they share."""
    shape = call.args[1]
    n = 1 if isinstance(shape, int) else len(shape)
    x = regroup(call.args[0], call.lay(0), call.batch).to(acc)
    g = regroup(grad, call.out_lay, call.batch).to(acc)
    return x, g, *_trailing_dims(x.dim(), n)


@register_op_rule("layer_norm", signature=("input", "normalized_shape", "weight", "bias", "eps"),
                  check=_trailing_check, form=lambda c, slot: "affine sums (statistics from the forward)"
                  if c.extra is not None else "affine sums")
def layer_norm_op(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    """xhat = (x - mean) * rstd over the normalised dims; mean and rstd from the forward when the
    recording ran torch.native_layer_norm (``call.extra``), else recomputed."""
    acc = accum_dtype(call.args[0], grad)
    x, g, normalised, shared = _trailing_rows(call, grad, acc)
    if call.extra is not None:           # [*leading dims, 1, ...]: x's layout
        mean, rstd = (regroup(t, call.lay(0), call.batch).to(acc) for t in call.extra)
        xhat = (x - mean).mul_(rstd)
    else:
        xhat = layer_norm_xhat(x, normalised, call.arg(4, 1e-5))
    return affine_sums(call, g, xhat, 2, 3, wants_norm, shared)


@register_op_rule("rms_norm", signature=("input", "normalized_shape", "weight", "eps"), check=_trailing_check,
                  form=lambda c, slot: "affine sums")
def rms_norm_op(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    """xhat = x / sqrt(mean(x^2) + eps) over the normalised dims."""
    acc = accum_dtype(call.args[0], grad)
    x, g, normalised, shared = _trailing_rows(call, grad, acc)
    eps = call.arg(3, torch.finfo(call.args[0].dtype).eps)
    return affine_sums(call, g, rms_xhat(x, normalised, eps), 2, None, wants_norm, shared)


def _channels_check(call: OpCall) -> str | None:
    if call.lay(0) != (0, 1) or call.out_lay != (0, 1):
        return "the batch is not dim 0 of its own"
    if any(call.lay(i) is not None for i in range(1, len(call.args))):
        return "only the input may be batched"
    if call.name == "batch_norm" and (call.arg(5, False) or call.arg(1) is None):
        return "batch statistics (training mode) mix the samples"
    return None


def _channel_rows(call: OpCall, grad: torch.Tensor, xhat: torch.Tensor, weight: int, bias: int, wants_norm) -> dict:
    batch, channels = call.args[0].shape[:2]
    g = grad.to(xhat.dtype).reshape(batch, channels, -1).transpose(1, 2)                # (B, L, C)
    return affine_sums(call, g, xhat.reshape(batch, channels, -1).transpose(1, 2), weight, bias, wants_norm)


@register_op_rule("group_norm", signature=("input", "num_groups", "weight", "bias", "eps"), check=_channels_check,
                  form=lambda c, slot: "affine sums")
def group_norm_op(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    """xhat from each sample's own group statistics (biased variance), affine per channel."""
    x = call.args[0]
    xhat = group_xhat(x, int(call.args[1]), call.arg(4, 1e-5), accum_dtype(x, grad))
    return _channel_rows(call, grad, xhat, 2, 3, wants_norm)


@register_op_rule("batch_norm", signature=("input", "running_mean", "running_var", "weight", "bias", "training",
                                           "momentum", "eps"), check=_channels_check, form=lambda c, slot: "affine sums")
def batch_norm_op(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    """Eval mode: xhat = (x - running_mean) / sqrt(running_var + eps), per channel."""
    x = call.args[0]
    acc = accum_dtype(x, grad)
    inv_std = torch.rsqrt(call.args[2].to(acc) + call.arg(7, 1e-5))
    if all(wants_norm(s) for s in call.pins):   # the fused kernel (CUDA) or its reference
        weight_sq, bias_sq = batch_norm_grad_sqnorm(x, grad, call.args[1].to(acc), inv_std)
        return {s: v for s, v in ((3, weight_sq), (4, bias_sq)) if s in call.pins}
    view = (1, -1, *([1] * (x.dim() - 2)))
    xhat = (x.to(acc) - call.args[1].to(acc).view(view)).mul_(inv_std.view(view))
    return _channel_rows(call, grad, xhat, 3, 4, wants_norm)


@register_op_rule("instance_norm", signature=("input", "running_mean", "running_var", "weight", "bias",
                                              "use_input_stats", "momentum", "eps"), check=_channels_check,
                  form=lambda c, slot: "affine sums")
def instance_norm_op(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    """xhat from each sample's own statistics per channel (or the running ones when
    use_input_stats is False), affine per channel."""
    x = call.args[0]
    acc = accum_dtype(x, grad)
    flat = x.to(acc).reshape(x.shape[0], x.shape[1], -1)
    eps = call.arg(7, 1e-5)
    if call.arg(5, True):
        var, mean = torch.var_mean(flat, dim=2, unbiased=False, keepdim=True)
    else:
        mean, var = call.args[1].to(acc).view(1, -1, 1), call.args[2].to(acc).view(1, -1, 1)
    return _channel_rows(call, grad, (flat - mean).mul_(torch.rsqrt(var + eps)), 3, 4, wants_norm)
