"""What every adapter's BADGE strategies share: BADGE's seeding and the ways its picks are shown
to libraries built around one score per sample (EGL is ``expected_gradient_length`` itself).

    picks = badge_picks(module, loader, k, generator=badge_generator(seed, generator))
    picks.positions           # LongTensor [k]: badge(module, loader, k, generator=...), pick order
    picks.pick_order_scores() # [N]: k - i for the i-th pick, 0 elsewhere (a ranking whose top k are the picks)
    picks.embedding_norms()   # [k]: ||g(x)|| of each pick, BADGE's uncertainty term
    picks.draw_weights()      # [k, N]: the D^2 probabilities each pick was drawn from

BADGE's seeding (every adapter): ``generator``, a ``torch.Generator``, is used as it is and
advances from query to query (saving its state with ``get_state()`` is the caller's business);
without one, each query draws from a new CPU generator seeded with ``seed`` (default
``DEFAULT_SEED``, 0), so a query's picks depend only on the model, the pool and the seed, and
a run resumed from its labels picks as the uninterrupted run did.
"""
from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..badge import _sqdist_to, gradient_embedding_factors, kmeans_pp_gradient_embeddings, last_layer_features

DEFAULT_SEED = 0


def badge_generator(seed: int | None = DEFAULT_SEED, generator: torch.Generator | None = None) -> torch.Generator:
    """The generator one BADGE query draws from (module docstring): ``generator`` when given,
    else a new CPU generator seeded with ``seed``."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    if seed is None or isinstance(seed, bool):
        raise TypeError("BADGE draws its picks at random: give it seed= (an int; default 0) or generator= "
                        f"(a torch.Generator), got seed={seed!r}")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int, got {type(seed).__name__}") from None
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class BadgePicks:
    """BADGE's k picks from a pool of N, with what was picked from."""

    positions: torch.Tensor   # LongTensor [k], pool positions, pick order
    features: torch.Tensor    # [N, D], the input of the layer producing the logits
    probs: torch.Tensor       # [N, C], the softmax of the logits

    @property
    def pool_size(self) -> int:
        return int(self.features.shape[0])

    def pick_order_scores(self) -> np.ndarray:
        """k - i for the i-th pick, 0 for every other sample.  -> float [N]

        Highest first with ties by the lower position (every non-pick is 0), this ranks the k
        picks first, in pick order, then the rest of the pool in position order. The values
        say when a sample was picked, not how informative it is on its own.
        """
        k = self.positions.numel()
        scores = np.zeros(self.pool_size, dtype=np.float64)
        scores[self.positions.numpy()] = np.arange(k, 0, -1, dtype=np.float64)
        return scores

    def embedding_norms(self) -> np.ndarray:
        """||g(x)|| = ||p(x) - e_yhat|| ||h(x)|| of each pick, in pick order.  -> float [k]"""
        a, h = self._factors()
        at = self.positions
        return (a[at].norm(dim=1) * h[at].norm(dim=1)).double().numpy()

    def draw_weights(self) -> np.ndarray:
        """Row i: the probability each sample had of being pick i.  -> float [k, N]

        Row 0 is ||g(x)||^2 normalised (the first pick is its largest); row i >= 1 the squared
        distance to the nearest of picks 0..i-1, normalised over the samples not yet picked
        (D^2 sampling). The samples picked before row i are NaN; a row whose every remaining
        distance is 0 is 0 (the pick then is the lowest remaining position).
        """
        a, h = self._factors()
        sq_norm = a.pow(2).sum(dim=1) * h.pow(2).sum(dim=1)
        picked = self.positions.tolist()
        rows = np.full((len(picked), self.pool_size), np.nan)
        nearest = sq_norm
        for i, center in enumerate(picked):
            weights = nearest.double().numpy().copy()
            weights[picked[:i]] = np.nan
            total = np.nansum(weights)
            rows[i] = weights / total if total > 0 else np.where(np.isnan(weights), np.nan, 0.0)
            d = _sqdist_to(center, a, h, sq_norm)
            nearest = d if i == 0 else torch.minimum(nearest, d)
        return rows

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.promote_types(torch.promote_types(self.features.dtype, self.probs.dtype), torch.float32)
        return gradient_embedding_factors(self.features.to(dtype), self.probs.to(dtype))


def badge_picks(module: nn.Module, loader: Iterable, k: int, *, generator: torch.Generator,
                layer: nn.Module | None = None, **options) -> BadgePicks:
    """BADGE's ``k`` picks from the pool: what ``badge(module, loader, k, layer=layer,
    generator=generator, **options)`` returns, as ``positions``, with the features and
    probabilities it picked from. Quiet unless ``progress=True``."""
    options.setdefault("progress", False)
    features, probs = last_layer_features(module, loader, layer=layer, **options)
    return BadgePicks(kmeans_pp_gradient_embeddings(features, probs, k, generator), features, probs)


__all__ = ["DEFAULT_SEED", "BadgePicks", "badge_generator", "badge_picks"]
