"""Per-sample sums of squares over many tensors: the vmap backend's reduction.

    out[b]    = sum_t sum_i tensors[t][b, i]^2          (per_tensor=False, shape [B])
    out[b, t] = sum_i tensors[t][b, i]^2                (per_tensor=True,  shape [B, T])

Accumulated in float32 (float64 inputs accumulate and return in float64).

The Triton path reads every tensor once, in place, from one launch per input dtype: a table
holds each tensor's address, batch stride, element stride and per-sample size, and the work is
cut into fixed chunks of one sample of one tensor. Each chunk writes one partial sum; a second
small kernel adds each (sample, tensor)'s partials in chunk order, so the result is
deterministic (no atomics). Per-sample slices that are one strided run in memory (contiguous,
channels_last, permuted non-batch dims, batch not outermost) are read in place; anything else
is copied once with ``.contiguous()`` first.
"""
from __future__ import annotations

import math

from collections.abc import Sequence

import torch

from ._dispatch import TRITON_AVAILABLE, is_interpreted, run_with_fallback, use_triton

# One program reduces CHUNK = BLOCK * ITERS entries of one sample of one tensor.
BLOCK = 1024
ITERS = 16
SEGMENT_BLOCK = 128

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16,
                  torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}

    @triton.jit
    def _per_sample_sumsq_kernel(ptrs, batch_strides, elem_strides, numels, item_tensor, item_start,
                                 partials, n_items, item_offset,
                                 DTYPE: tl.constexpr, ACC: tl.constexpr,
                                 BLOCK: tl.constexpr, ITERS: tl.constexpr):
        """partials[b, item_offset + k] = sum_{i in chunk k} x_t[b, i]^2, t = item_tensor[k].

        Grid (items of this dtype group, B). Chunk k covers per-sample indices
        [item_start[k], item_start[k] + BLOCK*ITERS) of tensor t, whose entry i of sample b lives
        at ptrs[t] + b*batch_strides[t] + i*elem_strides[t] (in elements).
        """
        k = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        t = tl.load(item_tensor + k)
        start = tl.load(item_start + k)
        base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
        sb = tl.load(batch_strides + t)
        se = tl.load(elem_strides + t)
        n = tl.load(numels + t)
        row = base + b * sb
        offs = tl.arange(0, BLOCK).to(tl.int64)
        acc = tl.zeros([BLOCK], dtype=ACC)
        for it in range(ITERS):
            idx = start + it * BLOCK + offs
            v = tl.load(row + idx * se, mask=idx < n, other=0.0).to(ACC)
            acc += v * v
        tl.store(partials + b * n_items + item_offset + k, tl.sum(acc, axis=0))

    @triton.jit
    def _segment_sum_kernel(partials, seg_start, seg_end, out, n_items, n_seg,
                            BLOCK: tl.constexpr):
        """out[b, t] = sum_{k in [seg_start[t], seg_end[t])} partials[b, k], in a fixed order.

        Grid (B, T).
        """
        b = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1)
        lo = tl.load(seg_start + t)
        hi = tl.load(seg_end + t)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=partials.dtype.element_ty)
        for s in range(lo, hi, BLOCK):
            idx = s + offs
            acc += tl.load(partials + b * n_items + idx, mask=idx < hi, other=0.0)
        tl.store(out + b * n_seg + t, tl.sum(acc, axis=0))
else:  # pragma: no cover
    _per_sample_sumsq_kernel = None


def _accum_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check(tensors: Sequence[torch.Tensor]) -> int:
    if len(tensors) == 0:
        raise ValueError("per_sample_sumsq needs at least one tensor")
    batch = tensors[0].shape[0] if tensors[0].dim() > 0 else None
    for t in tensors:
        if t.dim() == 0 or t.shape[0] != batch:
            raise ValueError("every tensor must be shaped [B, ...] with the same B; got shapes "
                             f"{[tuple(t.shape) for t in tensors]}")
        if not t.is_floating_point():
            raise TypeError(f"per_sample_sumsq takes floating-point tensors, got {t.dtype}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"per_sample_sumsq: every tensor must be on one device, got "
                         f"{sorted({str(t.device) for t in tensors})}")
    return batch


def _sample_run(t: torch.Tensor) -> tuple[int, int] | None:
    """(element stride, entries) when each sample's entries are one strided run in memory.

    Summing squares ignores order, so the non-batch dims may be permuted: sorted by stride they
    must tile a run s, 2s, ..., with no gaps or overlaps. None otherwise (e.g. expanded dims).
    """
    dims = sorted((st, sz) for sz, st in zip(t.shape[1:], t.stride()[1:]) if sz != 1)
    if not dims:
        return 1, 1
    step = dims[0][0]
    if step <= 0:
        return None
    expected = step
    for st, sz in dims:
        if st != expected:
            return None
        expected *= sz
    return step, expected // step


def per_sample_sumsq_reference(tensors: Sequence[torch.Tensor], per_tensor: bool = False) -> torch.Tensor:
    """Plain torch: one reshape and square-sum per tensor."""
    batch = _check(tensors)
    acc = _accum_dtype(tensors)
    cols = [t.reshape(batch, math.prod(t.shape[1:])).to(acc).pow(2).sum(dim=1) for t in tensors]  # each [B]
    out = torch.stack(cols, dim=1)                                             # [B, T]
    return out if per_tensor else out.sum(dim=1)


def _per_sample_sumsq_triton(tensors: list[torch.Tensor], per_tensor: bool) -> torch.Tensor:
    batch = tensors[0].shape[0]
    device = tensors[0].device
    acc = _accum_dtype(tensors)
    if batch == 0:
        out = torch.zeros(0, len(tensors), dtype=acc, device=device)
        return out if per_tensor else out.sum(dim=1)
    chunk = BLOCK * ITERS
    # Per tensor: (tensor kept alive, batch stride, element stride, entries per sample).
    layout = []
    for t in tensors:
        if t.dtype not in _TL_DTYPES:
            t = t.float()
        run = _sample_run(t)
        if run is None:
            t = t.contiguous()
            run = _sample_run(t)
        layout.append((t, t.stride(0) if batch > 1 else 0, run[0], run[1]))

    # Items are numbered dtype group by dtype group, so each tensor's chunks are consecutive.
    groups: dict[torch.dtype, list[int]] = {}
    for i, (t, *_rest) in enumerate(layout):
        groups.setdefault(t.dtype, []).append(i)
    seg_start = [0] * len(tensors)
    seg_end = [0] * len(tensors)
    launches = []
    n_items = 0
    for dtype, members in groups.items():
        item_tensor, item_start = [], []
        for j, i in enumerate(members):
            n = layout[i][3]
            seg_start[i] = n_items + len(item_tensor)
            for s in range(0, n, chunk):
                item_tensor.append(j)
                item_start.append(s)
            seg_end[i] = n_items + len(item_tensor)
        launches.append((dtype, members, item_tensor, item_start, n_items))
        n_items += len(item_tensor)

    # Every index table goes to the device in one copy; the kernels get views into it.
    host = []
    for _dtype, members, item_tensor, item_start, _offset in launches:
        for column in ([layout[i][0].data_ptr() for i in members], [layout[i][1] for i in members],
                       [layout[i][2] for i in members], [layout[i][3] for i in members],
                       item_tensor, item_start):
            host.append(column)
    host += [seg_start, seg_end]
    flat = torch.tensor([v for column in host for v in column], dtype=torch.int64)
    tables = iter(flat.to(device, non_blocking=True).split([len(column) for column in host]))

    partials = torch.empty(batch, n_items, dtype=acc, device=device)
    tl_acc = _TL_DTYPES[acc]
    for dtype, _members, item_tensor, _item_start, offset in launches:
        ptrs, batch_strides, elem_strides, numels, item_tensor_t, item_start_t = (next(tables) for _ in range(6))
        if not item_tensor:  # only empty tensors of this dtype: nothing to read
            continue
        _per_sample_sumsq_kernel[(len(item_tensor), batch)](
            ptrs, batch_strides, elem_strides, numels, item_tensor_t, item_start_t,
            partials, n_items, offset,
            DTYPE=_TL_DTYPES[dtype], ACC=tl_acc, BLOCK=BLOCK, ITERS=ITERS)
    seg_start_t, seg_end_t = next(tables), next(tables)
    out = torch.empty(batch, len(tensors), dtype=acc, device=device)
    _segment_sum_kernel[(batch, len(tensors))](partials, seg_start_t, seg_end_t, out,
                                               n_items, len(tensors), BLOCK=SEGMENT_BLOCK)
    return out if per_tensor else out.sum(dim=1)


def per_sample_sumsq(tensors: Sequence[torch.Tensor], per_tensor: bool = False, impl: str = "auto") -> torch.Tensor:
    """[B, ...] tensors -> float32 [B] (or [B, len(tensors)] with ``per_tensor=True``).

    ``impl``: "auto" (Triton on CUDA, reference on CPU), "triton" or "torch". Float64 inputs
    give float64. Example: ``per_sample_sumsq([gw, gb], per_tensor=True)  # -> [B, 2]``.
    """
    tensors = list(tensors)
    _check(tensors)
    if not use_triton(impl, tensors, _per_sample_sumsq_kernel, "per_sample_sumsq"):
        return per_sample_sumsq_reference(tensors, per_tensor=per_tensor)
    if tensors[0].is_cuda and is_interpreted(_per_sample_sumsq_kernel):
        # The interpreter reads raw host addresses from the pointer table: run on CPU copies.
        return _per_sample_sumsq_triton([t.cpu() for t in tensors], per_tensor).to(tensors[0].device)
    return run_with_fallback(impl, "per_sample_sumsq", lambda: _per_sample_sumsq_triton(tensors, per_tensor),
                             lambda: per_sample_sumsq_reference(tensors, per_tensor=per_tensor))
