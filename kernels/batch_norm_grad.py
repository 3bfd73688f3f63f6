"""Per-sample squared norms of an eval-mode BatchNorm's weight and bias gradients, in one pass.

For y = (x - mean_c) * inv_std_c * weight_c + bias_c with running statistics and g = dL/dy,
sample b's gradients are, per channel c (l runs over the positions: every dim after C),

    dweight_b[c] = inv_std_c * sum_l g[b,c,l] * (x[b,c,l] - mean_c)      dbias_b[c] = sum_l g[b,c,l]

and the outputs are ||dweight_b||^2 and ||dbias_b||^2 per sample. The plain torch reference
reduces a centred copy of x and g in a few passes; the Triton kernel reads x and g once, in
their own dtype and layout (NCHW, channels_last, any mergeable strides), centres in float32
before multiplying (no cancellation between sum g*x and mean * sum g), and writes one
partial per (sample, block of channels), added in a fixed order: deterministic.
"""
from __future__ import annotations

import math

import torch

from ._blocks import pow2_block
from ._dispatch import TRITON_AVAILABLE, accum_dtype, dispatch

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _batch_norm_grad_sqnorm_kernel(x, g, mean, inv_std, partial_w, partial_b,
                                       C, L, sxb, sxc, sxl, sgb, sgc, sgl, n_blocks,
                                       ACC: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr):
        """Grid (n_blocks, B): program (j, b) sums channels [j*BC, (j+1)*BC) of sample b."""
        j = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_c = j * BC + tl.arange(0, BC)
        c_ok = offs_c < C
        mu = tl.load(mean + offs_c, mask=c_ok, other=0.0).to(ACC)
        x_rows = x + b * sxb + offs_c.to(tl.int64) * sxc
        g_rows = g + b * sgb + offs_c.to(tl.int64) * sgc
        # Element-wise accumulators, reduced once after the loop (cheaper than a reduction per
        # step, and a loop-carried reduction trips a Triton pass on sm_90).
        acc_gx = tl.zeros([BC, BL], dtype=ACC)
        acc_g = tl.zeros([BC, BL], dtype=ACC)
        for l0 in range(0, L, BL):
            offs_l = l0 + tl.arange(0, BL)
            ok = c_ok[:, None] & (offs_l < L)[None, :]
            xv = tl.load(x_rows[:, None] + offs_l[None, :] * sxl, mask=ok, other=0.0).to(ACC)
            gv = tl.load(g_rows[:, None] + offs_l[None, :] * sgl, mask=ok, other=0.0).to(ACC)
            acc_gx += gv * (xv - mu[:, None])   # gv is 0 wherever masked
            acc_g += gv
        s_gx = tl.sum(acc_gx, axis=1)
        s_g = tl.sum(acc_g, axis=1)
        w = s_gx * tl.load(inv_std + offs_c, mask=c_ok, other=0.0).to(ACC)
        tl.store(partial_w + b * n_blocks + j, tl.sum(w * w, axis=0))
        tl.store(partial_b + b * n_blocks + j, tl.sum(s_g * s_g, axis=0))
else:  # pragma: no cover
    _batch_norm_grad_sqnorm_kernel = None


def _check(x: torch.Tensor, g: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor) -> None:
    if x.dim() < 2 or x.shape != g.shape:
        raise ValueError("batch_norm_grad_sqnorm takes x and grad_out of one shape [B, C, ...]; got "
                         f"x {tuple(x.shape)}, grad_out {tuple(g.shape)}")
    if mean.shape != (x.shape[1],) or inv_std.shape != (x.shape[1],):
        raise ValueError(f"mean and inv_std must have shape [C] = [{x.shape[1]}]; got "
                         f"{tuple(mean.shape)} and {tuple(inv_std.shape)}")
    if not (x.is_floating_point() and g.is_floating_point()):
        raise TypeError(f"batch_norm_grad_sqnorm takes floating tensors, got {x.dtype}, {g.dtype}")
    if len({t.device for t in (x, g, mean, inv_std)}) != 1:
        raise ValueError("x, grad_out, mean and inv_std must be on one device")


def batch_norm_grad_sqnorm_reference(x: torch.Tensor, g: torch.Tensor, mean: torch.Tensor,
                                     inv_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch in float32 (float64 for float64 input). -> (weight [B], bias [B])

    Centres x before the dot, as the kernel does: sum g*x - mean * sum g would cancel wherever a
    sample sits close to the running mean compared with its size (x = 8 + 1e-4 * noise lost
    three digits that way), and no statistic of the layer alone rules that out.
    """
    _check(x, g, mean, inv_std)
    acc = accum_dtype(x, g)
    batch, channels = x.shape[:2]
    positions = math.prod(x.shape[2:])
    mean, inv_std = mean.to(acc), inv_std.to(acc)
    gf = g.to(acc).reshape(batch, channels, positions)
    centred = (x.to(acc) - mean.view(1, -1, *([1] * (x.dim() - 2)))).reshape(batch, channels, positions)
    dots = torch.linalg.vecdot(gf, centred)                                 # (B, C)
    weight = (dots * inv_std).pow(2).sum(dim=1)
    bias = gf.sum(dim=2).pow(2).sum(dim=1)
    return weight, bias


def _as_bcl(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """t [B, C, *S] and its (batch, channel, position) strides, with the positions of S merged
    into one dim; a copy only where S's strides cannot be merged (not NCHW nor channels_last)."""
    sizes, strides = t.shape[2:], t.stride()[2:]
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    if all(s == dims[i + 1][1] * dims[i + 1][0] for i, (_, s) in enumerate(dims[:-1])):
        step = dims[-1][1] if dims else 1
        return t, (t.stride(0), t.stride(1), step)
    t = t.contiguous()
    return t, (t.stride(0), t.stride(1), 1)


def _batch_norm_grad_sqnorm_triton(x, g, mean, inv_std):
    batch, channels = x.shape[:2]
    positions = math.prod(x.shape[2:])
    acc = accum_dtype(x, g)
    x, (sxb, sxc, sxl) = _as_bcl(x)
    g, (sgb, sgc, sgl) = _as_bcl(g)
    if sxl == 1 and sgl == 1:   # positions contiguous (NCHW): long rows of positions
        BL = pow2_block(positions, lo=16, hi=256)
        BC = pow2_block(max(1, 2048 // BL), lo=1, hi=128)
    else:                       # channels contiguous (channels_last): wide blocks of channels
        BC = pow2_block(channels, lo=16, hi=128)
        BL = pow2_block(max(1, 2048 // BC), lo=1, hi=256)
    n_blocks = triton.cdiv(channels, BC)
    partials = torch.empty(2, batch, n_blocks, dtype=acc, device=x.device)   # weight, bias
    if batch > 0:
        _batch_norm_grad_sqnorm_kernel[(n_blocks, batch)](
            x, g, mean.to(acc).contiguous(), inv_std.to(acc).contiguous(), partials[0], partials[1],
            channels, positions, sxb, sxc, sxl, sgb, sgc, sgl, n_blocks,
            ACC=tl.float64 if acc == torch.float64 else tl.float32, BC=BC, BL=BL)
    # Fixed-order reduction over the blocks, one launch for both (none with a single block).
    sums = partials[:, :, 0] if n_blocks == 1 else partials.sum(dim=2)
    return sums[0], sums[1]


def batch_norm_grad_sqnorm(x: torch.Tensor, grad_out: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor,
                           impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x, grad_out [B, C, ...]; mean, inv_std [C] -> (||dweight_b||^2, ||dbias_b||^2), each [B],
    float32 (float64 for float64 input).

    Example: ``batch_norm_grad_sqnorm(x, gy, bn.running_mean, torch.rsqrt(bn.running_var + bn.eps))``.
    """
    _check(x, grad_out, mean, inv_std)
    return dispatch(impl, "batch_norm_grad_sqnorm", (x, grad_out, mean, inv_std), _batch_norm_grad_sqnorm_kernel,
                    lambda: _batch_norm_grad_sqnorm_triton(x, grad_out, mean, inv_std),
                    lambda: batch_norm_grad_sqnorm_reference(x, grad_out, mean, inv_std))
