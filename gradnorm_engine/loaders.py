"""What the engine accepts as a pool: loaders whose order is the pool order, every sample once.

A pool position is a sample's place in the loader's order, so a loader that draws a random order
(the positions would not map back to dataset indices), drops samples or repeats them would give
results that look right and are not. ``check_pool_loader`` refuses those it can recognise:
torch's random samplers (alone or inside a batch sampler), ``drop_last``, and
``DistributedSampler`` (which shuffles by default and pads its shards with repeated samples; the
engine shards the pool itself under torchrun). A sampler given as a fixed list of indices is
fine: the positions then count along that list.

A torch ``Dataset`` given as the pool is read in order through a DataLoader the engine makes
(``as_pool``); so is a tensor, a pool of its rows (as ``[x]``, not one batch per row). An
``IterableDataset`` read by several workers yields its whole stream from every worker unless it
splits the stream itself, so it is refused unless it shows that it does. A pool
whose dataset applies random transforms (training augmentation) scores other samples on every
pass: that warns (``RandomTransformWarning``).
"""
from __future__ import annotations

import types
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.data import (DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler,
                              SubsetRandomSampler, WeightedRandomSampler)

from .errors import warn_at_caller

RANDOM_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
# The batch size of the DataLoader made for a Dataset given as the pool (scores do not depend on it).
DATASET_BATCH_SIZE = 64


class RandomTransformWarning(UserWarning):
    """The pool's dataset applies random transforms: its scores change from one pass to the next."""


def as_pool(pool) -> Iterable:
    """What the engine iterates for ``pool``: a torch Dataset becomes a DataLoader reading it in
    order (batches of ``DATASET_BATCH_SIZE``, one pass); a DataLoader or any other iterable of
    batches is itself. A tensor is a pool of its rows (as ``[x]``, one batch that the engine chunks):
    a DataLoader over it, so that it is sharded like any other. Raises TypeError for what cannot be
    a pool."""
    if isinstance(pool, torch.Tensor):
        if pool.dim() == 0:
            raise TypeError("the pool is a 0-d tensor; a tensor pool holds one sample per row (dim 0), e.g. "
                            "[N, C, H, W] images")
        # Rows read in order and stacked back: the batches of [x], cut where the engine's chunks do not
        # depend on it (scores are the same for any batch size).
        return DataLoader(pool, batch_size=DATASET_BATCH_SIZE)
    if isinstance(pool, Dataset) and (isinstance(pool, IterableDataset) or not hasattr(type(pool), "__iter__")):
        if not isinstance(pool, IterableDataset):
            try:
                len(pool)  # type: ignore[arg-type]
            except TypeError:
                raise TypeError(f"the pool is a {type(pool).__name__} (a map-style Dataset) without __len__, so the "
                                "engine cannot read it in order; give it __len__, or pass a DataLoader over it "
                                "with a fixed sampler") from None
        return DataLoader(pool, batch_size=DATASET_BATCH_SIZE)
    if not isinstance(pool, Iterable):
        raise TypeError(f"the pool must be a DataLoader, a Dataset or an iterable of batches, got "
                        f"{type(pool).__name__}")
    return pool


def check_pool_loader(loader: Iterable) -> None:
    """Raise ValueError for a loader whose order is not a fixed pool order of every sample once;
    warn (RandomTransformWarning) when its dataset applies random transforms."""
    if getattr(loader, "drop_last", False):
        raise ValueError("the loader drops its last incomplete batch (drop_last=True), so those samples "
                         "would never be scored; build the DataLoader with drop_last=False")
    batch_sampler = getattr(loader, "batch_sampler", None)
    if getattr(batch_sampler, "drop_last", False):
        raise ValueError("the loader's batch sampler drops its last incomplete batch (drop_last=True), so "
                         "those samples would never be scored; build it with drop_last=False")
    for sampler in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            raise ValueError(
                "the loader has a DistributedSampler, which shuffles by default and repeats samples to "
                "even out the shards; the engine shards the pool itself under torch.distributed: give "
                "every rank the same plain DataLoader (shuffle=False)")
        if isinstance(sampler, RandomSampler):
            raise ValueError("the loader shuffles (shuffle=True), so pool positions in loader order would not "
                             "map back to dataset indices; build the DataLoader with shuffle=False")
        if isinstance(sampler, RANDOM_SAMPLERS):
            raise ValueError(
                f"the loader's sampler ({type(sampler).__name__}) draws a random order, so pool positions "
                "would not map back to dataset indices; to score a subset, pass its indices in a fixed "
                "order: DataLoader(dataset, sampler=indices) or DataLoader(Subset(dataset, indices))")
    _check_workers(loader)
    dataset = getattr(loader, "dataset", None)
    found = random_transforms(dataset) if dataset is not None else []
    if found:
        warn_at_caller(
            f"the pool's dataset applies random transforms ({', '.join(found)}), so every pass scores differently "
            "augmented samples and the scores and the ranking change from call to call; score the pool with a "
            "deterministic (evaluation) transform, e.g. the training pipeline without its random steps",
            RandomTransformWarning)


def _check_workers(loader: Iterable) -> None:
    """An IterableDataset read by several workers: every worker runs the dataset's whole __iter__,
    so unless the dataset splits its stream (get_worker_info(), or a worker_init_fn that does)
    every sample comes once per worker."""
    if not (isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset)):
        return
    workers = loader.num_workers
    if workers <= 1 or loader.worker_init_fn is not None or _splits_by_worker(loader.dataset):
        return
    raise ValueError(
        f"the loader reads an IterableDataset ({type(loader.dataset).__name__}) with num_workers={workers}, and "
        f"every worker yields the whole stream unless the dataset splits it, so every sample would be scored "
        f"{workers} times; split the stream per worker (torch.utils.data.get_worker_info() in __iter__, or a "
        "worker_init_fn that does), or use num_workers=0")


def _splits_by_worker(dataset: IterableDataset) -> bool:
    """Whether the dataset's own class (not torch's) calls get_worker_info anywhere."""
    def mentions(code: types.CodeType) -> bool:
        return "get_worker_info" in code.co_names or any(
            mentions(c) for c in code.co_consts if isinstance(c, types.CodeType))

    for cls in type(dataset).__mro__:
        if cls.__module__.startswith("torch.utils.data"):
            continue
        for value in vars(cls).values():
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            if isinstance(code, types.CodeType) and mentions(code):
                return True
    return False


# torchvision's random transforms whose name does not start with "Random" (recognised by name and
# module: the engine does not import torchvision).
RANDOM_TORCHVISION = {"ColorJitter", "AutoAugment", "RandAugment", "TrivialAugmentWide", "AugMix", "ElasticTransform",
                      "ScaleJitter"}


def random_transforms(dataset) -> list[str]:
    """Class names of the random transforms a dataset applies, where they can be seen: on
    ``dataset.transform`` / ``dataset.transforms``, inside Compose chains (``.transforms``) and
    nn.Sequential, through Subset / ConcatDataset and other wrappers (``.dataset``, ``.datasets``)."""
    found: list[str] = []
    seen: set[int] = set()

    def transform(t, depth: int) -> None:
        if t is None or id(t) in seen or depth > 8 or isinstance(t, (str, bytes, int, float)):
            return
        seen.add(id(t))
        name, module = type(t).__name__, type(t).__module__
        if (name.startswith("Random") or (name in RANDOM_TORCHVISION and module.startswith("torchvision"))) and \
                getattr(t, "p", None) != 0 and name not in found:
            found.append(name)
        if isinstance(t, (list, tuple)):
            for part in t:
                transform(part, depth + 1)
            return
        for attr in ("transforms", "transform"):
            transform(getattr(t, attr, None), depth + 1)
        if isinstance(t, nn.Module):
            for child in t.children():
                transform(child, depth + 1)

    def walk(ds, depth: int) -> None:
        if ds is None or id(ds) in seen or depth > 8:
            return
        seen.add(id(ds))
        for attr in ("transform", "transforms"):
            transform(getattr(ds, attr, None), 0)
        inner = getattr(ds, "dataset", None)
        if isinstance(inner, Dataset):
            walk(inner, depth + 1)
        for part in getattr(ds, "datasets", None) or ():
            if isinstance(part, Dataset):
                walk(part, depth + 1)

    walk(dataset, 0)
    return found


def items_are_batches(loader: Iterable) -> bool:
    """A DataLoader without automatic batching (batch_size=None): every dataset item is a batch."""
    return isinstance(loader, DataLoader) and loader.batch_size is None and loader.batch_sampler is None


def pool_length(loader: Iterable) -> int | None:
    """How many samples the loader yields, where that is known without reading it (progress bars)."""
    if items_are_batches(loader):
        return None   # each item holds a number of samples not known in advance
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        sampler = loader.sampler if loader.batch_size is not None else getattr(loader.batch_sampler, "sampler", None)
        try:
            return len(sampler)
        except TypeError:
            pass
    try:
        return len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError, NotImplementedError):
        return None


def batch_size_hint(loader: Iterable) -> str | None:
    """A note for errors on a loader whose items are taken as batches: often a forgotten batch_size."""
    if not items_are_batches(loader):
        return None
    return ("the loader has batch_size=None, so every dataset item is taken as a batch (its dim 0 as the "
            "samples); if the items are single samples, build the DataLoader with a batch_size")
