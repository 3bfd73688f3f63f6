"""How many bytes a backend may spend on one chunk of samples."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from .inputs import ModelInputs
from .kernels import is_out_of_memory  # noqa: F401  (defined with the kernels, the lowest layer)

# Share of the currently free memory a chunk may take: leaves room for the allocator's
# fragmentation and for whatever else lives in the process.
FREE_FRACTION = 0.5
CPU_FALLBACK_BYTES = 2 * 1024**3


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return CPU_FALLBACK_BYTES


def chunk_budget(device: torch.device, max_memory: int | None) -> int:
    """Bytes for one chunk: ``max_memory`` when given, else half the free memory of the device."""
    if max_memory is not None:
        return int(max_memory)
    return int(free_bytes(device) * FREE_FRACTION)


@contextlib.contextmanager
def one_sample_run(example: ModelInputs | torch.Tensor) -> Iterator[None]:
    """Around the forward of one sample ``example`` [1, ...] that sizes the chunks: an exception the
    model raises there stays the model's own (users catch it by type) and gains a note (``add_note``)
    saying where it came from, since shapes in its message count that one sample ("1x7"), not the
    loader's batch."""
    try:
        yield
    except Exception as err:
        err.add_note(
            f"gradnorm_engine: the model raised this on one sample of the pool, inputs "
            f"{ModelInputs.of(example).describe()} (dim 0 = that one sample, not the loader's batch size), "
            "which the engine runs through the model to size its chunks; check that the model takes the loader's "
            "inputs as they are")
        raise


def activation_elems(model: torch.nn.Module, example: ModelInputs | torch.Tensor,
                     precision=contextlib.nullcontext) -> int:
    """Entries of every module output for one sample ``example`` [1, ...]: a cheap proxy of the
    activation memory a chunk needs per sample. ``precision`` makes the forward's autocast context."""
    example = ModelInputs.of(example)
    total = 0

    def count(_m, _inp, out):
        nonlocal total
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                total += t.numel()

    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad(), precision(), one_sample_run(example):
            model(*example.args, **example.kwargs)
    finally:
        for h in handles:
            h.remove()
    return max(total, sum(t.numel() for t in example.tensors()))
