"""The public surface: ``score_pool`` and ``rank_unlabeled``.

    scores = score_pool(model, loader)            # -> [N], pool order
    res = rank_unlabeled(model, loader, k=1000)   # -> RankResult(indices [k], scores [k])

The pool streams through in fixed-size chunks, independent of the loader's batch size, so
the result is bit-identical for any loader batch size; memory holds one chunk plus the [N]
score vector.
"""
from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .backends import Backend, resolve_backend
from .distributed import rank_unlabeled_sharded, score_pool_sharded, use_sharding
from .errors import SampleShapeError
from .inputs import IgnoredInputWarning, extract_input, unused_model_inputs
from .job import ScoringJob, eval_mode, make_job, on_device
from .loaders import batch_size_hint, check_pool_loader, pool_length
from .memory import is_out_of_memory
from .ranking import best_positions
from .reduction import check_norm, reduce_sqnorms
from .scores import ScoreFn


@dataclass(frozen=True)
class RankResult:
    """The ``k`` highest-scoring samples, best first (ties: lower pool position first)."""

    indices: torch.Tensor  # LongTensor [k], pool positions 0..N-1 in loader order
    scores: torch.Tensor   # FloatTensor [k], their scores
    pool_size: int         # N, how many samples were scored
    backend: str           # the backend that computed the scores
    norm: str              # "frobenius" or "tensor_sum"

    def __len__(self) -> int:
        return int(self.indices.numel())


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
    "pseudo_label_ce"; or a callable logits [B, C] -> [B]), theta = ``params`` (default: all
    parameters with requires_grad). ``norm="frobenius"`` is sqrt of the sum of all squares,
    ``norm="tensor_sum"`` the sum over parameter tensors of each tensor's L2 norm.

    The model runs in eval mode; its train/eval flags are restored afterwards and no
    parameter, ``.grad`` or BatchNorm statistic changes (buffers the model's own forward
    updates in eval mode change as in any forward).

    Under torch.distributed (an initialised default process group with more than one rank)
    each rank scores one contiguous block of the pool and every rank returns all N scores;
    ``distributed=False`` scores the whole pool on this process (see docs/distributed.md).
    """
    return _score(model, loader, score=score, norm=norm, backend=backend, params=params,
                  logits_fn=logits_fn, input_key=input_key, device=device, autocast=autocast,
                  max_memory=max_memory, chunk_size=chunk_size, progress=progress,
                  distributed=distributed)[0]


def rank_unlabeled(model: nn.Module, loader: Iterable, k: int, *, distributed: bool | None = None,
                   **options) -> RankResult:
    """The ``k`` samples with the largest scores, highest first.  -> RankResult

    Takes every keyword option of ``score_pool``. Ties are broken by the lower pool position.
    Under torch.distributed each rank ranks its own block and the per-rank top-k lists are
    merged, so every rank returns the same, single-process answer.
    """
    if use_sharding(distributed):   # checks k with the other arguments, on every rank at once
        return rank_unlabeled_sharded(model, loader, k, **options)
    k = _check_k(k)
    scores, backend_name = _score(model, loader, **options, distributed=False)
    return top_k(scores, k, backend=backend_name, norm=options.get("norm", "frobenius"))


def _score(model, loader, *, score="entropy", norm="frobenius", backend="auto", params=None,
           logits_fn=None, input_key=None, device=None, autocast=None, max_memory=None,
           chunk_size=None, progress=True, distributed=None) -> tuple[torch.Tensor, str]:
    """score_pool's work; also says which backend ran."""
    if use_sharding(distributed):
        return score_pool_sharded(model, loader, score=score, norm=norm, backend=backend, params=params,
                                  logits_fn=logits_fn, input_key=input_key, device=device, autocast=autocast,
                                  max_memory=max_memory, chunk_size=chunk_size, progress=progress)
    check_norm(norm)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of samples, got {chunk_size}")
    check_pool_loader(loader)
    job = make_job(model, score=score, params=params, logits_fn=logits_fn, device=device,
                   autocast=autocast, max_memory=max_memory,
                   options={"chunk_size": chunk_size} if chunk_size else None)
    with on_device(job.model, job.device), eval_mode(job.model), torch.enable_grad():
        with resolve_backend(backend, job) as engine:
            scores = _stream_scores(job, engine, loader, input_key=input_key, norm=norm, progress=progress)
            return scores, engine.name


def top_k(scores: torch.Tensor, k: int, *, backend: str = "?", norm: str = "frobenius") -> RankResult:
    """Rank a score vector [N]: highest first, ties by lower position."""
    k = _check_k(k)
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a 1-D tensor [N] of one score per sample, got {shape}")
    n = scores.numel()
    if k > n:
        raise ValueError(f"k = {k} is larger than the pool ({n} samples); ask for at most {n}")
    order = best_positions(scores, k)
    return RankResult(indices=order, scores=scores[order], pool_size=n, backend=backend, norm=norm)


def _check_k(k) -> int:
    """k as an int: Python, numpy and 0-d torch integers are taken; bools and floats refused."""
    is_bool = isinstance(k, bool) or type(k).__name__ == "bool_" or \
        (isinstance(k, torch.Tensor) and k.dtype == torch.bool)
    try:
        value = None if is_bool else operator.index(k)
    except TypeError:
        value = None
    if value is None:
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if value <= 0:
        raise ValueError(f"k must be at least 1, got {value}")
    return value


class _ChunkStream:
    """Re-batches loader batches into chunks of a fixed size, in pool order."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []
        self.count = 0
        self.sample_shape: tuple | None = None

    def push(self, x: torch.Tensor, position: int) -> None:
        if self.sample_shape is None:
            self.sample_shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != self.sample_shape:
            raise SampleShapeError(
                f"samples at pool positions {position}..{position + len(x) - 1} have shape "
                f"{tuple(x.shape[1:])}, earlier ones {self.sample_shape}; every sample must have the "
                "same shape (resize or pad them in the dataset's transform)")
        self.parts.append(x)
        self.count += x.shape[0]

    def pop(self, n: int) -> torch.Tensor:
        x = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)
        head, rest = x[:n], x[n:]
        self.parts = [rest] if rest.shape[0] else []
        self.count = rest.shape[0]
        # A chunk starting inside a larger tensor is copied to memory of its own: CPU kernels
        # round differently for differently aligned data, and a chunk's scores must not depend on
        # where the loader's batches happened to cut it (or sharded scores on the block start).
        return head.clone() if head.storage_offset() else head


def _warn_unused_inputs(batch, input_key) -> None:
    unused = unused_model_inputs(batch, input_key)
    if unused:
        warnings.warn(
            f"the loader's batches hold {', '.join(unused)}, which the engine does not pass to the model: it calls "
            "the model with the one input tensor, so the scores are those of the model without "
            f"{'it' if len(unused) == 1 else 'them'}. To score with them, let the dataset yield one tensor "
            "holding all inputs (e.g. ids and mask stacked) and wrap the model in a module whose forward splits it",
            IgnoredInputWarning, stacklevel=4)


def _stream_scores(job: ScoringJob, engine: Backend, loader: Iterable, *, input_key, norm, progress) -> torch.Tensor:
    total = pool_length(loader)
    bar = tqdm(total=total, unit="sample", unit_scale=True, desc=f"gradnorm ({engine.name})",
               disable=not progress, dynamic_ncols=True)
    stream = _ChunkStream()
    results: list[torch.Tensor] = []
    chunk = None
    seen = 0

    def run(x: torch.Tensor) -> None:
        nonlocal chunk
        try:
            sq = engine.sqnorms(x)
        except Exception as err:
            if not is_out_of_memory(err) or x.shape[0] == 1:
                raise
            # Out of memory: halve the chunk for the rest of the pool and redo this one.
            del err
            if job.device.type == "cuda":
                torch.cuda.empty_cache()
            chunk = max(1, x.shape[0] // 2)
            for part in x.split(chunk):
                run(part)
            return
        results.append(reduce_sqnorms(sq, norm).detach().cpu())
        bar.update(x.shape[0])

    try:
        for batch in loader:
            if seen == 0:
                _warn_unused_inputs(batch, input_key)
            x = extract_input(batch, input_key)
            stream.push(x.to(job.device, non_blocking=True), seen)
            seen += x.shape[0]
            if chunk is None:
                chunk = max(1, int(engine.chunk_size(x[:1].to(job.device))))
            while stream.count >= chunk:
                run(stream.pop(chunk))
        while stream.count:
            run(stream.pop(chunk))
    except Exception as err:
        hint = batch_size_hint(loader)
        if hint and not results:   # failed before any chunk scored: maybe single samples taken as batches
            err.add_note(hint)
        raise
    finally:
        bar.close()

    if seen == 0:
        raise ValueError("the pool is empty: the loader yielded no samples")
    scores = torch.cat(results)
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if bad.numel():
        shown = ", ".join(str(int(i)) for i in bad[:20]) + (" ..." if bad.numel() > 20 else "")
        raise ValueError(
            f"{bad.numel()} sample(s) got a non-finite score (NaN or Inf in the sample or its logits), at "
            f"pool positions {shown}; clean or drop those samples, or check the model for overflow")
    return scores
