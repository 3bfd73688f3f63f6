"""Squared Frobenius norm of each sample's sequence-linear weight gradient.

For a linear layer applied at T positions, y_t = W a_t (+ b), with W of shape [p, d], sample b's
weight gradient is G_b = sum_t g_{b,t} a_{b,t}^T (g = dloss/dy), and

    out[b] = ||G_b||_F^2 = sum_{i<p, j<d} (sum_t g[b,t,i] a[b,t,j])^2        a [B,T,d], g [B,T,p]

The Triton kernel never writes G_b: one program per (sample, [BP x BD] tile of G_b) accumulates
the tile over T in registers, squares and sums it, and writes one partial; the partials of a
sample are then added in tile order (deterministic, no atomics).
"""
from __future__ import annotations

import torch

from ._blocks import dot_dtype, pow2_block
from ._dispatch import TRITON_AVAILABLE, accum_dtype, dispatch, is_interpreted

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    _TL = {torch.float32: tl.float32, torch.float64: tl.float64,
           torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    @triton.jit
    def _linear_weight_grad_sqnorm_kernel(a, g, partials, T, D, P,
                                          sab, sat, sad, sgb, sgt, sgp, n_tiles_d, n_tiles,
                                          DOT: tl.constexpr, ACC: tl.constexpr,
                                          BP: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
        """partials[b, tile] = sum_{i in tile_p, j in tile_d} (sum_t g[b,t,i] a[b,t,j])^2.

        Grid (n_tiles_p * n_tiles_d, B); strides in elements, any layout.
        """
        tile = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        ip = tile // n_tiles_d
        jd = tile % n_tiles_d
        offs_p = ip * BP + tl.arange(0, BP)
        offs_d = jd * BD + tl.arange(0, BD)
        offs_t = tl.arange(0, BT)
        acc = tl.zeros([BP, BD], dtype=ACC)
        for t0 in range(0, T, BT):
            ts = t0 + offs_t
            g_tile = tl.load(g + b * sgb + offs_p[:, None] * sgp + ts[None, :] * sgt,
                             mask=(offs_p[:, None] < P) & (ts[None, :] < T), other=0.0)   # (BP, BT)
            a_tile = tl.load(a + b * sab + ts[:, None] * sat + offs_d[None, :] * sad,
                             mask=(ts[:, None] < T) & (offs_d[None, :] < D), other=0.0)   # (BT, BD)
            acc = tl.dot(g_tile.to(DOT), a_tile.to(DOT), acc, input_precision="ieee", out_dtype=ACC)
        tl.store(partials + b * n_tiles + tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
else:  # pragma: no cover
    _linear_weight_grad_sqnorm_kernel = None


def _check(a: torch.Tensor, g: torch.Tensor) -> None:
    if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
        raise ValueError("linear_weight_grad_sqnorm takes a [B, T, d] and g [B, T, p] with the same "
                         f"B and T; got a {tuple(a.shape)}, g {tuple(g.shape)}")
    if not (a.is_floating_point() and g.is_floating_point()):
        raise TypeError(f"linear_weight_grad_sqnorm takes floating tensors, got {a.dtype}, {g.dtype}")
    if a.device != g.device:
        raise ValueError(f"a and g must be on one device, got {a.device} and {g.device}")


def linear_weight_grad_sqnorm_reference(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Plain torch: materialise G_b = g_b^T a_b with one bmm, then square-sum. -> [B]"""
    _check(a, g)
    acc = accum_dtype(a, g)
    grad = torch.bmm(g.to(acc).transpose(1, 2), a.to(acc))  # (B, p, d)
    return grad.pow(2).sum(dim=(1, 2))


def _linear_weight_grad_sqnorm_triton(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    B, T, D = a.shape
    P = g.shape[2]
    acc = accum_dtype(a, g)
    dot = dot_dtype(a, g, interpreted=is_interpreted(_linear_weight_grad_sqnorm_kernel))
    if a.dtype not in _TL:
        a = a.float()
    if g.dtype not in _TL:
        g = g.float()
    BP, BD, BT = pow2_block(P), pow2_block(D), pow2_block(T, hi=32)
    n_tiles_d = triton.cdiv(D, BD)
    n_tiles = triton.cdiv(P, BP) * n_tiles_d
    partials = torch.empty(B, n_tiles, dtype=acc, device=a.device)
    if B > 0:
        _linear_weight_grad_sqnorm_kernel[(n_tiles, B)](
            a, g, partials, T, D, P, *a.stride(), *g.stride(), n_tiles_d, n_tiles,
            DOT=_TL[dot], ACC=_TL[acc], BP=BP, BD=BD, BT=BT)
    return partials.sum(dim=1)  # fixed-order reduction over tiles


def linear_weight_grad_sqnorm(a: torch.Tensor, g: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """a [B, T, d], g [B, T, p] -> float32 [B] (float64 for float64 inputs).

    Example: ``linear_weight_grad_sqnorm(inputs, grad_outputs)  # -> [B]``.
    """
    _check(a, g)
    return dispatch(impl, "linear_weight_grad_sqnorm", (a, g), _linear_weight_grad_sqnorm_kernel,
                    lambda: _linear_weight_grad_sqnorm_triton(a, g),
                    lambda: linear_weight_grad_sqnorm_reference(a, g))
