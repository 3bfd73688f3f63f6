"""nn.Conv1d / Conv2d / Conv3d: any stride, padding (numbers, "same", "valid", every padding
mode), dilation and groups (depthwise included), with or without bias.

With G groups, sample b's weight gradient for group j is G_bj = sum_t g_{t} a_t^T where t runs
over the T output positions, g_t in R^{O/G} is the output gradient there and a_t in
R^{C/G * prod(kernel)} the input patch that produced it. Then

    weight: sum_j ||G_bj||^2   (materialised or Gram form, whichever is cheaper)
    bias:   ||sum_t g_t||^2    (over all O channels)

Materialisation on CUDA calls the fused kernels: ``conv2d_weight_grad_sqnorm`` for 1-D and
2-D convolutions (1-D as a 2-D conv of height 1, no unfolded copy), and
``linear_weight_grad_sqnorm`` on the unfolded patches for 3-D. On CPU it runs one weight-only
convolution backward per sample, which beats any unfolding there. The Gram form needs the
unfolded patches.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import conv2d_weight_grad_sqnorm, linear_weight_grad_sqnorm
from .forms import FORMS, gram_sqnorm, prefer_gram
from .registry import accum_dtype, register_norm_rule, wants


@register_norm_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_norms(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d, inputs: tuple, grad_outputs: tuple) -> dict:
    x, g = inputs[0], grad_outputs[0]
    out = {}
    if wants(layer.weight):
        out[layer.weight] = conv_weight_sqnorm(layer, x, g)
    if wants(layer.bias):
        acc = accum_dtype(g, layer.bias)
        out[layer.bias] = g.to(acc).flatten(2).sum(dim=2).pow(2).sum(dim=1)
    return out


def conv_weight_sqnorm(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, form: str = "auto") -> torch.Tensor:
    """Per-sample squared norm of the weight gradient.  x [B, C, *S], g [B, O, *S'] -> [B]"""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    groups = layer.groups
    batch, channels = x.shape[:2]
    out_channels = g.shape[1]
    positions = math.prod(g.shape[2:])
    patch = channels // groups * math.prod(kernel)
    if form == "auto":
        form = "gram" if prefer_gram(positions, out_channels // groups, patch) else "materialise"

    pads = _paddings(layer)
    if form == "gram":
        a = unfold_patches(_pad(x, pads, layer.padding_mode), kernel, stride, dilation, groups)  # (B*G, T, K)
        gg = g.reshape(batch * groups, out_channels // groups, positions).transpose(1, 2)      # (B*G, T, O/G)
        return gram_sqnorm(a, gg).reshape(batch, groups).sum(dim=1)
    if x.is_cuda:
        return materialise_with_kernels(layer, x, g, pads)
    return materialise_per_sample(layer, x, g, pads)


def materialise_with_kernels(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, pads) -> torch.Tensor:
    """The fused kernels: conv2d_weight_grad_sqnorm for 1-D/2-D (1-D as height 1), and
    linear_weight_grad_sqnorm on the unfolded patches for 3-D.  -> [B]"""
    nd = x.dim() - 2
    kernel, stride, dilation, groups = layer.kernel_size, layer.stride, layer.dilation, layer.groups
    acc = accum_dtype(x, g)
    if layer.padding_mode == "zeros" and all(lo == hi for lo, hi in pads):
        padding = tuple(lo for lo, _ in pads)      # the kernel pads implicitly: no padded copy
    else:
        x, padding = _pad(x, pads, layer.padding_mode), (0,) * nd
    if nd == 1:  # a 1-D conv is a 2-D conv over an image of height 1
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, stride, padding, dilation = (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    if nd <= 2:
        return conv2d_weight_grad_sqnorm(x, g, kernel, stride=stride, padding=padding,
                                         dilation=dilation, groups=groups).to(acc)
    batch, out_channels = g.shape[:2]
    x = _pad(x, [(p, p) for p in padding], "zeros")
    a = unfold_patches(x, kernel, stride, dilation, groups)                                # (B*G, T, K)
    gg = g.reshape(batch * groups, out_channels // groups, -1).transpose(1, 2)             # (B*G, T, O/G)
    return linear_weight_grad_sqnorm(a, gg).to(acc).reshape(batch, groups).sum(dim=1)


def materialise_per_sample(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, pads) -> torch.Tensor:
    """One weight-only convolution backward per sample (oneDNN's direct kernels, no unfolded
    copy): the fastest exact materialisation on CPU, any dims, groups, stride, dilation.  -> [B]"""
    nd = x.dim() - 2
    acc = accum_dtype(x, g)
    if layer.padding_mode == "zeros" and all(lo == hi for lo, hi in pads):
        padding = [lo for lo, _ in pads]
    else:
        x, padding = _pad(x, pads, layer.padding_mode), [0] * nd
    x, g = x.to(acc), g.to(acc)
    weight = layer.weight.detach().to(acc)  # only its shape is read
    out = torch.empty(x.shape[0], dtype=acc, device=x.device)
    for b in range(x.shape[0]):
        grad_w = torch.ops.aten.convolution_backward(
            g[b : b + 1], x[b : b + 1], weight, None, list(layer.stride), padding, list(layer.dilation),
            False, [0] * nd, layer.groups, [False, True, False])[1]
        flat = grad_w.reshape(-1)
        out[b] = torch.dot(flat, flat)
    return out


def unfold_patches(x: torch.Tensor, kernel, stride, dilation, groups: int) -> torch.Tensor:
    """Input patches of an already padded x [B, C, *S] -> [B*G, T, C/G * prod(kernel)].

    Row t of group j holds the C/G x kernel window that output position t reads, flattened
    in the weight's (channel, kernel...) order. Works for any number of spatial dims.
    """
    nd = x.dim() - 2
    batch, channels = x.shape[:2]
    for i in range(nd):
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])        # appends a window dim of size span
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    # x: (B, C, T_1..T_nd, k_1..k_nd)
    out_shape = x.shape[2 : 2 + nd]
    x = x.reshape(batch, groups, channels // groups, *out_shape, *kernel)
    order = (0, 1, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd))
    x = x.permute(order)                              # (B, G, T_1..T_nd, C/G, k_1..k_nd)
    return x.reshape(batch * groups, math.prod(out_shape), -1)


def _paddings(layer: nn.Module) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim, resolving "same" and "valid" as torch does."""
    nd = len(layer.kernel_size)
    if layer.padding == "valid":
        return [(0, 0)] * nd
    if layer.padding == "same":
        pads = []
        for k, d in zip(layer.kernel_size, layer.dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in layer.padding]


def _pad(x: torch.Tensor, pads: list[tuple[int, int]], mode: str) -> torch.Tensor:
    if not any(lo or hi for lo, hi in pads):
        return x
    flat = [v for lo_hi in reversed(pads) for v in lo_hi]  # F.pad wants the last dim first
    return F.pad(x, flat, mode="constant" if mode == "zeros" else mode)
