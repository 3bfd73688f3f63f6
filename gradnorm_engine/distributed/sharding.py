"""Which positions a rank reads: contiguous blocks of the pool, and a DataLoader over one.

With pool size N and world size W, rank r reads positions [start_r, stop_r), where
start_r = r * (N // W) + min(r, N % W): blocks differ in size by at most one, the first N % W
ranks take the extra position, no position is read twice or skipped.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler
from torch.utils.data._utils.collate import default_collate, default_convert


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
                 align: int = 1, whole_batches: bool = False) -> tuple[DataLoader, int, int]:
    """A DataLoader over rank ``rank``'s block of ``loader``'s pool, and the block [start, stop).

    ``order``: ``loader_order(loader)`` when the caller has it already. ``align``: blocks start at
    multiples of it (the chunk size, so that every rank's chunks are a single process's chunks).

    The new loader reads the same dataset with the same batch size (a custom batch sampler
    becomes plain batches of its largest batch size: scores do not depend on batch size),
    workers, collate_fn, pin_memory and worker settings; only the sampler changes.

    ``whole_batches`` (``collates_per_batch(loader)``: a collate_fn of the user's own, one that
    pads each batch to its longest sample, say, so that a sample's tensors depend on the batch it
    is collated with): the rank reads whole batches of ``loader`` (of its own batch sampler too),
    from the first batch that starts in its share of the pool to the next rank's first, so every
    sample is collated exactly as one process collates it.
    """
    check_shardable(loader)
    order = loader_order(loader) if order is None else order
    align = max(1, int(align))
    first, last = shard_bounds(-(-len(order) // align), rank, world_size)   # in units of align
    start, stop = min(first * align, len(order)), min(last * align, len(order))
    if whole_batches and loader.batch_sampler is not None:
        start, stop, batches = _whole_batches(loader, order, start, stop)
        batching = dict(batch_sampler=batches)
        return DataLoader(loader.dataset, **batching, **_loader_settings(loader)), start, stop
    positions = order[start:stop]
    if loader.batch_sampler is None:  # batch_size=None: every dataset item is a batch
        batching = dict(batch_size=None, sampler=positions)
    elif _is_plain_batch_sampler(loader):
        batching = dict(batch_size=loader.batch_size, sampler=positions)
    else:
        size = max((len(b) for b in loader.batch_sampler), default=1)
        batching = dict(batch_sampler=BatchSampler(positions, batch_size=max(1, size), drop_last=False))
    return DataLoader(loader.dataset, **batching, **_loader_settings(loader)), start, stop


def _loader_settings(loader: DataLoader) -> dict:
    """Everything of ``loader`` but what it reads: workers, collate_fn, pin_memory, ..."""
    workers = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                   timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                   multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                   pin_memory_device=getattr(loader, "pin_memory_device", ""))
    if loader.num_workers > 0:  # these two are refused by DataLoader without workers
        workers.update(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
    if hasattr(loader, "in_order"):
        workers["in_order"] = loader.in_order
    return workers


def collates_per_batch(loader: Iterable) -> bool:
    """Whether a sample's tensors may depend on the batch it is collated with: a DataLoader with a
    collate_fn of the user's own (which may pad to the batch's longest sample), not torch's (which
    stack samples of one shape)."""
    return isinstance(loader, DataLoader) and loader.collate_fn not in (default_collate, default_convert)


def _whole_batches(loader: DataLoader, order: Sequence[int], start: int, stop: int
                   ) -> tuple[int, int, list[list[int]]]:
    """The batches of ``loader`` that start in positions [start, stop), and the block [first, last)
    they cover (empty where the next batch starts, when none starts there)."""
    if _is_plain_batch_sampler(loader):
        size = loader.batch_size
        batches = [list(order[i:i + size]) for i in range(0, len(order), size)]
    else:
        batches = [list(b) for b in loader.batch_sampler]
    begins = [0]
    for batch in batches:
        begins.append(begins[-1] + len(batch))
    mine = [i for i, begin in enumerate(begins[:-1]) if start <= begin < stop]
    if not mine:
        first = next((begin for begin in begins if begin >= start), len(order))
        return first, first, []
    return begins[mine[0]], begins[mine[-1] + 1], [batches[i] for i in mine]


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
