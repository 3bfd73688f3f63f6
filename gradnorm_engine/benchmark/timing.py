"""Honest timing and peak memory of one callable.

    timing = time_calls(fn, inputs, warmup=2, repeats=5, device=dev)   # -> Timing
    timing.median_s, timing.spread_pct

* warm-up calls run before the clock (module load, cuDNN algorithm search, vmap tracing);
* every call gets the next input of a rotation of several distinct batches, so no method is
  timed on an input left in a cache by its previous call;
* on CUDA each call is bracketed by CUDA events and the device is synchronised before the
  times are read; on the CPU ``time.perf_counter`` brackets the call;
* the median of the repeats is the number, the interquartile range its spread.

Peak memory (``PeakMemory``) is the working memory a method needs on top of what was already
resident when it started (model, inputs):

* CUDA: ``torch.cuda.max_memory_allocated()`` during the calls minus ``memory_allocated()``
  before them (tensors only, not the caching allocator's reserve);
* CPU: the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``), reset
  before the calls by writing ``5`` to ``/proc/self/clear_refs``, minus the resident set
  (``VmRSS``) before them; the C heap's free pages are handed back first (``malloc_trim``) so
  that memory freed by earlier work is not reused unseen. Where the kernel refuses the reset, a
  background thread samples ``VmRSS`` every millisecond instead. Never tracemalloc, which does
  not see torch's allocations. An approximation still: heap fragmentation counts, and memory
  freed and reused within the measured calls counts once.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MIB = 1024 * 1024


@dataclass(frozen=True)
class Timing:
    """Seconds per call of ``repeats`` timed calls."""

    seconds: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread_pct(self) -> float:
        """Interquartile range over the median, in percent (0 with fewer than 4 repeats: then
        the range max - min is used instead)."""
        s = sorted(self.seconds)
        if len(s) >= 4:
            q = statistics.quantiles(s, n=4)
            width = q[2] - q[0]
        else:
            width = s[-1] - s[0]
        return 100.0 * width / self.median_s if self.median_s > 0 else 0.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[torch.Tensor], object], inputs: Sequence[torch.Tensor], *, warmup: int,
               repeats: int, device: torch.device) -> Timing:
    """Call ``fn`` on the rotated ``inputs``: ``warmup`` untimed calls, then ``repeats`` timed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if not inputs:
        raise ValueError("time_calls needs at least one input batch")
    turn = 0

    def next_input() -> torch.Tensor:
        nonlocal turn
        x = inputs[turn % len(inputs)]
        turn += 1
        return x

    for _ in range(warmup):
        fn(next_input())
    synchronize(device)

    if device.type == "cuda":
        pairs = []
        for _ in range(repeats):
            x = next_input()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        return Timing(tuple(s.elapsed_time(e) / 1000.0 for s, e in pairs))

    seconds = []
    for _ in range(repeats):
        x = next_input()
        t0 = time.perf_counter()
        fn(x)
        seconds.append(time.perf_counter() - t0)
    return Timing(tuple(seconds))


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``), so memory freed by
    earlier work is not silently reused by the code being measured without raising the RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the measurement stays an approximation


def _reset_rss_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: ``.mb`` is the peak working memory (MiB) of the code inside it.

    ``.method`` names how it was measured (see the module docstring); ``.mb`` is None where
    neither way works (no /proc, e.g. macOS).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mb: float | None = None
        self.method = "unavailable"
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled_peak_kib = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda_max_memory_allocated"
            return self
        _release_free_heap()
        self._base_kib = _status_kib("VmRSS")
        if self._base_kib is None:
            return self
        if _reset_rss_high_water() and _status_kib("VmHWM") is not None:
            self.method = "rss_high_water"
        else:
            self.method = "rss_sampled_1ms"
            self._sampled_peak_kib = self._base_kib
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _status_kib("VmRSS") or 0
            self._sampled_peak_kib = max(self._sampled_peak_kib, rss)
            time.sleep(0.001)

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / MIB
        elif self.method == "rss_high_water":
            self.mb = max(0, (_status_kib("VmHWM") or 0) - self._base_kib) / 1024
        elif self.method == "rss_sampled_1ms":
            self._stop.set()
            assert self._sampler is not None
            self._sampler.join()
            self.mb = max(0, self._sampled_peak_kib - self._base_kib) / 1024
        return False
