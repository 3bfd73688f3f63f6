"""nn.Conv1d / Conv2d / Conv3d and F.conv1d/2d/3d: any stride, padding (numbers, "same", "valid",
every padding mode), dilation and groups (depthwise included), with or without bias.

With G groups, sample b's weight gradient for group j is G_bj = sum_t g_{t} a_t^T where t runs
over the T output positions, g_t in R^{O/G} is the output gradient there and a_t in
R^{C/G * prod(kernel)} the input patch that produced it. Then

    weight: sum_j ||G_bj||^2   (the cheapest of three exact forms, below)
    bias:   ||sum_t g_t||^2    (over all O channels)

The forms, with T output positions, K = C/G * prod(kernel), P padded input pixels:
    materialise  G_bj itself, squared and summed                          cost ~ T * O/G * K
    gram         sum_{t,t'} (a_t . a_t')(g_t . g_t') over unfolded patches  cost ~ T^2 (O/G + K)
    pixel_gram   the same sum, with the patch Gram a_t . a_t' assembled from the Gram of input
                 pixels: a_t . a_t' = sum_taps x[t + tap] . x[t' + tap], so one (P x P)
                 product per sample replaces the (T x K) @ (K x T) one: for a stride-1 3x3
                 conv about 9x fewer operations, and no unfolded copy  cost ~ T^2 (O/G + taps) + P^2 C/G

Materialisation on CUDA calls the fused kernels: ``conv2d_weight_grad_sqnorm`` for 1-D and
2-D convolutions (1-D as a 2-D conv of height 1, no unfolded copy), and
``linear_weight_grad_sqnorm`` on the unfolded patches for 3-D. On CPU it runs one weight-only
convolution backward per sample, which beats any unfolding there, except for depthwise
convolutions (one grouped convolution for all samples) and 1x1 ones (one bmm). The Gram form needs the
unfolded patches.
"""
from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import conv2d_weight_grad_sqnorm, linear_weight_grad_sqnorm
from .forms import FORMS, gram_sqnorm, sqnorm_from_input_gram
from .generic import generic_grads
from .ops import OpCall, per_sample_result, register_op_rule
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


CONV_FORMS = (*FORMS, "pixel_gram")


def conv_form_costs(layer: nn.Module, x_shape, g_shape) -> dict[str, int]:
    """Operations per sample of each exact form (see the module docstring)."""
    groups = layer.groups
    cg, og = x_shape[1] // groups, g_shape[1] // groups
    taps = math.prod(layer.kernel_size)
    positions = math.prod(g_shape[2:])
    pixels = math.prod(s + lo + hi for s, (lo, hi) in zip(x_shape[2:], _paddings(layer)))
    return {"materialise": positions * og * cg * taps * groups,
            "gram": positions ** 2 * (og + cg * taps) * groups,
            "pixel_gram": (positions ** 2 * (og + taps) + pixels ** 2 * cg) * groups}


# Operations are not equally fast everywhere. On CPU the materialising form runs oneDNN's
# convolution backward per sample, about twice as fast per operation as the bmm and strided adds
# of the Gram forms (measured, batch 32, 2 cores: 128x16x16 3x3 conv materialise 10.1 ms vs
# pixel Gram 13.5 ms, where the count favours the pixel Gram 22.4M to 37.7M). On CUDA the count
# stands as it is (the materialising Triton kernel is no faster per operation than cuBLAS).
MATERIALISE_WEIGHT = {"cpu": 0.5}


def choose_conv_form(layer: nn.Module, x_shape, g_shape, device_type: str = "cuda") -> str:
    """The cheapest exact form for this layer, these shapes and this device (ties: listed order)."""
    costs = conv_form_costs(layer, x_shape, g_shape)
    if not tiles(layer):   # a patch convolution materialises by a bmm, no faster than the Gram's
        costs["materialise"] *= MATERIALISE_WEIGHT.get(device_type, 1.0)
    return min(costs, key=costs.get)


def tiles(layer: nn.Module) -> bool:
    """Whether the kernel windows tile the input without overlap (stride = kernel > 1, no dilation,
    no padding): patch embeddings and ConvNeXt's downsampling. Their unfolded patches are a
    reshape of the input, so one bmm materialises every sample's gradient."""
    padding = layer.padding
    return (math.prod(layer.kernel_size) > 1 and tuple(layer.stride) == tuple(layer.kernel_size)
            and all(d == 1 for d in layer.dilation) and not isinstance(padding, str)
            and all(p == 0 for p in padding) and getattr(layer, "padding_mode", "zeros") == "zeros")


def conv_weight_sqnorm(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, form: str = "auto") -> torch.Tensor:
    """Per-sample squared norm of the weight gradient.  x [B, C, *S], g [B, O, *S'] -> [B]"""
    if form not in CONV_FORMS:
        raise ValueError(f"form must be one of {CONV_FORMS}, got {form!r}")
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    groups = layer.groups
    batch = x.shape[0]
    out_channels = g.shape[1]
    positions = math.prod(g.shape[2:])
    if form == "auto":
        form = choose_conv_form(layer, x.shape, g.shape, x.device.type)

    pads = _paddings(layer)
    gg = g.reshape(batch * groups, out_channels // groups, positions).transpose(1, 2)          # (B*G, T, O/G)
    if form == "pixel_gram":
        return pixel_gram_sqnorm(layer, _pad(x, pads, layer.padding_mode), gg, g.shape[2:], accum_dtype(x, g))
    if x.is_cuda and form == "materialise":
        return materialise_with_kernels(layer, x, g, pads)
    if form == "materialise" and math.prod(kernel) > 1 and not tiles(layer):
        if x.shape[1] == groups:   # depthwise: every sample's gradients from one grouped conv
            return materialise_depthwise(layer, x, g, pads)
        return materialise_per_sample(layer, x, g, pads)
    # The unfolded Gram, or (on CPU) a 1x1 or tiling conv materialised by one bmm on its patches.
    a = unfold_patches(_pad(x, pads, layer.padding_mode), kernel, stride, dilation, groups)    # (B*G, T, K)
    per_group = gram_sqnorm(a, gg) if form == "gram" else linear_weight_grad_sqnorm(a, gg).to(accum_dtype(x, g))
    return per_group.reshape(batch, groups).sum(dim=1)


def pixel_gram_sqnorm(layer: nn.Module, xp: torch.Tensor, gg: torch.Tensor, out_shape, acc: torch.dtype) -> torch.Tensor:
    """The pixel-Gram form on inputs centred per sample and channel.  xp: the padded input
    [B, C, *Sp]; gg: output gradients [B*G, T, O/G]  -> [B]

    With m the mean of each (sample, channel) over the padded pixels, every patch is
    a_t = A_t + c, c = m repeated over the taps. Then sum_t g_t a_t^T = sum_t g_t A_t^T + s c^T
    (s = sum_t g_t) and

        ||.||^2 = sum_{t,t'} (A_t . A_t')(g_t . g_t') + 2 sum_t (s . g_t)(A_t . c) + |s|^2 |c|^2

    where A_t . c = sum_taps y[t + tap] with y = sum_channels m * (x - m), per pixel. Uncentred,
    a large common input level against gradients that cancel over the positions would make
    the Gram products cancel in float32 (as in gram_sqnorm).
    """
    kernel, stride, dilation, groups = layer.kernel_size, layer.stride, layer.dilation, layer.groups
    batch, channels = xp.shape[:2]
    xp = xp.to(acc)
    spatial = tuple(range(2, xp.dim()))
    mean = xp.mean(dim=spatial, keepdim=True)                                  # (B, C, 1, ...)
    centred = xp - mean
    gram_a = patch_gram_from_pixels(centred, kernel, stride, dilation, groups, out_shape, acc)   # (B*G, T, T)
    main = sqnorm_from_input_gram(gram_a, gg)                                   # (B*G,)
    per_group = (batch * groups, channels // groups)
    y = (centred * mean).reshape(*per_group, *xp.shape[2:]).sum(dim=1)         # (B*G, *Sp)
    along_c = _sum_over_taps(lambda rows: y[(slice(None), *rows)],
                             kernel, stride, dilation, out_shape)               # (B*G, *S'): A_t . c
    gg = gg.to(acc)
    s_sum = gg.sum(dim=1)                                                       # (B*G, O/G)
    along_s = torch.bmm(gg, s_sum.unsqueeze(2)).squeeze(2)                      # (B*G, T): s . g_t
    cross = 2 * (along_s * along_c.reshape(batch * groups, -1)).sum(dim=1)
    c_sq = math.prod(kernel) * mean.reshape(*per_group).pow(2).sum(dim=1)       # (B*G,): |c|^2
    total = (main + cross + s_sum.pow(2).sum(dim=1) * c_sq).clamp_min(0)
    return total.reshape(batch, groups).sum(dim=1)


def patch_gram_from_pixels(xp: torch.Tensor, kernel, stride, dilation, groups: int, out_shape,
                           acc: torch.dtype | None = None) -> torch.Tensor:
    """Gram matrices of the conv's input patches, a_t . a_t', without unfolding.

    xp: the padded input [B, C, *Sp]; out_shape: the output's spatial shape S'. With the
    pixel Gram M[p, q] = sum_c xp[c, p] xp[c, q] (per sample and group), output position t
    reads pixel stride*t + dilation*tap for each tap, so a_t . a_t' = sum_tap M[stride*t +
    dilation*tap, stride*t' + dilation*tap]: one strided block of M per tap.  -> [B*G, T, T]
    in ``acc`` (default: float32, float64 for float64 input).
    """
    batch, channels = xp.shape[:2]
    acc = acc or accum_dtype(xp)
    pixels = xp.reshape(batch * groups, channels // groups, -1).to(acc)    # (B*G, C/G, P)
    gram = torch.bmm(pixels.transpose(1, 2), pixels)                        # (B*G, P, P)
    gram = gram.view(batch * groups, *xp.shape[2:], *xp.shape[2:])
    out = _sum_over_taps(lambda rows: gram[(slice(None), *rows, *rows)],
                         kernel, stride, dilation, out_shape)                # (B*G, *S', *S')
    positions = math.prod(out_shape)
    return out.reshape(batch * groups, positions, positions)


def _sum_over_taps(block_at, kernel, stride, dilation, out_shape) -> torch.Tensor:
    """sum over the kernel's taps of ``block_at(rows)``, where ``rows`` holds, per spatial dim, the
    slice of padded input pixels that tap reads for every output position (stride*t + dilation*tap)."""
    total = None
    for tap in itertools.product(*(range(k) for k in kernel)):
        rows = tuple(slice(d * i, d * i + s * (n - 1) + 1, s)
                     for i, d, s, n in zip(tap, dilation, stride, out_shape))
        block = block_at(rows)
        total = block.clone() if total is None else total.add_(block)
    return total


def materialise_with_kernels(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, pads) -> torch.Tensor:
    """The fused kernels: conv2d_weight_grad_sqnorm for 1-D/2-D (1-D as height 1), and
    linear_weight_grad_sqnorm on the unfolded patches for 3-D.  -> [B]"""
    nd = x.dim() - 2
    kernel, stride, dilation, groups = layer.kernel_size, layer.stride, layer.dilation, layer.groups
    acc = accum_dtype(x, g)
    x, padding = _op_padding(x, pads, layer.padding_mode)      # the kernel pads zeros itself
    if nd == 1:  # a 1-D conv is a 2-D conv over an image of height 1
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, stride, padding, dilation = (1, *kernel), (1, *stride), [0, *padding], (1, *dilation)
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
    x, padding = _op_padding(x, pads, layer.padding_mode)
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


def materialise_depthwise(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, pads) -> torch.Tensor:
    """Depthwise convolutions (one input channel per group, any channel multiplier): sample b's
    weight gradient for output channel o of input channel c is the correlation of x[b, c] with
    g[b, o], with the conv's stride as dilation and its dilation as stride. One grouped
    convolution (groups = B*C) computes it for all samples at once: on 2 CPU cores 3-17x faster
    than the per-sample backward on MobileNetV3 shapes.  -> [B]"""
    nd = x.dim() - 2
    batch, channels = x.shape[:2]
    out_channels = g.shape[1]
    acc = accum_dtype(x, g)
    x, padding = _op_padding(x, pads, layer.padding_mode)
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    grads = conv(x.to(acc).reshape(1, batch * channels, *x.shape[2:]),
                 g.to(acc).reshape(batch * out_channels, 1, *g.shape[2:]),
                 None, stride=layer.dilation, padding=padding, dilation=layer.stride,
                 groups=batch * channels)                                    # (1, B*O, >= kernel)
    grads = grads[(slice(None), slice(None), *(slice(0, k) for k in layer.kernel_size))]
    return grads.reshape(batch, -1).pow(2).sum(dim=1)


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


def _op_padding(x: torch.Tensor, pads: list[tuple[int, int]], mode: str) -> tuple[torch.Tensor, list[int]]:
    """(x, padding) for an op that pads zeros symmetrically itself: x as it is where it can,
    else x padded here (other modes, asymmetric "same") and padding 0."""
    if mode == "zeros" and all(lo == hi for lo, hi in pads):
        return x, [lo for lo, _ in pads]
    return _pad(x, pads, mode), [0] * len(pads)


def _pad(x: torch.Tensor, pads: list[tuple[int, int]], mode: str) -> torch.Tensor:
    if not any(lo or hi for lo, hi in pads):
        return x
    flat = [v for lo_hi in reversed(pads) for v in lo_hi]  # F.pad wants the last dim first
    return F.pad(x, flat, mode="constant" if mode == "zeros" else mode)


# --------------------------------------------------------------------------- op rule
# F.conv1d/2d/3d as nn.Conv calls them (other padding modes pad with F.pad first, which the
# recording sees as its own op): the same forms on a stand-in for the layer.

CONV_SIGNATURE = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def conv_stand_in(call: OpCall) -> SimpleNamespace:
    """What the forms read of an nn.Conv layer, from the op's arguments."""
    weight = call.args[1]
    nd = weight.dim() - 2

    def per_dim(v):
        return tuple(v) if isinstance(v, (list, tuple)) else (int(v),) * nd
    padding = call.arg(4, 0)
    return SimpleNamespace(kernel_size=tuple(weight.shape[2:]), stride=per_dim(call.arg(3, 1)),
                           dilation=per_dim(call.arg(5, 1)), groups=int(call.arg(6, 1)),
                           padding=padding if isinstance(padding, str) else per_dim(padding),
                           padding_mode="zeros", weight=weight)


def _conv_check(call: OpCall) -> str | None:
    if call.lay(0) != (0, 1) or call.out_lay != (0, 1):
        return "the batch is not dim 0 of its own (a folded batch)"
    if call.lay(1) is not None or (call.arg(2) is not None and call.lay(2) is not None):
        return "only the input may be batched"
    return None


def _conv_form(call: OpCall, slot) -> str:
    if slot == 2:
        return "sum over the positions"
    layer = conv_stand_in(call)
    x = call.args[0]
    out = (x.shape[0], call.out_shape[1], *call.out_shape[2:])
    kernel = "x".join(map(str, layer.kernel_size))
    kind = " depthwise" if layer.groups > 1 and layer.groups == x.shape[1] else ""
    return f"{choose_conv_form(layer, x.shape, out, x.device.type)} ({kernel}{kind}, T={math.prod(out[2:])})"


@register_op_rule("conv1d", "conv2d", "conv3d", signature=CONV_SIGNATURE, check=_conv_check, form=_conv_form)
def conv_op(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    x = call.args[0]
    out = {}
    if 1 in call.pins:
        out[1] = (conv_weight_sqnorm(conv_stand_in(call), x, grad) if wants_norm(1)
                  else generic_grads(call, grad, [1])[1])
    if 2 in call.pins:
        summed = grad.to(accum_dtype(x, grad)).flatten(2).sum(dim=2)                    # (B, O)
        out[2] = per_sample_result(summed, wants_norm(2))
    return out
