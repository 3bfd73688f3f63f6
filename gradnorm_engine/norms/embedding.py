"""nn.Embedding: sample b's weight gradient has one row per distinct token v it contains,

    row_v = sum_{t : idx_t = v} g_t        (g_t = 0 where idx_t = padding_idx;
                                           g_t / count_b(v) with scale_grad_by_freq)

and ||grad||^2 = sum_v ||row_v||^2. Rows are gathered with one index_add over (sample, token)
keys, so the cost is O(B * T * dim) whatever the vocabulary size.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import accum_dtype, register_norm_rule, wants


@register_norm_rule(nn.Embedding)
def embedding_norms(layer: nn.Embedding, inputs: tuple, grad_outputs: tuple) -> dict:
    if not wants(layer.weight):
        return {}
    idx, g = inputs[0], grad_outputs[0]
    batch = idx.shape[0]
    acc = accum_dtype(g, layer.weight)
    idx = idx.reshape(batch, -1)                                   # (B, T)
    g = g.reshape(batch, idx.shape[1], layer.embedding_dim).to(acc)  # (B, T, dim)
    if layer.padding_idx is not None:
        g = g * (idx != layer.padding_idx).unsqueeze(-1).to(acc)
    # One key per (sample, token id): rows of different samples never mix.
    keys = (torch.arange(batch, device=idx.device).unsqueeze(1) * layer.num_embeddings + idx).flatten()
    uniq, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    g = g.reshape(-1, layer.embedding_dim)                         # (B*T, dim)
    if layer.scale_grad_by_freq:
        g = g / counts[inverse].unsqueeze(1).to(acc)
    rows = torch.zeros(uniq.numel(), layer.embedding_dim, dtype=acc, device=g.device)
    rows.index_add_(0, inverse, g)                                 # (distinct keys, dim)
    sq = torch.zeros(batch, dtype=acc, device=g.device)
    sq.index_add_(0, uniq // layer.num_embeddings, rows.pow(2).sum(dim=1))
    return {layer.weight: sq}
