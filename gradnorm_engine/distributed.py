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

import hashlib
import inspect
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

from .backends import check_backend_name
from .job import make_job
from .loaders import check_pool_loader, items_are_batches
from .ranking import best_positions
from .reduction import check_norm

T = TypeVar("T")
TIMEOUT_ENV = "GRADNORM_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class DistributedScoringError(RuntimeError):
    """A rank failed (or stopped answering) during sharded scoring; raised on every rank.

    ``failures`` maps each failed rank to its message, e.g. ``{1: "ValueError: ..."}``.
    """

    def __init__(self, message: str, failures: dict[int, str] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})


def use_sharding(distributed: bool | None) -> bool:
    """Whether a call shards the pool.

    ``None``: shard when a default process group is initialised with more than one rank.
    ``False``: never (each process scores the whole pool). ``True``: shard, and insist that a
    group is initialised.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
    if distributed is False:
        return False
    ready = dist.is_available() and dist.is_initialized()
    if distributed is True and not ready:
        raise RuntimeError("distributed=True, but torch.distributed has no initialised default process group; "
                           "launch with torchrun and call torch.distributed.init_process_group() first, "
                           "or leave distributed=None to score on this process alone")
    return ready and (distributed is True or dist.get_world_size() > 1)


def is_main_process() -> bool:
    """True on rank 0, and in a process without an initialised group: the one that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Overwrite every rank's parameters and buffers with rank ``src``'s, in place.

    For loops that train a replica of the model on every rank and then score under torchrun:
    GPU training is not bit-reproducible across processes, and ranks whose weights drifted
    apart would score their blocks with different models. A no-op without a group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            # CPU tensors go through the engine's gloo group: an NCCL default group refuses them.
            group = _control_group() if tensor.device.type == "cpu" else None
            _collective(lambda: dist.broadcast(tensor.data, src, group=group), "broadcasting the model")


def on_main_process(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 alone and return its result on every rank; if it raised, every rank
    raises that exception. For file work of loops that run on every rank (reading a checkpoint,
    checking an output folder): one process touches the files and no rank is left waiting on a
    peer that failed. Just ``fn()`` without a group. The result travels pickled, via gloo.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list = [None]
    own_error = None
    if dist.get_rank() == 0:
        try:
            value = fn()
            # Pickled once, here: what cannot travel fails before the broadcast, not inside it.
            box[0] = ("ok", pickle.dumps(value))
        except Exception as err:  # noqa: BLE001 - handed to every rank below
            own_error, box[0] = err, ("raised", _picklable(err))
    _collective(lambda: dist.broadcast_object_list(box, src=0, group=_control_group()),
                "sharing rank 0's file work")
    if own_error is not None:
        raise own_error
    status, payload = box[0]
    if status == "raised":
        raise payload
    return value if dist.get_rank() == 0 else pickle.loads(payload)


def _picklable(err: Exception) -> Exception:
    """``err`` itself if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError(f"rank 0: {type(err).__name__}: {err}")


# --- which positions a rank reads ------------------------------------------------------------

def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block [start, stop) of a pool of ``n`` positions."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in 0..{world_size - 1}, got {rank}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def loader_order(loader: DataLoader) -> Sequence[int]:
    """The dataset indices a DataLoader reads, in the order it reads them (the pool order).

    With automatic batching these are sample indices; with ``batch_size=None`` they are the
    indices of dataset items, each of which is already a batch.
    """
    sampler = loader.sampler
    if loader.batch_sampler is not None and not _is_plain_batch_sampler(loader):
        # A custom batch sampler decides the order itself: flatten it.
        return [i for batch in loader.batch_sampler for i in batch]
    if type(sampler) is SequentialSampler:
        return range(len(sampler))  # no list of N ints for the usual case
    return list(sampler)


def check_shardable(loader: Iterable) -> None:
    """Raise TypeError unless ``loader`` is a DataLoader over a map-style dataset."""
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"sharded scoring needs a torch.utils.data.DataLoader over a map-style dataset, got a "
            f"{type(loader).__name__}; wrap the pool in a DataLoader, or pass distributed=False to "
            "score the whole pool on every process")
    if isinstance(loader.dataset, IterableDataset):
        raise TypeError(
            f"the loader reads an IterableDataset ({type(loader.dataset).__name__}), which cannot be split "
            "by position across ranks; use a map-style dataset (with __getitem__ and __len__), or pass "
            "distributed=False to score the whole pool on every process")


def shard_loader(loader: Iterable, rank: int, world_size: int, order: Sequence[int] | None = None,
                 align: int = 1) -> tuple[DataLoader, int, int]:
    """A DataLoader over rank ``rank``'s block of ``loader``'s pool, and the block [start, stop).

    ``order``: ``loader_order(loader)`` when the caller has it already. ``align``: blocks start at
    multiples of it (the chunk size, so that every rank's chunks are a single process's chunks).

    The new loader reads the same dataset with the same batch size (a custom batch sampler
    becomes plain batches of its largest batch size: scores do not depend on batch size),
    workers, collate_fn, pin_memory and worker settings; only the sampler changes.
    """
    check_shardable(loader)
    order = loader_order(loader) if order is None else order
    align = max(1, int(align))
    first, last = shard_bounds(-(-len(order) // align), rank, world_size)   # in units of align
    start, stop = min(first * align, len(order)), min(last * align, len(order))
    positions = order[start:stop]
    if loader.batch_sampler is None:  # batch_size=None: every dataset item is a batch
        batching = dict(batch_size=None, sampler=positions)
    elif _is_plain_batch_sampler(loader):
        batching = dict(batch_size=loader.batch_size, sampler=positions)
    else:
        size = max((len(b) for b in loader.batch_sampler), default=1)
        batching = dict(batch_sampler=BatchSampler(positions, batch_size=max(1, size), drop_last=False))
    workers = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                   timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                   multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                   pin_memory_device=getattr(loader, "pin_memory_device", ""))
    if loader.num_workers > 0:  # these two are refused by DataLoader without workers
        workers.update(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
    if hasattr(loader, "in_order"):
        workers["in_order"] = loader.in_order
    return DataLoader(loader.dataset, **batching, **workers), start, stop


def order_digest(loader: DataLoader, order: Sequence[int]) -> str:
    """A short fingerprint of the pool order (and the dataset's length), to compare across ranks."""
    if isinstance(order, range):
        key = f"range({order.start}, {order.stop}, {order.step})"
    else:
        try:
            raw = torch.tensor([int(i) for i in order], dtype=torch.int64).numpy().tobytes()
        except (TypeError, ValueError):  # indices that are not integers (e.g. keys of a mapping)
            raw = repr(list(order)).encode()
        key = hashlib.blake2b(raw, digest_size=16).hexdigest()
    try:
        size = str(len(loader.dataset))
    except TypeError:  # a map-style dataset without __len__, read through a custom sampler
        size = "unknown size"
    return f"dataset of {size}, {len(order)} positions, order {key}"


def _is_plain_batch_sampler(loader: DataLoader) -> bool:
    """True when the DataLoader built its own BatchSampler from batch_size (no custom one)."""
    return loader.batch_size is not None


# --- merging -----------------------------------------------------------------------------

def merge_top_k(scores: Sequence[torch.Tensor], positions: Sequence[torch.Tensor], k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of several candidate lists: highest score first, ties by lower position.

    scores[r], positions[r]: [k_r] candidates of rank r (pool positions are distinct).
    -> (scores [min(k, sum k_r)], positions [same]), the same order ``top_k`` gives.
    """
    s = torch.cat(list(scores))
    p = torch.cat(list(positions))
    by_position = torch.argsort(p)
    s, p = s[by_position], p[by_position]
    best = best_positions(s, k)
    return s[best], p[best]


# --- the sharded calls -------------------------------------------------------------------

def score_pool_sharded(model: nn.Module, loader: Iterable, **options) -> tuple[torch.Tensor, str]:
    """score_pool's sharded path: every rank returns all N scores, in pool order.  -> ([N], backend)"""
    block = _score_own_block(model, loader, options)
    return gather_scores(block), block.backend


def rank_unlabeled_sharded(model: nn.Module, loader: Iterable, k: int, **options):
    """rank_unlabeled's sharded path: merge per-rank top-k lists; every rank returns the same
    RankResult. Only at most k scores and k positions per rank travel."""
    from . import api  # api imports this module; import back lazily

    block = _score_own_block(model, loader, options, k=k)
    k = api._check_k(k)   # passed on every rank in the agreement before scoring: cannot fail here
    if k > block.pool_size:
        raise ValueError(f"k = {k} is larger than the pool ({block.pool_size} samples); "
                         f"ask for at most {block.pool_size}")
    scores, positions = gather_top_k(block, k)
    return api.RankResult(indices=positions, scores=scores, pool_size=block.pool_size, backend=block.backend,
                          norm=options.get("norm", "frobenius"))


@dataclass
class RankStatus:
    """What each rank tells the others after scoring its block."""

    ok: bool
    count: int = 0          # samples scored
    backend: str = ""       # the backend that ran ("" for an empty block)
    dtype: str = ""         # score dtype, e.g. "torch.float32" ("" for an empty block)
    message: str = ""       # the error, when not ok


@dataclass
class ScoredBlock:
    """This rank's scores and every rank's status, after a successful exchange."""

    scores: torch.Tensor         # [count] this rank's scores, in pool order
    statuses: list[RankStatus]   # one per rank, rank order
    group: object                # the gloo group for the exchanges
    dtype: torch.dtype           # the score dtype all ranks agree on
    backend: str

    @property
    def pool_size(self) -> int:
        return sum(s.count for s in self.statuses)

    @property
    def offset(self) -> int:
        """Pool position of this rank's first sample."""
        return sum(s.count for s in self.statuses[: dist.get_rank()])


def gather_scores(block: ScoredBlock) -> torch.Tensor:
    """Every rank's scores, concatenated in rank order = pool order.  -> [N] on every rank

    all_gather needs equal shapes, so each block is zero-padded to the longest and cut back.
    """
    width = max(s.count for s in block.statuses)
    mine = torch.zeros(width, dtype=block.dtype)
    mine[: block.scores.numel()] = block.scores.to(block.dtype)
    gathered = [torch.empty(width, dtype=block.dtype) for _ in block.statuses]
    _collective(lambda: dist.all_gather(gathered, mine, group=block.group), "gathering the scores")
    return torch.cat([g[: s.count] for g, s in zip(gathered, block.statuses)])


def gather_top_k(block: ScoredBlock, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's top k from every rank's own top min(k, count).  -> (scores [k], positions [k])"""
    own = block.scores.to(block.dtype)
    best = best_positions(own, k)
    width = min(k, max(s.count for s in block.statuses))
    top_scores = torch.zeros(width, dtype=block.dtype)
    top_positions = torch.zeros(width, dtype=torch.int64)
    top_scores[: best.numel()] = own[best]
    top_positions[: best.numel()] = best + block.offset
    all_scores = [torch.empty(width, dtype=block.dtype) for _ in block.statuses]
    all_positions = [torch.empty(width, dtype=torch.int64) for _ in block.statuses]

    def gather():
        dist.all_gather(all_scores, top_scores, group=block.group)
        dist.all_gather(all_positions, top_positions, group=block.group)

    _collective(gather, "gathering the per-rank top-k")
    counts = [min(k, s.count) for s in block.statuses]
    return merge_top_k([t[:c] for t, c in zip(all_scores, counts)],
                       [t[:c] for t, c in zip(all_positions, counts)], k)


def exchange_status(status: RankStatus, group) -> list[RankStatus]:
    """Every rank's status, in rank order; raises on every rank if any rank failed."""
    statuses: list = [None] * dist.get_world_size()
    _collective(lambda: dist.all_gather_object(statuses, status, group=group), "exchanging scoring status")
    failures = {r: s.message for r, s in enumerate(statuses) if not s.ok}
    if failures:
        listed = "; ".join(f"rank {r}: {m}" for r, m in failures.items())
        raise DistributedScoringError(
            f"sharded scoring failed on {len(failures)} of {len(statuses)} ranks: {listed}", failures)
    return statuses


def _score_own_block(model: nn.Module, loader: Iterable, options: dict, k=None) -> ScoredBlock:
    """Score this rank's block, then exchange statuses; raise on every rank if any rank failed."""
    from . import api  # api imports this module; import back lazily

    rank, world = dist.get_rank(), dist.get_world_size()
    group = _control_group()
    # Checks of the arguments, then one exchange: every rank learns whether all ranks passed and
    # call with the same pool and options before anything else is exchanged. A rank that failed
    # alone would otherwise leave the others waiting, or pair their next exchange with its next call.
    refused: Exception | None = None
    agreement = ""
    try:
        options = dict(options)
        if options.get("params") is not None:
            options["params"] = list(options["params"])  # read twice below: a generator would be spent
        if k is not None:
            k = api._check_k(k)
        _check_options(model, options, api)
        check_pool_loader(loader)  # on the user's loader: the block loader hides shuffle/drop_last
        check_shardable(loader)
        order = loader_order(loader)
        align = 1 if items_are_batches(loader) else int(options.get("chunk_size") or 1)
        block, start, stop = shard_loader(loader, rank, world, order, align=align)
        agreement = f"{order_digest(loader, order)}; {_call_digest(options, k)}"
    except Exception as err:  # noqa: BLE001 - raised below, after every rank has heard of it
        refused = err
    _agree_before_scoring(agreement, refused, group)

    scores = torch.empty(0)
    status = RankStatus(ok=True)
    error: BaseException | None = None
    if stop > start:
        local = dict(options, progress=options.get("progress", True) and rank == 0)
        try:
            scores, backend = api._score(model, block, **local, distributed=False)
            status = RankStatus(ok=True, count=scores.numel(), backend=backend, dtype=str(scores.dtype))
        except Exception as err:  # reported to every rank below, then re-raised here
            error = err
            block_words = (f"items {start}..{stop - 1} of the loader (each a batch); positions in this message "
                           f"count samples from the first of those items" if items_are_batches(loader) else
                           f"pool positions {start}..{stop - 1}; positions in this message count from {start}")
            status = RankStatus(ok=False, message=f"{type(err).__name__}: {err} (rank {rank} scores {block_words})")

    try:
        statuses = exchange_status(status, group)
    except DistributedScoringError as failed:
        raise failed from error  # on the failing rank, keep the original traceback
    done = [s for s in statuses if s.count]
    if not done:
        raise ValueError("the pool is empty: the loader yielded no samples")
    dtype = getattr(torch, done[0].dtype.removeprefix("torch."))
    return ScoredBlock(scores=scores, statuses=statuses, group=group, dtype=dtype, backend=done[0].backend)


def _agree_before_scoring(agreement: str, failed: Exception | None, group) -> None:
    """Exchange each rank's argument checks and call digest; raise on every rank unless all
    passed with one digest. Blocks only partition the pool when every rank reads the same order
    (a random sampler or a dataset listed differently on some node would score some samples
    twice, others never), and the later exchanges need the same k everywhere."""
    mine = ("ok", agreement) if failed is None else ("failed", f"{type(failed).__name__}: {failed}")
    everyone: list = [None] * dist.get_world_size()
    _collective(lambda: dist.all_gather_object(everyone, mine, group=group), "comparing the calls")
    if failed is not None:
        raise failed   # the single-process exception, on the rank that found it
    failures = {r: text for r, (state, text) in enumerate(everyone) if state == "failed"}
    if failures:
        listed = "; ".join(f"rank {r}: {m}" for r, m in failures.items())
        raise DistributedScoringError(f"sharded scoring refused on {len(failures)} of {len(everyone)} ranks: "
                                      f"{listed}", failures)
    digests = [text for _, text in everyone]
    if len(set(digests)) > 1:
        shown = "; ".join(f"rank {r}: {d}" for r, d in enumerate(digests))
        raise ValueError(
            f"the ranks read different pools or call with different options ({shown}); sharding needs the same "
            "dataset in the same loader order and the same options on every rank: use a fixed sampler (no random "
            "sampler), build the dataset identically everywhere, or pass distributed=False")


def _call_digest(options: dict, k) -> str:
    """The options every rank must share (device aside: each rank has its own)."""
    score = options.get("score", "entropy")
    score = score if isinstance(score, str) else getattr(score, "__qualname__", type(score).__name__)
    shared = {"k": k, "norm": options.get("norm", "frobenius"), "score": score,
              "backend": options.get("backend", "auto"), "chunk_size": options.get("chunk_size"),
              "autocast": options.get("autocast")}
    return ", ".join(f"{name}={value}" for name, value in shared.items())


_JOB_OPTIONS = ("score", "params", "logits_fn", "device", "autocast", "max_memory")


def _check_options(model: nn.Module, options: dict, api) -> None:
    signature = inspect.signature(api._score).parameters
    api_default = {name: p.default for name, p in signature.items()}
    known = set(signature) - {"model", "loader", "distributed"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; score_pool/rank_unlabeled take {sorted(known)}")
    check_norm(options.get("norm", "frobenius"))
    check_backend_name(options.get("backend", "auto"))
    make_job(model, **{name: options.get(name, api_default[name]) for name in _JOB_OPTIONS})
    chunk_size = options.get("chunk_size")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of samples, got {chunk_size}")


# --- communication -----------------------------------------------------------------------

_control: tuple[object, float, object] | None = None  # (default group, timeout, gloo group)


def exchange_timeout() -> float:
    """Seconds a rank waits for the others at an exchange (``GRADNORM_DISTRIBUTED_TIMEOUT``)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw}")
    return seconds


def _control_group():
    """One gloo group over all ranks, made once per default group, for the engine's exchanges.

    gloo takes CPU tensors under any default backend (NCCL included), and its timeout turns a
    rank that never arrives into an error instead of a hang.
    """
    global _control
    world, timeout = dist.group.WORLD, exchange_timeout()
    if _control is None or _control[0] is not world or _control[1] != timeout:
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        _control = (world, timeout, group)
    return _control[2]


def _collective(fn, what: str) -> None:
    try:
        fn()
    except Exception as err:
        raise DistributedScoringError(
            f"rank {dist.get_rank()}: {what} failed after waiting up to {exchange_timeout():g} s for the other "
            f"ranks ({type(err).__name__}: {err}); a rank hung, died or raised outside scoring. If ranks "
            f"legitimately finish their blocks further apart, raise {TIMEOUT_ENV} (seconds)") from err


def init_from_torchrun() -> torch.device | None:
    """Under torchrun (WORLD_SIZE > 1 in the environment) start the default process group, once,
    and return this rank's device (``cuda:LOCAL_RANK`` when CUDA is there, else the CPU);
    outside torchrun return None and start nothing. For command-line entry points."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device
