"""Coreset (Sener & Savarese, ICLR 2018): k-center greedy on penultimate-layer embeddings.

With e(x) the embedding (``model.embed``), d(x) = min over centers c of ||e(x) - e(c)||_2,
the centers starting as the labeled set L. Repeat ``budget`` times: pick the subset member with
the largest d, make it a center, update d <- min(d, ||e(x) - e(new)||). The distances to L are
computed in blocks of labeled samples and each update is one [|S|] vector op on the device, so
memory stays O(|S| * block), never |S| x |L| or |S| x |S| at once.
"""
from __future__ import annotations

import torch

from .base import QueryContext, Strategy, register_strategy

# Labeled embeddings compared against the whole subset per step; bounds the [|S|, block] matrix.
BLOCK = 1024


def min_distances(points: torch.Tensor, centers: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """min over centers of the Euclidean distance, for each point.  [n, D], [m, D] -> [n]"""
    best = torch.full((points.shape[0],), float("inf"), device=points.device, dtype=points.dtype)
    for part in centers.split(block):
        best = torch.minimum(best, torch.cdist(points, part).min(dim=1).values)
    return best


def k_center_greedy(points: torch.Tensor, centers: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-center: the k rows of ``points`` [n, D] picked one by one, farthest first from
    ``centers`` [m, D] and the rows already picked.  -> LongTensor [k] (row positions)"""
    dist = min_distances(points, centers) if centers.shape[0] else torch.full(
        (points.shape[0],), float("inf"), device=points.device, dtype=points.dtype)
    picked = torch.empty(k, dtype=torch.int64, device=points.device)
    for step in range(k):
        # torch.argmax returns the first maximum, so ties go to the lower position.
        j = torch.argmax(dist)
        picked[step] = j
        new = torch.linalg.vector_norm(points - points[j], dim=1)
        dist = torch.minimum(dist, new)
        dist[j] = -1.0  # never pick the same point twice (distances are >= 0)
    return picked.cpu()


@register_strategy
class Coreset(Strategy):
    name = "coreset"
    uses_lossnet = False

    def select(self, context: QueryContext, budget: int) -> torch.Tensor:
        points = context.embeddings(context.subset)
        centers = context.embeddings(context.labeled)
        if not (bool(torch.isfinite(points).all()) and bool(torch.isfinite(centers).all())):
            # NaN distances would defeat the greedy's own bookkeeping and pick a sample twice
            raise ValueError("coreset: the model's embeddings hold NaN or Inf, so distances between samples "
                             "are undefined; the model has probably diverged (lower the learning rate)")
        return context.subset[k_center_greedy(points, centers, budget)]
