"""The public surface: ``score_pool`` and ``rank_unlabeled``, on one process or sharded.

    scores = score_pool(model, loader)            # -> [N], pool order
    res = rank_unlabeled(model, loader, k=1000)   # -> RankResult(indices [k], scores [k])

Thin on purpose: the options are checked by ``ScoringOptions``, the single-process stream is
``scoring``, the sharded path is ``distributed``; this module only chooses between the two.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Callable

import torch
from torch import nn

from .distributed import rank_unlabeled_sharded, score_pool_sharded, use_sharding
from .options import ScoringOptions
from .ranking import RankResult, best_positions, check_k, check_k_fits, top_k
from .scores import ScoreFn
from .scoring import ChunkResult, score_here

__all__ = ["RankResult", "rank_unlabeled", "score_pool", "top_k"]


def score_pool(
    model: nn.Module,
    loader: Iterable,
    *,
    score: str | ScoreFn = "entropy",
    norm: str = "frobenius",
    backend: str = "auto",
    params: Iterable | None = None,
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    input_key: str | None = None,
    input_keys: Sequence[str] | None = None,
    exclude_keys: Sequence[str] = (),
    num_inputs: int = 1,
    label_key: str | int | None = None,
    device: str | torch.device | None = None,
    autocast: str | None = None,
    max_memory: int | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    distributed: bool | None = None,
) -> torch.Tensor:
    """Every sample's gradient-norm score, in pool (loader) order.  -> [N]

    score(x) = || d loss(f(x)) / d theta ||, loss = ``score`` ("entropy": softmax entropy in
    nats; "categorical_entropy": the same with the reference code's probability clamp;
    "pseudo_label_ce"; "cross_entropy" against each sample's label from the loader, read at
    ``label_key``; or a callable logits [B, C] -> [B], or (logits, targets) -> [B]), theta = ``params`` (default: all
    parameters with requires_grad). ``norm="frobenius"`` is sqrt of the sum of all squares,
    ``norm="tensor_sum"`` the sum over parameter tensors of each tensor's L2 norm.

    ``loader``: a DataLoader, any iterable of batches, or a torch Dataset (read in order, in
    batches of 64). Batches: a tensor, a tuple whose first ``num_inputs`` elements are the model's
    positional inputs, or a mapping whose entries the model's forward takes by name are passed as keyword
    arguments (``input_keys`` names them, ``exclude_keys`` leaves some out; labels never pass);
    see gradnorm_engine.inputs.

    The model runs in eval mode; its train/eval flags are restored afterwards and no
    parameter, ``.grad`` or BatchNorm statistic changes (buffers the model's own forward
    updates in eval mode change as in any forward).

    Under torch.distributed (an initialised default process group with more than one rank)
    each rank scores one contiguous block of the pool and every rank returns all N scores;
    ``distributed=False`` scores the whole pool on this process (see docs/distributed.md).
    """
    options = dict(score=score, norm=norm, backend=backend, params=params, logits_fn=logits_fn,
                   input_key=input_key, input_keys=input_keys, exclude_keys=exclude_keys, num_inputs=num_inputs,
                   label_key=label_key, device=device, autocast=autocast, max_memory=max_memory,
                   chunk_size=chunk_size, progress=progress)
    return score_each_sample(model, loader, options, distributed)


def score_each_sample(model: nn.Module, loader: Iterable, options: dict, distributed: bool | None,
                      per_chunk: ChunkResult | None = None, what: str = "scores") -> torch.Tensor:
    """Every sample's result in pool order, [N] (or ``per_chunk``'s [N, ...]): sharded under
    torch.distributed, else on this process. score_pool, per_parameter_sqnorms and
    expected_gradient_length all choose here; ``what`` names the result in the ranks' agreement."""
    if use_sharding(distributed):   # checks the options on every rank at once
        return score_pool_sharded(model, loader, options, per_chunk=per_chunk, what=what)
    return score_here(model, loader, ScoringOptions.from_kwargs(options), per_chunk=per_chunk)[0]


def rank_unlabeled(model: nn.Module, loader: Iterable, k: int, *, distributed: bool | None = None,
                   **options) -> RankResult:
    """The ``k`` samples with the largest scores, highest first.  -> RankResult

    Takes every keyword option of ``score_pool``. Ties are broken by the lower pool position.
    Under torch.distributed each rank ranks its own block and the per-rank top-k lists are
    merged, so every rank returns the same, single-process answer.
    """
    if use_sharding(distributed):   # checks k and the options on every rank at once
        return rank_unlabeled_sharded(model, loader, k, options)
    k = check_k(k)
    checked = ScoringOptions.from_kwargs(options)
    scores, backend_name = score_here(model, loader, checked)
    check_k_fits(k, scores.numel())
    order = best_positions(scores, k)
    return RankResult(indices=order, scores=scores[order], pool_size=scores.numel(), backend=backend_name,
                      norm=checked.norm)
