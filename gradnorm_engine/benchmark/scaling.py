"""Pool-size scaling: ``rank_unlabeled`` on synthetic pools of growing size.  -> rows

    rows = run_scaling(ScalingConfig(device="cpu", pool_sizes=(1000, 4000, 16000)))

The scorer streams the pool chunk by chunk, so its time should grow linearly with the pool
and its peak memory should not grow at all (beyond the [N] float32 score vector: 4 MB per
million samples). Each row holds the pool size, the wall time of the whole call, the time per
sample and the peak working memory (``timing.PeakMemory``); ``time_vs_smallest`` and
``memory_vs_smallest`` compare every pool with the smallest one (linear time: the first
equals pool_size / smallest pool size; flat memory: the second stays near 1).

The pool is an iterable of loader-sized batches taken in turn from a small bank of distinct
random batches already on the device: a million samples are scored without a million samples
ever being held, and no data loading is timed.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..api import rank_unlabeled
from ..devices import resolve_device
from .runner import device_label
from .timing import PeakMemory, synchronize
from .workloads import build_model, make_inputs, precision


@dataclass
class ScalingConfig:
    device: str = "cpu"
    pool_sizes: Sequence[int] = (1000, 4000, 16000)
    model: str = "small_cnn"
    width: int | None = None
    dtype: str = "fp32"
    backend: str = "auto"
    loader_batch: int = 256   # samples per loader batch
    bank_batches: int = 8     # distinct batches the synthetic pool cycles through
    k: int = 100              # how many samples rank_unlabeled returns
    seed: int = 0


class SyntheticPool:
    """``size`` samples in batches of ``batch`` (last one shorter), cycling through ``bank``."""

    def __init__(self, bank: list[torch.Tensor], size: int):
        self.bank, self.size = bank, size
        self.batch = int(bank[0].shape[0])

    def __len__(self) -> int:
        return -(-self.size // self.batch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        left, turn = self.size, 0
        while left > 0:
            x = self.bank[turn % len(self.bank)]
            yield x[: min(left, self.batch)]
            left -= self.batch
            turn += 1


def run_scaling(config: ScalingConfig) -> list[dict]:
    device = resolve_device(config.device)
    sizes = sorted(set(int(n) for n in config.pool_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"pool sizes must be positive numbers of samples, got {config.pool_sizes}")
    model = build_model(config.model, device, width=config.width, seed=config.seed)
    bank = make_inputs(config.model, config.loader_batch, config.bank_batches, seed=config.seed + 1, device=device)
    autocast = "bf16" if config.dtype == "bf16" else None
    options = dict(backend=config.backend, autocast=autocast, progress=False)

    rows = []
    with precision(config.dtype, device):
        # Warm-up outside the clock: cuDNN algorithm search, vmap tracing, the chunk-size probe.
        rank_unlabeled(model, SyntheticPool(bank, min(sizes[0], 2 * config.loader_batch)), k=1, **options)
        for n in sizes:
            pool = SyntheticPool(bank, n)
            with PeakMemory(device) as memory:
                synchronize(device)
                t0 = time.perf_counter()
                result = rank_unlabeled(model, pool, k=min(config.k, n), **options)
                synchronize(device)
                seconds = time.perf_counter() - t0
            rows.append({
                "pool_size": n, "model": config.model, "width": config.width, "device": device_label(device),
                "dtype": config.dtype,
                "backend": result.backend, "seconds": seconds, "us_per_sample": 1e6 * seconds / n,
                "samples_per_s": n / seconds, "peak_mem_mb": memory.mb,
            })
    base = rows[0]
    for r in rows:
        r["time_vs_smallest"] = r["seconds"] / base["seconds"]
        r["size_vs_smallest"] = r["pool_size"] / base["pool_size"]
        r["memory_vs_smallest"] = (r["peak_mem_mb"] / base["peak_mem_mb"]
                                   if r["peak_mem_mb"] and base["peak_mem_mb"] else None)
    return rows
