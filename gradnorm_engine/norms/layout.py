"""Where the samples are in each tensor of a batched forward: the sample layout.

A tensor computed from a batch of B samples has the layout ``(dim, inner)``: along ``dim``, of
size outer * B * inner, index i belongs to sample ``(i // inner) % B``; every other dim is free
of samples. The model's inputs are ``(0, 1)``. Views that merge the batch with its neighbours
fold it: ``x.view(-1, d)`` on [B, T, d] gives ``(0, T)`` (rows b-major), nn.MultiheadAttention's
[T, B, E] -> [T*B, E] gives ``(0, 1)`` with outer T (rows t-major), Swin's windows [B*nW, N, C]
``(0, nW)``. Shapes alone cannot tell these apart; the row-major factorisation of each view can.

A tensor has one of
  None            no sample in it: a constant, a parameter, a tensor computed from those only
  (dim, inner)    a layout
  Unknown(op)     the samples went where the tracker cannot follow: ``op`` is not known to keep
                  each sample's entries apart (a flip, sort or index_select along the batch dim
                  would hand one sample's gradient to another), or it reduces over the batch.

    lay = propagate(name, args, kwargs, batched, out, B)   # the layout of an op's output
    rows = regroup(t, lay, B)                               # [B, ...]: the samples on a new dim 0

Only ops on a whitelist propagate a layout (pointwise ops, reshapes, permutes, indexing,
reductions and ``dim=`` ops away from the batch dim, linear / layer_norm on the feature dims,
convolutions and pools with the batch at dim 0, matmuls and attention with the batch outside the
matrix dims); every other op gives Unknown, and a parameter op reading an Unknown tensor is left
to the exact fallback. The functions are pure: they read shapes and arguments, never data, except
that an advanced index on the batch dim is accepted when it is ``arange(B)`` (Hugging Face's
padding masks), which is checked on its values.
"""
from __future__ import annotations

import math

import torch



class Unknown:
    """A tensor whose samples the tracker lost, and the op where it lost them."""

    __slots__ = ("op", "why")

    def __init__(self, op: str, why: str = ""):
        self.op, self.why = op, why

    def __repr__(self) -> str:
        return f"Unknown({self.op!r}{', ' + repr(self.why) if self.why else ''})"

    def describe(self) -> str:
        return f"`{self.op}`" + (f" ({self.why})" if self.why else "")


def is_unknown(lay) -> bool:
    return isinstance(lay, Unknown)


# --------------------------------------------------------------------------- layout arithmetic

def _dim(d, n: int) -> int:
    d = int(d)
    return d + n if d < 0 else d


def _dims(d) -> tuple | None:
    if d is None:
        return None
    if isinstance(d, (list, tuple, torch.Size)):
        return tuple(int(x) for x in d)
    return (int(d),)


def reshape_layout(src_shape, lay, dst_shape, B: int):
    """The layout after a row-major reshape of a ``src_shape`` tensor with layout ``lay``.

    An element at linear index L belongs to sample (L // Q) % B with Q = inner * prod(src[k+1:]).
    In the new shape, with D_j = prod(dst[j+1:]), the samples sit along the dim j with
    D_j <= Q < D_{j-1}, as (j, Q / D_j), when Q / D_j is whole and dst[j] holds whole
    periods (a multiple of B * Q / D_j); otherwise no dim carries them on its own.
    """
    k, inner = lay
    q = math.prod(src_shape[k + 1:]) * inner
    n = len(dst_shape)
    below = 1                                   # D_j, from the last dim up
    for j in range(n - 1, -1, -1):
        above = below * dst_shape[j]            # D_{j-1}
        if below <= q and (j == 0 or q < above):
            if q % below:
                return Unknown("reshape", "splits a sample's entries")
            c = q // below
            if dst_shape[j] % (c * B):
                return Unknown("reshape", "splits the batch")
            return (j, c)
        below = above
    return Unknown("reshape", "no dim holds the batch")


def align(lay, t: torch.Tensor, out: torch.Tensor):
    """``t``'s layout in ``out`` when ``t`` is broadcast to ``out`` (trailing dims aligned)."""
    k, inner = lay
    p = out.dim() - t.dim() + k
    if 0 <= p < out.dim() and out.shape[p] == t.shape[k]:
        return (p, inner)
    return Unknown("broadcast", "the batch dim changed size")


def regroup(t: torch.Tensor, lay, B: int) -> torch.Tensor:
    """The samples of ``t`` (layout ``lay``) on a new dim 0: [..., outer*B*inner, ...] ->
    [B, ..., outer, inner, ...] (or [B, ...] when the batch dim is not folded); a view when it can."""
    k, inner = lay
    outer = t.shape[k] // (B * inner)
    if outer == 1 and inner == 1:
        return t.movedim(k, 0) if k else t
    t = t.reshape(*t.shape[:k], outer, B, inner, *t.shape[k + 1:])
    return t.movedim(k + 1, 0)


def rows(t: torch.Tensor, lay, B: int, width: int) -> torch.Tensor:
    """[B, T, width]: each sample's positions (every dim but the batch and the last) in a row."""
    if lay[0] == t.dim() - 1:
        raise ValueError("the batch is the feature dim")
    return regroup(t, lay, B).reshape(B, -1, width)


# --------------------------------------------------------------------------- propagation

class _Op:
    """One op's arguments, as the handlers below read them."""

    __slots__ = ("name", "args", "kwargs", "batched", "out", "B", "main", "lay")

    def __init__(self, name, args, kwargs, batched, out, B):
        self.name, self.args, self.kwargs, self.batched, self.out, self.B = name, args, kwargs, batched, out, B
        self.main = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.lay = self.layout_of(self.main) if self.main is not None else None

    def layout_of(self, t):
        for u, lay in self.batched:
            if u is t:
                return lay
        return None

    def arg(self, pos: int, name: str, default=None):
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[pos] if len(self.args) > pos else default

    def unknown(self, why: str = "") -> Unknown:
        return Unknown(self.name, why)

    def agree(self):
        """Every batched operand broadcast to the output, all on one layout (pointwise ops)."""
        found = None
        for t, lay in self.batched:
            here = align(lay, t, self.out)
            if is_unknown(here):
                return self.unknown("the batch dim is broadcast")
            if found is not None and here != found:
                return self.unknown("operands disagree on where the samples are")
            found = here
        return found


def propagate(name: str, args: tuple, kwargs: dict, batched: list, out, B: int):
    """The layout of ``out`` (a list of layouts for a tuple/list of outputs).

    batched: (tensor, layout) for every tensor argument with a layout, Unknown included; an
    Unknown input gives its own Unknown (so the op that first lost the samples is named).
    """
    for _, lay in batched:
        if is_unknown(lay):
            return lay
    op = _Op(name, args, kwargs, batched, out, B)
    if isinstance(out, (tuple, list)):
        split = SPLITS.get(name)
        if split is not None and op.lay is not None:
            return split(op)
        results = []
        for o in out:
            if isinstance(o, torch.Tensor):
                op.out = o
                results.append(_one(op))
            else:
                results.append(None)
        return results
    if not isinstance(out, torch.Tensor):
        return None
    return _one(op)


def _one(op: _Op):
    handler = HANDLERS.get(op.name)
    if handler is None:
        return op.unknown("not known to keep the samples apart")
    try:
        return handler(op)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError, RuntimeError) as err:
        return op.unknown(f"arguments the tracker does not parse: {type(err).__name__}")


def _reshape(op: _Op):
    if op.lay is None:
        return op.agree()
    return reshape_layout(tuple(op.main.shape), op.lay, tuple(op.out.shape), op.B)


def _permutation(op: _Op) -> list[int]:
    n = op.main.dim()
    name = op.name
    if name == "permute":
        dims = op.args[1:] if len(op.args) > 1 else op.kwargs["dims"]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
            dims = dims[0]
        return [_dim(d, n) for d in dims]
    if name in ("t", "T", "numpy_T"):
        return list(range(n))[::-1]
    if name in ("mT", "mH", "adjoint"):
        order = list(range(n))
        order[-1], order[-2] = order[-2], order[-1]
        return order
    if name in ("transpose", "swapaxes", "swapdims"):
        a = _dim(op.arg(1, "dim0"), n)
        b = _dim(op.arg(2, "dim1"), n)
        order = list(range(n))
        order[a], order[b] = order[b], order[a]
        return order
    # movedim / moveaxis
    src = [_dim(s, n) for s in _dims(op.arg(1, "source"))]
    dst = [_dim(d, n) for d in _dims(op.arg(2, "destination"))]
    order = [None] * n
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter([i for i in range(n) if i not in src])
    return [o if o is not None else next(rest) for o in order]


def _permute(op: _Op):
    if op.lay is None:
        return op.agree()
    return (_permutation(op).index(op.lay[0]), op.lay[1])


def _squeeze(op: _Op):
    if op.lay is None:
        return op.agree()
    x, (k, inner) = op.main, op.lay
    n = x.dim()
    if op.name in ("unsqueeze", "unsqueeze_"):
        d = _dim(op.arg(1, "dim"), n + 1)
        return (k + 1 if d <= k else k, inner)
    d = op.arg(1, "dim")
    removed = [i for i in range(n) if x.shape[i] == 1] if d is None else \
        [_dim(i, n) for i in _dims(d) if x.shape[_dim(i, n)] == 1]
    if k in removed:
        return op.unknown("squeezes the batch dim")
    return (k - sum(1 for r in removed if r < k), inner)


def _same_shape(op: _Op):
    """expand, clone, casts: the main operand broadcast to the output."""
    if op.lay is None:
        return op.agree()
    return align(op.lay, op.main, op.out)


def _pointwise(op: _Op):
    if op.name in ("max", "min") and not (len(op.args) > 1 and isinstance(op.args[1], torch.Tensor)):
        return _reduction(op)
    return op.agree()


def _reduction(op: _Op):
    if op.lay is None:
        return op.agree()
    x, (k, inner) = op.main, op.lay
    d = op.arg(2 if op.name == "norm" and "p" not in op.kwargs else 1, "dim")
    if op.name == "norm" and len(op.args) == 2 and "p" not in op.kwargs:
        d = None                              # x.norm(p): every dim
    if d is None or (isinstance(d, (list, tuple)) and len(d) == 0):
        return op.unknown("reduces over every dim, the batch included")
    dims = [_dim(i, x.dim()) for i in _dims(d)]
    if k in dims:
        return op.unknown("reduces over the batch dim")
    if op.out.dim() == x.dim():              # keepdim (read from the shapes: positions differ by op)
        return (k, inner)
    return (k - sum(1 for i in dims if i < k), inner)


def _along_dim(pos: int, default, name: str = "dim"):
    """An op acting along one dim (softmax, cumsum, flip, topk ...): fine unless it is the batch dim."""
    def handler(op: _Op):
        if op.lay is None or len(op.batched) != 1:
            return op.unknown("a second operand is batched")
        d = op.arg(pos, name, default)
        if d is None:
            return op.unknown("acts along an unspecified dim")
        if op.lay[0] in [_dim(i, op.main.dim()) for i in _dims(d)]:
            return op.unknown("acts along the batch dim")
        if op.out.dim() == op.main.dim():
            return (op.lay[0], op.lay[1])   # same dims (sizes along d may change: topk, index_select)
        return op.agree()
    return handler


def _index_select(op: _Op):
    """index_select(x, dim, index): along a non-batch dim of a batched x, or a batch-free x (a table)
    looked up with batched ids [N]: the output's dim ``dim`` holds the ids' samples."""
    index = op.arg(2, "index")
    i_lay = op.layout_of(index)
    if i_lay is None:
        return _INDEX_SELECT_ALONG(op)
    if op.lay is not None or index.dim() != 1:
        return op.unknown("input and index both batched")
    return (_dim(op.arg(1, "dim"), op.main.dim()), i_lay[1])


def _select(op: _Op):
    if op.lay is None:
        return op.agree()
    d = _dim(op.arg(1, "dim"), op.main.dim())
    if d == op.lay[0]:
        return op.unknown("selects along the batch dim")
    if op.name == "select":
        return (op.lay[0] - (1 if d < op.lay[0] else 0), op.lay[1])
    return op.lay


def _roll(op: _Op):
    if op.lay is None:
        return op.agree()
    dims = _dims(op.arg(2, "dims"))
    if dims is None or op.lay[0] in [_dim(i, op.main.dim()) for i in dims]:
        return op.unknown("rolls along the batch dim")
    return op.lay


def _pad(op: _Op):
    if op.lay is None:
        return op.agree()
    x = op.main
    pad = op.arg(1, "pad")
    k = op.lay[0]
    j = x.dim() - 1 - k                      # pad[2j], pad[2j+1] pad dim k
    if 2 * j + 1 < len(pad) and (pad[2 * j] or pad[2 * j + 1]):
        return op.unknown("pads the batch dim")
    return op.lay


def _repeat(op: _Op):
    """x.repeat(sizes) tiles x: every tile keeps the batch's period, so only leading dims shift."""
    if op.lay is None:
        return op.agree()
    return (op.lay[0] + op.out.dim() - op.main.dim(), op.lay[1])


def _unfold_window(op: _Op):
    """Tensor.unfold(dim, size, step): windows along a non-batch dim, appended as a new last dim."""
    if op.lay is None:
        return op.agree()
    if _dim(op.arg(1, "dimension"), op.main.dim()) == op.lay[0]:
        return op.unknown("windows along the batch dim")
    return op.lay


def _gather(op: _Op):
    x_lay = op.lay
    index = op.arg(2, "index")
    i_lay = op.layout_of(index)
    ref = op.main if x_lay is not None else index
    lay = x_lay if x_lay is not None else i_lay
    d = _dim(op.arg(1, "dim"), ref.dim())
    if x_lay is not None and d == x_lay[0]:
        return op.unknown("gathers along the batch dim")   # (a batch-free table gathered by batched ids is fine)
    if x_lay is not None and i_lay is not None and x_lay != i_lay:
        return op.unknown("input and index disagree on where the samples are")
    if op.out.shape[lay[0]] != ref.shape[lay[0]]:
        return op.unknown("the index does not keep every sample")
    return lay


def _cat(op: _Op):
    tensors = op.arg(0, "tensors")
    d = op.arg(1, "dim", 0)
    lays = {lay for t in tensors if (lay := op.layout_of(t)) is not None}
    if len(lays) != 1:
        return op.unknown("operands disagree on where the samples are")
    lay = lays.pop()
    ref = next(t for t in tensors if op.layout_of(t) is not None)
    if op.name == "stack":
        d = _dim(d, ref.dim() + 1)
        return (lay[0] + (1 if d <= lay[0] else 0), lay[1])
    if _dim(d, ref.dim()) == lay[0]:
        return op.unknown("concatenates along the batch dim")
    return lay


def _embedding(op: _Op):
    ids = op.arg(0, "input")
    lay = op.layout_of(ids)
    if lay is None or op.layout_of(op.arg(1, "weight")) is not None:
        return op.unknown("the table is batched")
    return lay                                # [*ids, d]: the ids' dims, one feature dim appended


def _unreduced(op: _Op) -> bool:
    return op.kwargs.get("reduction") == "none" and op.kwargs.get("size_average") is None \
        and op.kwargs.get("reduce") is None


def _class_loss(op: _Op):
    """cross_entropy / nll_loss with reduction="none": input [N, C, *d], target [N, *d] (or
    probabilities [N, C, *d]) -> [N, *d]; one loss per row of the input and target."""
    if not _unreduced(op):
        return op.unknown("reduces over the batch")
    x, target = op.arg(0, "input"), op.arg(1, "target")
    found = set()
    for t, lay in op.batched:
        if t is x:
            if x.dim() < 2 or lay[0] == 1:
                return op.unknown("the batch is the class dim")
            found.add((lay[0] - (1 if lay[0] > 1 else 0), lay[1]))
        elif t is target:
            if target.dim() == x.dim():                    # class probabilities, laid out as the input
                if lay[0] == 1:
                    return op.unknown("the batch is the class dim")
                found.add((lay[0] - (1 if lay[0] > 1 else 0), lay[1]))
            else:
                found.add(lay)
        else:
            return op.unknown("a class weight is batched")
    if len(found) != 1:
        return op.unknown("input and target disagree on where the samples are")
    return found.pop()


def _pointwise_loss(op: _Op):
    """Elementwise losses with reduction="none" (mse, l1, binary cross-entropy, ...)."""
    if not _unreduced(op):
        return op.unknown("reduces over the batch")
    return op.agree()


def _one_hot(op: _Op):
    return op.lay if op.lay is not None else op.agree()


def _linear(op: _Op):
    if op.lay is None or op.lay[0] == op.main.dim() - 1 or len(op.batched) != 1:
        return op.unknown("the batch is the feature dim, or the weight is batched")
    return op.agree()


def _normalise_trailing(op: _Op):
    shape = op.arg(1, "normalized_shape")
    n = 1 if isinstance(shape, int) else len(shape)
    if op.lay is None or op.lay[0] >= op.main.dim() - n or len(op.batched) != 1:
        return op.unknown("normalises over the batch dim")
    return op.agree()


def _batch_first(op: _Op):
    """Convolutions, pools, per-item normalisations: dim 0 holds independent items, so a batch
    at dim 0 (folded or not) stays there; a batch anywhere else is mixed across channels."""
    if op.lay is None or op.lay[0] != 0 or len(op.batched) != 1 or op.out.dim() == 0 \
            or op.out.shape[0] != op.main.shape[0]:
        return op.unknown("the batch is not dim 0, or a second operand is batched")
    if op.name == "batch_norm" and (op.arg(5, "training", False) or op.arg(1, "running_mean") is None):
        return op.unknown("normalises with batch statistics")
    return (0, op.lay[1])


def _attention(op: _Op):
    for t, lay in op.batched:
        if lay[0] >= t.dim() - 2:
            return op.unknown("the batch is a matrix dim")
    return op.agree()


def _matmul(first: int, second: int):
    def handler(op: _Op):
        for t, lay in op.batched:
            if t is _at(op.args, first) and lay[0] == t.dim() - 1:
                return op.unknown("contracts over the batch dim")
            if t is _at(op.args, second) and (t.dim() < 2 or lay[0] == t.dim() - 2):
                return op.unknown("contracts over the batch dim")
        return op.agree()
    return handler


def _at(args, i):
    return args[i] if len(args) > i else None


def _einsum(op: _Op):
    equation = op.args[0]
    operands = op.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    if "->" not in equation or "." in equation:
        return op.unknown("implicit output or ellipsis")
    lhs, rhs = equation.replace(" ", "").split("->")
    found = set()
    for term, t in zip(lhs.split(","), operands):
        lay = op.layout_of(t)
        if lay is None:
            continue
        letter = term[lay[0]]
        if letter not in rhs:
            return op.unknown("contracts over the batch dim")
        found.add((rhs.index(letter), lay[1]))
    return found.pop() if len(found) == 1 else op.unknown("operands disagree on where the samples are")


def _advanced_positions(index: tuple, x: torch.Tensor):
    """Basic/advanced indexing of ``x``: (per input dim: the index entry, one per dim), or None
    for forms the tracker does not parse (bool masks consume several dims: left to Unknown)."""
    index = index if isinstance(index, tuple) else (index,)
    n = x.dim()

    def consumed(i):
        return 0 if i is None or i is Ellipsis else 1
    if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
        return None
    if any(i is Ellipsis for i in index):
        e = next(j for j, i in enumerate(index) if i is Ellipsis)
        rest = n - sum(consumed(i) for i in index)
        index = index[:e] + (slice(None),) * rest + index[e + 1:]
    return index + (slice(None),) * (n - sum(consumed(i) for i in index))


def _is_advanced(i) -> bool:
    if isinstance(i, torch.Tensor):
        return i.dim() > 0
    return isinstance(i, list)


def _getitem(op: _Op):
    """x[index]: ints, slices, None, Ellipsis and integer tensor indices (torch's rules for where
    the advanced-index dims go: in place when the advanced indices are adjacent, first otherwise)."""
    x = op.main
    index = _advanced_positions(op.args[1], x)
    if index is None:
        return op.unknown("a boolean mask index")
    advanced = [_is_advanced(i) for i in index]
    if any(advanced) and any(not a and i is not None and not isinstance(i, slice) for i, a in zip(index, advanced)):
        return op.unknown("ints mixed with tensor indices")
    positions = [j for j, a in enumerate(advanced) if a]
    adjacent = positions == list(range(positions[0], positions[-1] + 1)) if positions else True
    shapes = [tuple(i.shape) if isinstance(i, torch.Tensor) else (len(i),) for i in index if _is_advanced(i)]
    bshape = torch.broadcast_shapes(*shapes) if shapes else ()
    # output dim of each kept input dim, and where the broadcast index dims start
    out_dim, in_dim, adv_start, kept = 0, 0, None, {}
    if positions and not adjacent:
        adv_start, out_dim = 0, len(bshape)
    for i, adv in zip(index, advanced):
        if i is None:
            out_dim += 1
        elif adv:
            if adv_start is None:
                adv_start = out_dim
                out_dim += len(bshape)
            in_dim += 1
        elif isinstance(i, slice):
            kept[in_dim] = out_dim
            in_dim += 1
            out_dim += 1
        else:
            in_dim += 1                       # an int: the dim goes
    found = set()
    if op.lay is not None:
        k, inner = op.lay
        entry = index[_index_of_dim(index, k)]
        if advanced[_index_of_dim(index, k)]:
            # only arange(B) along one broadcast dim keeps sample b in row b (HF's padding masks)
            j = None if inner != 1 or x.shape[k] != op.B or not isinstance(entry, torch.Tensor) \
                else _arange_dim(entry, bshape, op.B)
            if j is None:
                return op.unknown("indexes the batch dim")
            found.add((adv_start + j, 1))
        elif isinstance(entry, slice):
            if not _full(entry, x.shape[k]):
                return op.unknown("slices the batch dim")
            found.add((kept[k], inner))
        else:
            return op.unknown("picks one entry of the batch dim")
    for i in index:
        lay = op.layout_of(i) if isinstance(i, torch.Tensor) else None
        if lay is not None:                   # a batched index: its batch dim, where it broadcasts to
            p = len(bshape) - i.dim() + lay[0]
            if bshape[p] != i.shape[lay[0]]:
                return op.unknown("a batched index broadcast along its batch dim")
            found.add((adv_start + p, lay[1]))
    if len(found) != 1:
        return op.unknown("the batch dim of x and of its index disagree")
    lay = found.pop()
    if lay[0] >= op.out.dim():
        return op.unknown()
    return lay


def _index_of_dim(index: tuple, dim: int) -> int:
    """The position in ``index`` of the entry that indexes input dim ``dim``."""
    d = 0
    for j, i in enumerate(index):
        if i is None:
            continue
        if d == dim:
            return j
        d += 1
    raise IndexError(dim)


def _full(s: slice, size: int) -> bool:
    return s.start in (None, 0) and s.step in (None, 1) and (s.stop is None or
                                                           (isinstance(s.stop, int) and s.stop >= size))


def _arange_dim(index: torch.Tensor, shape, B: int):
    """The dim of the broadcast index shape along which ``index`` is arange(B) and constant
    along every other dim, or None."""
    if index.numel() > 1 << 20 or index.dtype == torch.bool:
        return None
    full = index.expand(shape)
    for j, n in enumerate(shape):
        if n != B:
            continue
        view = [1] * len(shape)
        view[j] = B
        if torch.equal(full, torch.arange(B, device=index.device).view(view).expand(shape)):
            return j
    return None


def _split(op: _Op):
    n = op.main.dim()
    k, inner = op.lay
    d = _dim(op.arg(1, "dim", 0) if op.name == "unbind" else op.arg(2, "dim", 0), n)
    if d == k:
        return [op.unknown("splits along the batch dim")] * len(op.out)
    if op.name == "unbind":
        return [(k - (1 if d < k else 0), inner)] * len(op.out)
    return [(k, inner)] * len(op.out)


SPLITS = {name: _split for name in ("split", "chunk", "unbind", "tensor_split", "split_with_sizes", "hsplit",
                                    "vsplit")}

_POINTWISE = """add sub mul div true_divide pow neg exp exp2 log log2 log10 log1p expm1 sqrt rsqrt tanh sigmoid
relu gelu silu softplus elu selu celu leaky_relu hardswish hardsigmoid hardtanh relu6 mish clamp clamp_min clamp_max
clip abs sign sgn where masked_fill lerp addcmul addcdiv maximum minimum fmax fmin eq ne lt le gt ge logical_and
logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_not bitwise_xor to type_as float double half
bfloat16 int long bool byte short contiguous clone detach dropout dropout1d dropout2d dropout3d alpha_dropout
feature_alpha_dropout erf erfc erfinv sin cos tan asin acos atan sinh cosh asinh acosh atanh reciprocal square floor
ceil round trunc frac zeros_like ones_like empty_like full_like rand_like randn_like nan_to_num threshold logsigmoid
tanhshrink softsign hardshrink softshrink fmod remainder floor_divide atan2 hypot isnan isinf isfinite copy fill
zero max min xlogy sinc cpu cuda""".split()
POINTWISE = set(_POINTWISE) | {n + "_" for n in _POINTWISE} | {
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__neg__", "__pos__", "__pow__", "__rpow__", "__ipow__",
    "__and__", "__rand__", "__iand__", "__or__", "__ror__", "__ior__", "__xor__", "__rxor__", "__ixor__",
    "__invert__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__floordiv__", "__rfloordiv__",
    "__ifloordiv__", "__mod__", "__rmod__", "__imod__", "__abs__"}
RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "ravel", "_unsafe_view"}
PERMUTES = {"permute", "transpose", "transpose_", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "t_", "T",
            "mT", "mH", "adjoint", "numpy_T"}
SAME_SHAPE = {"expand", "expand_as", "broadcast_to", "contiguous", "clone", "detach", "requires_grad_"}
REDUCTIONS = {"sum", "mean", "amax", "amin", "argmax", "argmin", "prod", "var", "std", "norm", "logsumexp", "all",
              "any", "nansum", "nanmean", "count_nonzero", "median", "nanmedian", "var_mean", "std_mean", "aminmax",
              "mode"}
BATCH_FIRST = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "max_pool1d",
               "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
               "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
               "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "lp_pool3d", "interpolate", "upsample",
               "upsample_nearest", "upsample_bilinear", "grid_sample", "batch_norm", "instance_norm", "group_norm",
               "pixel_shuffle", "pixel_unshuffle", "embedding_bag", "prelu", "local_response_norm",
               "max_pool2d_with_indices", "max_pool1d_with_indices", "max_pool3d_with_indices", "channel_shuffle",
               "unfold", "fold", "fractional_max_pool2d", "alpha_dropout"}
# ops along one dim: name -> (position of the dim argument, its default, its keyword)
ALONG_DIM = {"softmax": (1, None, "dim"), "log_softmax": (1, None, "dim"), "softmin": (1, None, "dim"),
             "normalize": (2, 1, "dim"), "glu": (1, -1, "dim"), "cumsum": (1, None, "dim"),
             "cumprod": (1, None, "dim"), "cummax": (1, None, "dim"), "cummin": (1, None, "dim"),
             "logcumsumexp": (1, None, "dim"), "flip": (1, None, "dims"), "topk": (2, -1, "dim"),
             "sort": (1, -1, "dim"), "argsort": (1, -1, "dim"), "diff": (2, -1, "dim")}
# index_select with batch-free ids acts along one dim (with batched ids: _index_select)
_INDEX_SELECT_ALONG = _along_dim(1, None)
# name -> (position of the left operand, position of the right operand)
MATMULS = {"matmul": (0, 1), "__matmul__": (0, 1), "__rmatmul__": (1, 0), "mm": (0, 1), "bmm": (0, 1),
           "baddbmm": (1, 2), "addmm": (1, 2), "addbmm": (1, 2), "mv": (0, 1), "dot": (0, 1), "inner": (0, 1)}

HANDLERS: dict = {}
HANDLERS.update({n: _pointwise for n in POINTWISE})
HANDLERS.update({n: _reshape for n in RESHAPES})
HANDLERS.update({n: _permute for n in PERMUTES})
HANDLERS.update({n: _same_shape for n in SAME_SHAPE})
HANDLERS.update({n: _reduction for n in REDUCTIONS})
HANDLERS.update({n: _batch_first for n in BATCH_FIRST})
HANDLERS.update({n: _along_dim(*spec) for n, spec in ALONG_DIM.items()})
HANDLERS.update({n: _matmul(*spec) for n, spec in MATMULS.items()})
HANDLERS["index_select"] = _index_select
HANDLERS.update({
    "unsqueeze": _squeeze, "unsqueeze_": _squeeze, "squeeze": _squeeze, "squeeze_": _squeeze,
    "__getitem__": _getitem, "select": _select, "narrow": _select, "roll": _roll, "pad": _pad,
    "repeat": _repeat, "tile": _repeat, "gather": _gather, "Tensor.unfold": _unfold_window,
    "cat": _cat, "concat": _cat, "concatenate": _cat, "stack": _cat,
    "cross_entropy": _class_loss, "nll_loss": _class_loss,
    "mse_loss": _pointwise_loss, "l1_loss": _pointwise_loss, "smooth_l1_loss": _pointwise_loss,
    "huber_loss": _pointwise_loss, "binary_cross_entropy": _pointwise_loss,
    "binary_cross_entropy_with_logits": _pointwise_loss, "kl_div": _pointwise_loss,
    "soft_margin_loss": _pointwise_loss,
    "embedding": _embedding, "one_hot": _one_hot, "einsum": _einsum,
    "linear": _linear, "layer_norm": _normalise_trailing, "rms_norm": _normalise_trailing,
    "scaled_dot_product_attention": _attention, "tril": _attention, "triu": _attention, "tril_": _attention,
    "triu_": _attention,
})
