"""Small models of several inputs, token pools of different lengths, and their padding collate:
shared by the multi-input tests (module level, so spawned ranks can import them)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

VOCAB = 30
PAD = 0


class MaskedBag(nn.Module):
    """forward(input_ids, attention_mask) -> logits [B, 4]: an embedding averaged over the
    unmasked tokens, a LayerNorm, a linear head. Padding changes nothing (it is multiplied by 0)."""

    def __init__(self, dim: int = 8, classes: int = 4):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels=None) -> torch.Tensor:
        if labels is not None:
            raise AssertionError("labels were passed to the model")
        m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        h = (self.emb(input_ids) * m).sum(dim=1) / m.sum(dim=1)
        return self.head(torch.tanh(self.norm(h)))


class TokenPool(Dataset):
    """``n`` samples {"input_ids": [L_i], "attention_mask": [L_i], "labels": []} of lengths 2..9."""

    def __init__(self, n: int = 13, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(2, 10, (n,), generator=g).tolist()
        self.ids = [torch.randint(1, VOCAB, (length,), generator=g) for length in self.lengths]
        self.labels = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


def pad_collate(items: list[dict], to: int | None = None) -> dict:
    """Right-pad a batch to its longest sample (or to ``to`` tokens), as a tokenizer's collate does."""
    width = to or max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n], mask[row, :n] = it["input_ids"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([it["labels"] for it in items])}


class PaddedMean(nn.Module):
    """forward(input_ids, attention_mask) -> logits [B, 4], averaging over every position, the
    padding included: a sample's score depends on how far its batch padded it."""

    def __init__(self, dim: int = 8, classes: int = 4):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(input_ids).mean(dim=1)))


def bucketed_batches(pool: TokenPool, sizes: tuple[int, ...] = (4, 2, 5)) -> list[list[int]]:
    """A length-bucketing batch sampler's batches: the indices sorted by length, cut into batches
    of the ``sizes`` in turn."""
    order = sorted(range(len(pool)), key=lambda i: (pool.lengths[i], i))
    batches, start = [], 0
    while start < len(order):
        size = sizes[len(batches) % len(sizes)]
        batches.append(order[start:start + size])
        start += size
    return batches
