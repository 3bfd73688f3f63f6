"""Squared Frobenius norm of each sample's Conv2d weight gradient, with implicit im2col.

For a convolution with groups G, C input and O output channels (Cg = C/G, Og = O/G), kernel
(kh, kw), stride s, padding q, dilation r, sample b's weight gradient for output channel
o = gi*Og + oo (group gi) and tap (c, i, j) is

    dW_b[o, c, i, j] = sum_{y<H', z<W'} grad_out[b, o, y, z] * x[b, gi*Cg + c, y*s_h - q_h + i*r_h,
                                                                            z*s_w - q_w + j*r_w]

(x taken as zero outside the image), and out[b] = sum dW_b^2 over all (o, c, i, j). Bias excluded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import accum_dtype, use_triton

_conv2d_weight_grad_sqnorm_kernel = None  # the Triton kernel lands here


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv2d_weight_grad_sqnorm_reference(x: torch.Tensor, grad_out: torch.Tensor, kernel_size,
                                        stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """Plain torch: unfold x, one bmm per group, square-sum. -> [B]"""
    kh, kw = _pair(kernel_size)
    B, C = x.shape[:2]
    O = grad_out.shape[1]
    acc = accum_dtype(x, grad_out)
    cols = F.unfold(x.to(acc), (kh, kw), dilation=_pair(dilation), padding=_pair(padding),
                    stride=_pair(stride))                                  # (B, C*kh*kw, L)
    L = cols.shape[-1]
    if grad_out.shape[2] * grad_out.shape[3] != L:
        raise ValueError(f"grad_out spatial size {tuple(grad_out.shape[2:])} does not match the conv "
                         f"output for x {tuple(x.shape)} and these conv settings ({L} positions)")
    cols = cols.reshape(B * groups, (C // groups) * kh * kw, L)              # (B*G, K, L)
    go = grad_out.to(acc).reshape(B * groups, O // groups, L)                # (B*G, Og, L)
    grad = torch.bmm(go, cols.transpose(1, 2))                               # (B*G, Og, K)
    return grad.pow(2).sum(dim=(1, 2)).reshape(B, groups).sum(dim=1)


def conv2d_weight_grad_sqnorm(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, stride=1,
                              padding=0, dilation=1, groups: int = 1, impl: str = "auto") -> torch.Tensor:
    """x [B, C, H, W], grad_out [B, O, H', W'] -> float32 [B] (float64 for float64 inputs)."""
    if not use_triton(impl, (x, grad_out), _conv2d_weight_grad_sqnorm_kernel, "conv2d_weight_grad_sqnorm"):
        return conv2d_weight_grad_sqnorm_reference(x, grad_out, kernel_size, stride, padding,
                                                   dilation, groups)
    raise NotImplementedError
