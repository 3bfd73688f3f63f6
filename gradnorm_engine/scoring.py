"""The single-process stream: loader batches -> fixed-size chunks -> backend -> reduction -> scores.

    scores, backend = score_here(model, loader, options)   # -> ([N] in pool order, backend name)

The pool streams through in fixed-size chunks, independent of the loader's batch size, so the
result is bit-identical for any loader batch size; memory holds one chunk plus the [N] score
vector. ``api`` calls this for a single process, ``distributed`` for each rank's block.

Samples of one chunk share their shapes. A pool of several inputs (token ids and an attention
mask, padded per batch by the loader's collate) may change shapes from batch to batch: a chunk
then ends where the shapes change, so every sample is scored with the padding its own batch
gave it. A single-input pool whose samples change shape is refused (SampleShapeError): images
of different sizes are almost always a mistake.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .backends import Backend, resolve_backend
from .backends.limits import autograd_limit
from .errors import NonFiniteScoreError, SampleShapeError, ZeroScoreWarning, warn_at_caller
from .inputs import IgnoredInputWarning, InputReader, ModelInputs
from .job import ScoringJob, eval_mode, on_device
from .loaders import as_pool, batch_size_hint, check_pool_loader, pool_length
from .memory import is_out_of_memory
from .options import ScoringOptions
from .reduction import reduce_sqnorms


# One chunk's result from the backend: its scores [B] (the norm of the squared norms [B, P]), or
# another per-sample result [B, ...] (per-parameter norms, expected gradient length).
ChunkResult = Callable[[Backend, ModelInputs], torch.Tensor]


def score_here(model: nn.Module, loader: Iterable, options: ScoringOptions, per_chunk: ChunkResult | None = None
               ) -> tuple[torch.Tensor, str]:
    """Every sample's score on this process, after checking the loader and the job.  -> ([N], backend)

    ``per_chunk(engine, x)``: each chunk's result (default: ``options.norm`` of ``engine.sqnorms(x)``, [B]).
    """
    loader = as_pool(loader)
    check_pool_loader(loader)
    scores, backend = score_stream(options.make_job(model), loader, options, progress=options.progress,
                                   per_chunk=per_chunk)
    warn_if_every_score_is_zero(scores)
    return scores, backend


def score_stream(job: ScoringJob, loader: Iterable, options: ScoringOptions, *, progress: bool,
                 per_chunk: ChunkResult | None = None) -> tuple[torch.Tensor, str]:
    """Score a checked job over ``loader``: the model on the job's device, in eval mode.  -> ([N], backend)"""
    with on_device(job.model, job.device), eval_mode(job.model), torch.enable_grad():
        with resolve_backend(options.backend, job) as engine:
            reader = options.input_reader(job.model, needs_targets=job.loss_fn.needs_targets)
            scores = _stream_scores(job, engine, loader, reader, progress=progress,
                                    per_chunk=per_chunk or (lambda e, x: reduce_sqnorms(e.sqnorms(x), options.norm)))
            return scores, engine.name


class ChunkStream:
    """Re-batches loader batches into chunks of a fixed size, in pool order."""

    def __init__(self):
        self.parts: list[ModelInputs] = []
        self.count = 0
        self.signature: tuple | None = None

    def fits(self, x: ModelInputs, position: int) -> bool:
        """Whether ``x`` may join the samples waiting here: the same shapes. A multi-input batch of
        other shapes may not (the waiting samples form a chunk of their own first); a single
        input of another shape raises SampleShapeError."""
        if self.signature is None or x.signature() == self.signature:
            return True
        if len(x.tensors()) > 1 or x.kwargs:
            return False
        shape = tuple(x.args[0].shape[1:])
        raise SampleShapeError(
            f"samples at pool positions {position}..{position + len(x) - 1} have shape "
            f"{shape}, earlier ones {self.signature[0][0]}; every sample must have the "
            "same shape (resize or pad them in the dataset's transform)")

    def push(self, x: ModelInputs, position: int) -> None:
        if not self.fits(x, position):
            raise RuntimeError("push a batch of other shapes only after popping the waiting samples")
        self.signature = x.signature()
        self.parts.append(x)
        self.count += len(x)

    def pop(self, n: int) -> ModelInputs:
        x = ModelInputs.cat(self.parts)
        head, rest = x[:n], x[n:]
        self.parts = [rest] if len(rest) else []
        self.count = len(rest)
        if not self.count:
            self.signature = None
        # A chunk starting inside a larger tensor is copied to memory of its own: CPU kernels
        # round differently for differently aligned data, and a chunk's scores must not depend on
        # where the loader's batches happened to cut it (or sharded scores on the block start).
        return head.map(lambda t: t.clone() if t.storage_offset() else t)


def _warn_unused_inputs(batch, reader: InputReader) -> None:
    unused = reader.unused(batch)
    if unused:
        warnings.warn(
            f"the loader's batches hold {', '.join(unused)}, which the engine does not pass to the model, so the "
            f"scores are those of the model without {'it' if len(unused) == 1 else 'them'}: the model's forward "
            "does not take them by name, or input_key chose one other entry. To pass them, name them with "
            "input_keys=[...] (passed as keyword arguments); to silence this, exclude_keys=[...]",
            IgnoredInputWarning, stacklevel=6)   # the caller of score_pool or rank_unlabeled


def warn_if_every_score_is_zero(scores: torch.Tensor) -> None:
    """ZeroScoreWarning when every sample scored exactly 0 (``scores``: the whole pool's, or its
    top k, which are all 0 only when every score is: scores are norms): a ranking is then the pool
    order. Decided on the whole pool, never on one rank's block. The
    usual cause is a score that no measured parameter reaches: a tuple output whose first element
    is not the logits, logits computed under no_grad or detached, params= naming parameters the
    logits do not use."""
    if scores.numel() and not bool(scores.any()):
        warn_at_caller(
            "every sample scored 0, so a ranking is the pool order: the score does not depend on any measured "
            "parameter, most likely: the logits (a tensor output itself, a tuple's first element, a mapping's "
            "'logits') are computed without the parameters, or detached, or params= names parameters the logits "
            "do not use; pass logits_fn= to pick the output that holds the logits, or other params=",
            ZeroScoreWarning)


def _stream_scores(job: ScoringJob, engine: Backend, loader: Iterable, reader: InputReader, *,
                   per_chunk: ChunkResult, progress: bool) -> torch.Tensor:
    total = pool_length(loader)
    bar = tqdm(total=total, unit="sample", unit_scale=True, desc=f"gradnorm ({engine.name})",
               disable=not progress, dynamic_ncols=True)
    stream = ChunkStream()
    results: list[torch.Tensor] = []
    chunk = None
    seen = 0

    def run(x: ModelInputs) -> None:
        nonlocal chunk
        try:
            result = per_chunk(engine, x)
        except Exception as err:
            known = autograd_limit(err)   # what no backend can differentiate, in one line with the fix
            if known is not None:
                raise known from err
            if not is_out_of_memory(err) or len(x) == 1:
                raise
            # Out of memory: halve the chunk for the rest of the pool and redo this one.
            del err
            if job.device.type == "cuda":
                torch.cuda.empty_cache()
            chunk = max(1, len(x) // 2)
            for part in x.split(chunk):
                run(part)
            return
        results.append(result.detach().cpu())
        bar.update(len(x))

    try:
        for batch in loader:
            if seen == 0:
                _warn_unused_inputs(batch, reader)
            x = reader.read(batch).to(job.device, non_blocking=True)
            if not stream.fits(x, seen):   # other shapes (a batch padded to another length)
                run(stream.pop(stream.count))
            stream.push(x, seen)
            seen += len(x)
            if chunk is None:
                chunk = max(1, int(engine.chunk_size(x[:1])))
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
    bad = (~torch.isfinite(scores)).reshape(scores.shape[0], -1).any(dim=1).nonzero().flatten()
    if bad.numel():
        shown = ", ".join(str(int(i)) for i in bad[:20]) + (" ..." if bad.numel() > 20 else "")
        raise NonFiniteScoreError(
            f"{bad.numel()} sample(s) got a non-finite score (NaN or Inf in the sample or its logits), at "
            f"pool positions {shown}; clean or drop those samples, or check the model for overflow", bad.tolist())
    return scores
