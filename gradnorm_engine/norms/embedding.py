"""nn.Embedding and F.embedding: sample b's weight gradient has one row per distinct token v it contains,

    row_v = sum_{t : idx_t = v} g_t        (g_t = 0 where idx_t = padding_idx;
                                           g_t / count_b(v) with scale_grad_by_freq)

and ||grad||^2 = sum_v ||row_v||^2. Rows are gathered with one index_add over (sample, token)
keys, so the cost is O(B * T * dim) whatever the vocabulary size.
"""
from __future__ import annotations

import torch
from torch import nn

from .layout import regroup
from .ops import OpCall, register_op_rule
from .registry import accum_dtype, register_norm_rule, wants


@register_norm_rule(nn.Embedding)
def embedding_norms(layer: nn.Embedding, inputs: tuple, grad_outputs: tuple) -> dict:
    if not wants(layer.weight):
        return {}
    idx, g = inputs[0], grad_outputs[0]
    batch = idx.shape[0]
    idx = idx.reshape(batch, -1)                                   # (B, T)
    g = g.reshape(batch, idx.shape[1], layer.embedding_dim)        # (B, T, dim)
    return {layer.weight: lookup_sqnorm(idx, g, layer.num_embeddings, layer.padding_idx, layer.scale_grad_by_freq,
                                        accum_dtype(g, layer.weight))}


def _unpadded(g: torch.Tensor, idx: torch.Tensor, padding_idx: int | None, acc: torch.dtype) -> torch.Tensor:
    """g in ``acc``, with the rows looked up at ``padding_idx`` (which get no gradient) zeroed."""
    g = g.to(acc)
    return g if padding_idx is None else g * (idx != padding_idx).unsqueeze(-1).to(acc)


def lookup_sqnorm(idx: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx: int | None,
                  scale_grad_by_freq: bool, acc: torch.dtype) -> torch.Tensor:
    """sum_v ||row_v||^2 per sample.  idx [B, T] token ids, g [B, T, dim] -> [B]"""
    batch, _, dim = g.shape
    g = _unpadded(g, idx, padding_idx, acc)
    # One key per (sample, token id): rows of different samples never mix.
    keys = (torch.arange(batch, device=idx.device).unsqueeze(1) * num_embeddings + idx).flatten()
    uniq, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    g = g.reshape(-1, dim)                                         # (B*T, dim)
    if scale_grad_by_freq:
        g = g / counts[inverse].unsqueeze(1).to(acc)
    rows = torch.zeros(uniq.numel(), dim, dtype=acc, device=g.device)
    rows.index_add_(0, inverse, g)                                 # (distinct keys, dim)
    sq = torch.zeros(batch, dtype=acc, device=g.device)
    sq.index_add_(0, uniq // num_embeddings, rows.pow(2).sum(dim=1))
    return sq


def lookup_grads(idx: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx: int | None,
                 scale_grad_by_freq: bool, acc: torch.dtype) -> torch.Tensor:
    """Each sample's weight gradient [B, num_embeddings, dim] (for a table used more than once)."""
    batch, tokens, dim = g.shape
    g = _unpadded(g, idx, padding_idx, acc)
    if scale_grad_by_freq:
        counts = torch.zeros(batch, num_embeddings, dtype=acc, device=g.device)
        counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=acc))
        g = g / counts.gather(1, idx).unsqueeze(-1)
    grads = torch.zeros(batch, num_embeddings, dim, dtype=acc, device=g.device)
    return grads.scatter_add_(1, idx.unsqueeze(-1).expand(batch, tokens, dim), g)


# --------------------------------------------------------------------------- op rule

def _embedding_check(call: OpCall) -> str | None:
    if call.lay(0) is None or call.lay(1) is not None:
        return "the ids are not batched, or the table is"
    if call.arg(3) is not None:
        return "max_norm renormalises the table in place"
    return None


@register_op_rule("embedding", signature=("input", "weight", "padding_idx", "max_norm", "norm_type",
                                          "scale_grad_by_freq", "sparse"), check=_embedding_check,
                  form=lambda c, slot: "rows per distinct id")
def embedding_op(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    """F.embedding(ids, W): ids regrouped per sample wherever they sit."""
    if 1 not in call.pins:
        return {}
    weight = call.args[1]
    batch = call.batch
    padding_idx = call.arg(2)
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    idx = regroup(call.args[0], call.lay(0), batch).reshape(batch, -1)
    g = regroup(grad, call.out_lay, batch).reshape(batch, -1, weight.shape[1])
    scale = bool(call.arg(5, False))
    acc = accum_dtype(g, weight)
    if wants_norm(1):
        return {1: lookup_sqnorm(idx, g, weight.shape[0], padding_idx, scale, acc)}
    return {1: lookup_grads(idx, g, weight.shape[0], padding_idx, scale, acc)}


def _bag_check(call: OpCall) -> str | None:
    ids = call.arg(0)
    if call.lay(0) != (0, 1) or ids.dim() != 2 or call.arg(2) is not None:
        return "1-D ids with offsets (the samples are in the offsets, not a dim)"
    if call.lay(1) is not None or call.arg(8) is not None:
        return "per_sample_weights, or a batched table"
    if call.arg(6, "mean") not in ("sum", "mean") or call.arg(3) is not None:
        return "mode='max', or max_norm (renormalises the table in place)"
    return None


@register_op_rule("embedding_bag", signature=("input", "weight", "offsets", "max_norm", "norm_type",
                                              "scale_grad_by_freq", "mode", "sparse", "per_sample_weights",
                                              "include_last_offset", "padding_idx"), check=_bag_check,
                  form=lambda c, slot: "rows per distinct id")
def embedding_bag_op(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    """F.embedding_bag(ids [B, L], W) with mode sum or mean: bag b is sample b; every id of it
    receives the bag's gradient (divided by the number of ids that are not padding, for mean)."""
    if 1 not in call.pins:
        return {}
    ids, weight = call.args[0], call.args[1]
    padding_idx = call.arg(10)
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    acc = accum_dtype(grad, weight)
    g = grad.to(acc).unsqueeze(1).expand(ids.shape[0], ids.shape[1], weight.shape[1])      # (B, L, dim)
    if call.arg(6, "mean") == "mean":
        kept = (ids != padding_idx).sum(dim=1) if padding_idx is not None else torch.full_like(ids[:, 0], ids.shape[1])
        g = g / kept.clamp_min(1).to(acc).view(-1, 1, 1)
    scale = bool(call.arg(5, False))
    if wants_norm(1):
        return {1: lookup_sqnorm(ids, g, weight.shape[0], padding_idx, scale, acc)}
    return {1: lookup_grads(ids, g.contiguous(), weight.shape[0], padding_idx, scale, acc)}
