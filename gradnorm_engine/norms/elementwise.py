"""A parameter broadcast against batched data: x + p, x - p, x * p, x / p (and p / x, the in-place
and reflected forms), p.expand(B, ...) / p.expand_as(x).

Position embeddings (x + pos), class tokens (cls.expand(B, -1, -1)), layer scales (gamma * x),
Swin's relative-position bias (attn + bias, derived from its table), Hugging Face's RMSNorm
(weight * x): p is broadcast along the batch dim, so with the output gradient g

    d loss_b / d p = sum over the entries of sample b that read p[i] of  local_b

with local = g (add; -g for the subtracted operand), g * other (mul), g / other (the numerator of
a division) or -g * other / p^2 (the denominator). The sum runs over every dim p is broadcast
along, for each sample's own entries, wherever the layout puts them (Swin's bias on
[B*nW, H, N, N] sums over the nW windows of each sample).
"""
from __future__ import annotations

import torch

from .layout import regroup
from .ops import OpCall, per_sample_result, register_op_rule
from .registry import accum_dtype

# name -> (operation, reflected): reflected means result = args[1] (op) args[0]
ARITHMETIC: dict[str, tuple[str, bool]] = {}
for _op, _names in {"add": ("add", "add_", "__add__", "__iadd__"), "sub": ("sub", "sub_", "__sub__", "__isub__"),
                    "mul": ("mul", "mul_", "__mul__", "__imul__"),
                    "div": ("div", "div_", "__truediv__", "__itruediv__", "true_divide")}.items():
    for _n in _names:
        ARITHMETIC[_n] = (_op, False)
for _n, _op in (("__radd__", "add"), ("__rsub__", "sub"), ("__rmul__", "mul"), ("__rtruediv__", "div")):
    ARITHMETIC[_n] = (_op, True)


def sum_to_operand(local: torch.Tensor, lay, batch: int, shape) -> torch.Tensor:
    """Each sample's sum of ``local`` (the output's shape, samples along ``lay``) over the dims an
    operand of ``shape`` is broadcast along.  -> [B, *shape]"""
    n = local.dim()
    k = lay[0]
    aligned = (1,) * (n - len(shape)) + tuple(shape)
    grouped = regroup(local, lay, batch)            # [B, ..., outer, inner, ...] or [B, ...]
    if grouped.dim() == n + 2:                      # folded: dims < k, outer, inner, dims > k
        sizes = [*aligned[:k], 1, 1, *aligned[k + 1:]]
    else:
        sizes = [aligned[i] for i in range(n) if i != k]
    dims = [i + 1 for i, s in enumerate(sizes) if s == 1 and grouped.shape[i + 1] != 1]
    return (grouped.sum(dim=dims, keepdim=True) if dims else grouped).reshape(batch, *shape)


def _broadcast_check(call: OpCall, pos) -> str | None:
    p = call.pins[pos]
    n = len(call.out_shape)
    if p.dim() > n:
        return "the parameter input has more dims than the output"
    aligned = (1,) * (n - p.dim()) + tuple(p.shape)
    if aligned[call.out_lay[0]] != 1:
        return "the parameter input varies along the batch dim"
    return None


def _arithmetic_check(call: OpCall) -> str | None:
    if len(call.args) != 2 or set(call.kwargs) - {"alpha"}:
        return "arguments beyond the two operands"
    for pos in call.pins:
        if pos not in (0, 1):
            return "a parameter input outside the operands"
        problem = _broadcast_check(call, pos)
        if problem:
            return problem
    return None


def _local_gradient(call: OpCall, pos: int, grad: torch.Tensor) -> torch.Tensor:
    """d (a op b) / d (operand ``pos``), times g, in the output's shape."""
    op, reflected = ARITHMETIC[call.name]
    first, second = (1, 0) if reflected else (0, 1)    # result = args[first] op args[second]
    alpha = call.kwargs.get("alpha", 1)
    acc = accum_dtype(grad)
    g = grad.to(acc)

    def value(i):
        if i == 0 and call.saved is not None:
            return call.saved                            # an in-place op overwrote args[0]
        v = call.args[i]
        return v.to(acc) if isinstance(v, torch.Tensor) else v
    if op == "add":
        local = g * alpha if pos == second and alpha != 1 else g
    elif op == "sub":
        local = g if pos == first else -alpha * g
    elif op == "mul":
        local = g * value(second if pos == first else first)
    elif pos == first:
        local = g / value(second)
    else:
        local = -g * value(first) / value(second).pow(2)
    return local if tuple(local.shape) == tuple(call.out_shape) else local.expand(call.out_shape)


def _arithmetic(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    return {pos: per_sample_result(sum_to_operand(_local_gradient(call, pos, grad), call.out_lay, call.batch,
                                                  call.pins[pos].shape), wants_norm(pos))
            for pos in call.pins}


_ADDITIVE = [n for n, (op, _) in ARITHMETIC.items() if op in ("add", "sub")]
_PRODUCTS = [n for n, (op, _) in ARITHMETIC.items() if op in ("mul", "div")]

# add/sub read only shapes: the recording keeps no operand for them
additive_op = register_op_rule(*_ADDITIVE, signature=("input", "other"), check=_arithmetic_check,
                               form=lambda c, slot: "per-sample sum over the broadcast dims", keeps_args=False)(_arithmetic)
product_op = register_op_rule(*_PRODUCTS, signature=("input", "other"), check=_arithmetic_check,
                              form=lambda c, slot: "per-sample sum over the broadcast dims")(_arithmetic)


def _expand_check(call: OpCall) -> str | None:
    return _broadcast_check(call, 0) if 0 in call.pins else "the parameter is not the expanded tensor"


@register_op_rule("expand", "expand_as", "broadcast_to", check=_expand_check, keeps_args=False,
                  form=lambda c, slot: "per-sample copy (sum over the broadcast dims)")
def expand_op(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    """p.expand(B, ...): every sample reads its own copy of p."""
    summed = sum_to_operand(grad.to(accum_dtype(grad)), call.out_lay, call.batch, call.pins[0].shape)
    return {0: per_sample_result(summed, wants_norm(0))}
