"""The two exact forms of a per-sample weight-gradient norm, and the cost model choosing one.

For a layer out = a @ W^T applied at T positions (tokens, or conv output pixels with a_t the
input patch), sample b's weight gradient is G_b = sum_t g_t a_t^T  (p x d), and

    materialise:  ||G_b||^2 = sum_{o,k} (sum_t g_{t,o} a_{t,k})^2          cost ~ T * p * d
    Gram (ghost): ||G_b||^2 = sum_{t,t'} (a_t . a_t') (g_t . g_t')         cost ~ T^2 * (p + d)

Both are exact; the cheaper one is chosen per layer and per batch shape. Materialisation runs
the fused kernel (``gradnorm_engine.kernels.linear_weight_grad_sqnorm``), which never keeps
G_b in memory on CUDA. The Gram form runs plain (two products and a sum) and is redone centred
for the rows where its rounding could have cost digits (``checked_gram_sqnorm``).
"""
from __future__ import annotations

import math

import torch

from ..kernels import linear_weight_grad_sqnorm
from .registry import accum_dtype

FORMS = ("auto", "materialise", "gram")


def prefer_gram(positions: int, out_features: int, in_features: int) -> bool:
    """True when the Gram form is cheaper: T^2 (p + d) < T p d."""
    return positions * (out_features + in_features) < out_features * in_features


def gram_sqnorm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum_{t,t'} (a_t . a_t')(g_t . g_t') per row.  a [N, T, d], g [N, T, p] -> [N]

    Computed in float32 (float64 for float64 input) from the Gram matrices of the inputs and
    gradients centred over the positions. With a_t = abar + A_t, g_t = gbar + C_t (sum_t A_t =
    sum_t C_t = 0) the gradient is sum_t g_t a_t^T = T gbar abar^T + sum_t C_t A_t^T, so

        ||.||^2 = sum_{t,t'} (A_t . A_t')(C_t . C_t') + 2T sum_t (gbar . C_t)(A_t . abar) + T^2 |gbar|^2 |abar|^2

    Uncentred, a direction shared by all positions (a large common input, e.g. attention keys
    after a LayerNorm) against gradients that cancel over the positions (a softmax's) makes the
    Gram products cancel: float32 then lost up to 3 digits against the per-sample loop.
    """
    acc = accum_dtype(a, g)
    a, g = a.to(acc), g.to(acc)
    positions = a.shape[1]
    a_mean, g_mean = a.mean(dim=1, keepdim=True), g.mean(dim=1, keepdim=True)     # (N, 1, d), (N, 1, p)
    a_c, g_c = a - a_mean, g - g_mean
    centred = sqnorm_from_input_gram(torch.bmm(a_c, a_c.transpose(1, 2)), g_c)
    along_g = torch.bmm(g_c, g_mean.transpose(1, 2)).squeeze(2)                 # (N, T): gbar . C_t
    along_a = torch.bmm(a_c, a_mean.transpose(1, 2)).squeeze(2)                 # (N, T): A_t . abar
    cross = 2 * positions * (along_g * along_a).sum(dim=1)
    rank_one = positions ** 2 * g_mean.pow(2).sum(dim=(1, 2)) * a_mean.pow(2).sum(dim=(1, 2))
    return (centred + cross + rank_one).clamp_min(0)   # a true zero may round to -1e-30


# Relative rounding error the plain Gram may keep before a row is recomputed centred: ten times
# below the float32 tolerances the engine is held to (1e-4 against the per-sample loop).
GRAM_TOLERANCE = 1e-5


def checked_gram_sqnorm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The Gram form at the cost of two products: plain, and centred only where that could be
    inexact.  a [N, T, d], g [N, T, p] -> [N]

    With P = (a a^T) * (g g^T) (entrywise), the result is R = sum P. Each product a_t . a_t' is
    rounded by about u sqrt(d) |a_t| |a_t'| (u: the unit roundoff of the accumulation dtype;
    blocked sums grow like sqrt(d), not d), so R is off by about

        E = u (sum |P| + (sqrt(d) + sqrt(p)) sum_t |a_t|^2 |g_t|^2),   sum_t |a_t|^2 |g_t|^2 = trace P.

    Where E > GRAM_TOLERANCE * R (R is a small difference of large terms: inputs sharing a large
    direction against gradients that cancel over the positions, as in attention keys), the row
    is recomputed by the centred ``gram_sqnorm``, which is about twice as slow (the centring
    copies both inputs).
    """
    acc = accum_dtype(a, g)
    a, g = a.to(acc), g.to(acc)
    prod = torch.bmm(a, a.transpose(1, 2))
    prod.mul_(torch.bmm(g, g.transpose(1, 2)))                                     # P, (N, T, T)
    total = prod.sum(dim=(1, 2))
    unit = torch.finfo(acc).eps / 2
    spread = torch.linalg.vector_norm(prod, ord=1, dim=(1, 2))                      # sum |P|
    diagonal = prod.diagonal(dim1=1, dim2=2).sum(dim=1)                              # trace P
    error = unit * (spread + (math.sqrt(a.shape[2]) + math.sqrt(g.shape[2])) * diagonal)
    doubtful = error > GRAM_TOLERANCE * total
    if bool(doubtful.any()):
        rows = doubtful.nonzero().flatten()
        total = total.index_copy(0, rows, gram_sqnorm(a.index_select(0, rows), g.index_select(0, rows)))
    return total.clamp_min(0)


def sqnorm_from_input_gram(gram_a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum_{t,t'} gram_a[t, t'] (g_t . g_t') per row, given the inputs' Gram matrices (however
    they were formed).  gram_a [N, T, T], g [N, T, p] -> [N], in gram_a's dtype."""
    g = g.to(gram_a.dtype)
    gram_g = torch.bmm(g, g.transpose(1, 2))    # (N, T, T)
    return (gram_a * gram_g).sum(dim=(1, 2))


def weight_sqnorm(a: torch.Tensor, g: torch.Tensor, form: str = "auto") -> torch.Tensor:
    """||sum_t g_t a_t^T||^2 per row by the cheaper exact form.  a [N, T, d], g [N, T, p] -> [N]

    With T == 1 the gradient is rank one and ||G||^2 = ||a||^2 ||g||^2.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    acc = accum_dtype(a, g)
    n, t, d = a.shape
    p = g.shape[2]
    if t == 1 and form == "auto":
        return a.to(acc).pow(2).sum(dim=(1, 2)) * g.to(acc).pow(2).sum(dim=(1, 2))
    if form == "gram" or (form == "auto" and prefer_gram(t, p, d)):
        return checked_gram_sqnorm(a, g)
    return linear_weight_grad_sqnorm(a, g).to(acc)
