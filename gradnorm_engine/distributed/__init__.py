"""Sharded scoring under torch.distributed: every rank scores one contiguous block of the pool.

    # launched with torchrun, after torch.distributed.init_process_group():
    scores = score_pool(model, loader)             # -> [N] on every rank, pool order
    res = rank_unlabeled(model, loader, k=1000)    # -> the same RankResult on every rank

Pool order is loader order: position p is the p-th index the loader's sampler yields. With
pool size N and world size W, rank r reads positions [start_r, stop_r), where
start_r = r * (N // W) + min(r, N % W): blocks differ in size by at most one, the first
N % W ranks take the extra position, no position is read twice or skipped. A block of
positions keeps pool order trivially: concatenating the blocks in rank order is the pool.

What travels between ranks, through one small gloo group the engine creates for itself (CPU
tensors, so the same code runs under NCCL and needs no CUDA device pinned per rank):
1. a status per rank (ok or the error message, how many samples it scored), always first,
   so a rank that raised makes every rank raise instead of leaving the others waiting;
2. then either each rank's scores, zero-padded to the longest block (score_pool: N values in
   all), or each rank's own top-k scores and pool positions (rank_unlabeled: at most k values
   and k positions per rank, whatever N is).

The global top-k lies inside the union of the per-rank top-k lists (a sample beaten by k
samples of its own block is beaten by k samples of the pool), so merging those lists with the
single-process rule (highest score first, ties by lower pool position) gives the
single-process answer.

A rank that hangs or dies: the exchange waits at most ``GRADNORM_DISTRIBUTED_TIMEOUT``
seconds (default 1800, torch's own default) after a rank has finished its block, then raises.
"""
from __future__ import annotations

from .exchange import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, DistributedScoringError, exchange_timeout
from .processes import broadcast_module, init_from_torchrun, is_main_process, on_main_process, use_sharding
from .scoring import rank_unlabeled_sharded, score_pool_sharded
from .sharding import check_shardable, loader_order, order_digest, shard_bounds, shard_loader

__all__ = [
    "DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "DistributedScoringError", "broadcast_module", "check_shardable",
    "exchange_timeout", "init_from_torchrun", "is_main_process", "loader_order", "on_main_process",
    "order_digest", "rank_unlabeled_sharded", "score_pool_sharded", "shard_bounds", "shard_loader",
    "use_sharding",
]
