"""score_pool and rank_unlabeled sharded: every rank scores one contiguous block of the pool.

    scores = score_pool_sharded(model, loader, options)         # -> [N] on every rank, pool order
    res = rank_unlabeled_sharded(model, loader, k, options)     # -> the same RankResult on every rank

Each rank checks the call (options, k, loader) exactly as one process would, then the ranks agree
(exchange.agree_before_scoring), each scores its block with the single-process stream, and the
scores or per-rank top-k lists are exchanged.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..loaders import as_pool, check_pool_loader, items_are_batches
from ..options import ScoringOptions
from ..ranking import RankResult, check_k, check_k_fits
from ..scoring import ChunkResult, score_stream, warn_if_every_score_is_zero
from .exchange import (DistributedScoringError, RankStatus, ScoredBlock, agree_before_scoring, control_group,
                       exchange_status, gather_scores, gather_top_k, picklable)
from .fingerprint import content_digest
from .sharding import check_shardable, collates_per_batch, loader_order, order_digest, shard_loader


def score_pool_sharded(model: nn.Module, loader: Iterable, options: dict, per_chunk: ChunkResult | None = None,
                       what: str = "scores") -> torch.Tensor:
    """score_pool's sharded path: every rank returns all N scores, in pool order.  -> [N]

    ``per_chunk`` and ``what``: another result per sample than the score (per_parameter_sqnorms
    gathers [N, G]); ``what`` names it in the ranks' agreement.
    """
    block, _ = _score_own_block(model, loader, options, per_chunk=per_chunk, what=what)
    scores = gather_scores(block)
    warn_if_every_score_is_zero(scores)
    return scores


def rank_unlabeled_sharded(model: nn.Module, loader: Iterable, k, options: dict) -> RankResult:
    """rank_unlabeled's sharded path: merge per-rank top-k lists; every rank returns the same
    RankResult. Only at most k scores and k positions per rank travel."""
    block, checked = _score_own_block(model, loader, options, k=k)
    k = check_k(k)   # passed on every rank in the agreement before scoring: cannot fail here
    check_k_fits(k, block.pool_size)
    scores, positions = gather_top_k(block, k)
    warn_if_every_score_is_zero(scores)
    return RankResult(indices=positions, scores=scores, pool_size=block.pool_size, backend=block.backend,
                      norm=checked.norm)


def _score_own_block(model: nn.Module, loader: Iterable, options: dict, k=None, per_chunk: ChunkResult | None = None,
                     what: str = "scores") -> tuple[ScoredBlock, ScoringOptions]:
    """Score this rank's block, then exchange statuses; raise on every rank if any rank failed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    group = control_group()
    # Checks of the arguments, then one exchange: every rank learns whether all ranks passed and
    # call with the same pool and options before anything else is exchanged. A rank that failed
    # alone would otherwise leave the others waiting, or pair their next exchange with its next call.
    refused: Exception | None = None
    agreement = ""
    try:
        if k is not None:
            k = check_k(k)
        checked = ScoringOptions.from_kwargs(options)
        job = checked.make_job(model)
        loader = as_pool(loader)   # a Dataset: the same DataLoader on every rank
        check_pool_loader(loader)  # on the user's loader: the block loader hides shuffle/drop_last
        check_shardable(loader)
        order = loader_order(loader)
        align = 1 if items_are_batches(loader) else int(checked.chunk_size or 1)
        # a collate that pads per batch: every rank reads whole batches, padded as on one process
        block, start, stop = shard_loader(loader, rank, world, order, align=align,
                                          whole_batches=collates_per_batch(loader))
        shared = {"result": what, "k": k, **checked.digest()}
        agreement = (f"{order_digest(loader, order)}, {content_digest(loader.dataset)}; "
                     + ", ".join(f"{n}={v}" for n, v in shared.items()))
    except Exception as err:  # noqa: BLE001 - raised below, after every rank has heard of it
        refused = err
    agree_before_scoring(agreement, refused, group)

    scores = torch.empty(0)
    status = RankStatus(ok=True)
    error: BaseException | None = None
    if stop > start:
        try:
            scores, backend = score_stream(job, block, checked, progress=checked.progress and rank == 0,
                                           per_chunk=per_chunk)
            status = RankStatus(ok=True, count=scores.shape[0], backend=backend, dtype=str(scores.dtype),
                                row_shape=tuple(scores.shape[1:]))
        except Exception as err:  # reported to every rank below, then re-raised here
            error = err
            block_words = (f"items {start}..{stop - 1} of the loader (each a batch); positions in this message "
                           f"count samples from the first of those items" if items_are_batches(loader) else
                           f"pool positions {start}..{stop - 1}; positions in this message count from {start}")
            status = RankStatus(ok=False, message=f"{type(err).__name__}: {err} (rank {rank} scores {block_words})",
                                error=picklable(err))

    try:
        statuses = exchange_status(status, group)
    except DistributedScoringError as failed:
        raise failed from error  # on the failing rank, keep the original traceback
    done = [s for s in statuses if s.count]
    if not done:
        raise ValueError("the pool is empty: the loader yielded no samples")
    dtype = getattr(torch, done[0].dtype.removeprefix("torch."))
    return ScoredBlock(scores=scores, statuses=statuses, group=group, dtype=dtype, backend=done[0].backend,
                       row_shape=done[0].row_shape), checked
