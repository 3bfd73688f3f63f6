"""Measure every method on one workload, in one process, on the same inputs.  -> rows

    rows = run_methods(BenchConfig(model="resnet18", device="cpu", batch_size=32))
    sweep = run_chunk_sweep(BenchConfig(...), chunk_sizes=[8, 16, 32, 64])

A row is a plain dict (the JSON record):

  method, model, device, dtype, batch_size, samples_per_call, samples_per_s, time_per_call_ms,
  spread_pct, repeats, peak_mem_mb, max_rel_err, ratio_to_fwd_bwd, error, notes

samples_per_s = samples_per_call / median seconds per call. ``loop`` covers only
``loop_samples`` samples per call (it is reported per sample like the rest).
max_rel_err = max_i |s_i - r_i| / r_i over the first ``loop_samples`` samples of the first
batch, r = the per-sample loop in float64 (so the fp32 loop row shows fp32's own rounding);
null for the floors.
ratio_to_fwd_bwd = seconds per sample of the method / seconds per sample of ``fwd_bwd``
(1 = as fast as one training step on the same batch; the forward floor is below 1).
A method that cannot run gets a row whose ``error`` says why and whose numbers are null.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..backends import BACKENDS
from ..devices import resolve_device
from .methods import (Method, MethodContext, MethodUnavailable, build_method, engine_backend_method,
                      loop_method, method_names)
from .timing import PeakMemory, time_calls
from .workloads import Workload, build_workload, precision


@dataclass
class BenchConfig:
    model: str = "resnet18"
    device: str = "cpu"
    dtype: str = "fp32"
    batch_size: int = 32
    warmup: int = 2          # untimed calls after the first (checked) call
    repeats: int = 5         # timed calls; the median is reported
    loop_samples: int = 8    # samples per ``loop`` call, and samples checked against the loop
    n_batches: int = 4       # distinct input batches, rotated from call to call
    width: int | None = None  # ResNet-18 / small CNN stage width (None: the real model)
    methods: Sequence[str] | None = None  # None: every method
    seed: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["methods"] = list(self.methods) if self.methods is not None else None
        return d


def device_label(device: torch.device) -> str:
    """The card's name, e.g. 'NVIDIA H100 80GB HBM3', or 'CPU (2 cores)'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def reference_scores(workload: Workload, device: torch.device, n: int) -> torch.Tensor:
    """Scores of the first ``n`` samples of the first batch by the per-sample loop in float64
    (a float64 copy of the model, inputs upcast): the yardstick of every row's max_rel_err."""
    model64 = copy.deepcopy(workload.model).double()
    x = workload.batches[0][:n]
    x = x.double() if x.is_floating_point() else x
    with precision("fp32", device), torch.enable_grad():
        ctx = MethodContext(model64, device, None, n, n)
        return loop_method(ctx).fn(x).double().cpu()


def max_rel_err(scores: torch.Tensor, reference: torch.Tensor) -> float:
    n = min(scores.numel(), reference.numel())
    got, ref = scores[:n].double().cpu(), reference[:n]
    if not torch.isfinite(got).all():
        return float("inf")
    return float(((got - ref).abs() / ref.abs().clamp_min(1e-30)).max())


def run_methods(config: BenchConfig, log: Callable[[str], None] | None = None) -> list[dict]:
    """One row per method (see the module docstring), measured on one workload.

    ``log`` (e.g. print) hears the name of each method as its measurement starts."""
    device = resolve_device(config.device)
    names = list(config.methods) if config.methods is not None else method_names()
    unknown = [n for n in names if n not in method_names()]
    if unknown:
        raise ValueError(f"unknown benchmark method(s) {unknown}; choose from {method_names()}")
    workload = build_workload(config.model, device, batch_size=config.batch_size,
                              n_batches=config.n_batches, seed=config.seed, width=config.width)
    n_check = min(config.loop_samples, config.batch_size)
    reference = reference_scores(workload, device, n_check)
    rows = []
    with precision(config.dtype, device) as autocast, torch.enable_grad():
        ctx = MethodContext(workload.model, device, autocast, n_check, config.batch_size)
        for name in names:
            if log:
                log(f"  {name}")
            try:
                method = build_method(name, ctx)
            except MethodUnavailable as err:
                rows.append(_row(config, workload, device, name, error=str(err)))
                continue
            rows.append(_measure(method, config, workload, device, reference))
    return with_ratios(rows)


def run_chunk_sweep(config: BenchConfig, chunk_sizes: Sequence[int], backends: Sequence[str] | None = None,
                    log: Callable[[str], None] | None = None) -> list[dict]:
    """Every engine backend (``loop`` included) on its hot path at each chunk size.

    Rows as ``run_methods``' with ``batch_size`` = the chunk; ``chunk_size`` is added.
    """
    device = resolve_device(config.device)
    names = list(backends) if backends is not None else list(BACKENDS)
    chunk_sizes = sorted(set(int(c) for c in chunk_sizes))
    if not chunk_sizes or chunk_sizes[0] < 1:
        raise ValueError(f"chunk sizes must be positive numbers of samples, got {chunk_sizes}")
    largest = build_workload(config.model, device, batch_size=chunk_sizes[-1], n_batches=config.n_batches,
                             seed=config.seed, width=config.width)
    n_check = min(config.loop_samples, chunk_sizes[0])
    reference = reference_scores(largest, device, n_check)
    rows = []
    with precision(config.dtype, device) as autocast, torch.enable_grad():
        for chunk in chunk_sizes:
            workload = Workload(largest.name, largest.model, [b[:chunk] for b in largest.batches],
                                largest.description)
            ctx = MethodContext(workload.model, device, autocast, n_check, chunk)
            chunk_config = BenchConfig(**{**config.as_dict(), "batch_size": chunk})
            for name in names:
                if log:
                    log(f"  chunk {chunk}: {name}")
                try:
                    method = engine_backend_method(ctx, name)
                except MethodUnavailable as err:
                    row = _row(chunk_config, workload, device, name, error=str(err))
                else:
                    row = _measure(method, chunk_config, workload, device, reference)
                rows.append({**row, "chunk_size": chunk})
    return rows


def with_ratios(rows: list[dict]) -> list[dict]:
    floor = next((r["samples_per_s"] for r in rows if r["method"] == "fwd_bwd" and r["samples_per_s"]), None)
    for r in rows:
        r["ratio_to_fwd_bwd"] = (floor / r["samples_per_s"]) if floor and r["samples_per_s"] else None
    return rows


def _measure(method: Method, config: BenchConfig, workload: Workload, device: torch.device,
             reference: torch.Tensor) -> dict:
    try:
        # The first call is checked against the loop and doubles as the first warm-up; its
        # one-time setup (torch.func tracing, kernel compilation) stays outside the memory window,
        # which would otherwise charge it to whichever method ran first.
        scores = method.fn(workload.batches[0])
        err = None if method.is_floor or scores is None else max_rel_err(scores, reference)
        with PeakMemory(device) as memory:
            timing = time_calls(method.fn, workload.batches[1:] + workload.batches[:1],
                                warmup=max(0, config.warmup - 1), repeats=config.repeats, device=device)
        notes = method.notes()   # the state the timed calls ran in (after any first-call switch)
    except Exception as exc:  # an out-of-memory or a refusal deep inside: a row, not a crash
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return _row(config, workload, device, method.name, error=f"{type(exc).__name__}: {_short(exc)}")
    finally:
        method.close()
    samples = method.samples_per_call(workload.batches[0])
    return _row(config, workload, device, method.name,
                samples_per_call=samples,
                samples_per_s=samples / timing.median_s,
                time_per_call_ms=1000 * timing.median_s,
                spread_pct=timing.spread_pct,
                repeats=len(timing.seconds),
                peak_mem_mb=memory.mb,
                max_rel_err=err,
                notes=notes)


def _row(config: BenchConfig, workload: Workload, device: torch.device, method: str, **values) -> dict:
    row = {
        "method": method, "model": workload.name, "device": device_label(device), "dtype": config.dtype,
        "batch_size": workload.batch_size, "samples_per_call": None, "samples_per_s": None,
        "time_per_call_ms": None, "spread_pct": None, "repeats": None, "peak_mem_mb": None,
        "max_rel_err": None, "ratio_to_fwd_bwd": None, "error": None, "notes": None,
    }
    row.update(values)
    return row


def _short(err: BaseException, limit: int = 240) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
