"""The single-process stream: loader batches -> fixed-size chunks -> backend -> reduction -> scores.

    scores, backend = score_here(model, loader, options)   # -> ([N] in pool order, backend name)

The pool streams through in fixed-size chunks, independent of the loader's batch size, so the
result is bit-identical for any loader batch size; memory holds one chunk plus the [N] score
vector. ``api`` calls this for a single process, ``distributed`` for each rank's block.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .backends import Backend, resolve_backend
from .errors import SampleShapeError
from .inputs import IgnoredInputWarning, extract_input, unused_model_inputs
from .job import ScoringJob, eval_mode, on_device
from .loaders import batch_size_hint, check_pool_loader, pool_length
from .memory import is_out_of_memory
from .options import ScoringOptions
from .reduction import reduce_sqnorms


def score_here(model: nn.Module, loader: Iterable, options: ScoringOptions) -> tuple[torch.Tensor, str]:
    """Every sample's score on this process, after checking the loader and the job.  -> ([N], backend)"""
    check_pool_loader(loader)
    return score_stream(options.make_job(model), loader, options, progress=options.progress)


def score_stream(job: ScoringJob, loader: Iterable, options: ScoringOptions, *, progress: bool
                 ) -> tuple[torch.Tensor, str]:
    """Score a checked job over ``loader``: the model on the job's device, in eval mode.  -> ([N], backend)"""
    with on_device(job.model, job.device), eval_mode(job.model), torch.enable_grad():
        with resolve_backend(options.backend, job) as engine:
            scores = _stream_scores(job, engine, loader, input_key=options.input_key, norm=options.norm,
                                    progress=progress)
            return scores, engine.name


class ChunkStream:
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
            IgnoredInputWarning, stacklevel=6)   # the caller of score_pool or rank_unlabeled


def _stream_scores(job: ScoringJob, engine: Backend, loader: Iterable, *, input_key, norm, progress) -> torch.Tensor:
    total = pool_length(loader)
    bar = tqdm(total=total, unit="sample", unit_scale=True, desc=f"gradnorm ({engine.name})",
               disable=not progress, dynamic_ncols=True)
    stream = ChunkStream()
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
