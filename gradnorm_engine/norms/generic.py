"""The rule of every op without one of its own: vmap over the samples of the op's own vjp.

For an op y = f(x, theta) whose batched inputs carry the batch on a plain dim (not folded), sample
b's gradient of the op's parameter inputs is the vjp of f at (x_b, theta) with the output gradient
g_b: ``torch.func.vmap`` over b of ``torch.func.vjp``. That is the per-sample gradient itself
[B, *theta.shape] (materialised: B times the parameter's entries), from the op alone, never the
model. ConvTranspose, EmbeddingBag with per-sample weights, a table indexed with batched ids and
anything else a model calls on a parameter are scored this way.
"""
from __future__ import annotations

import warnings

import torch

from .ops import (GENERIC, INPLACE_DUNDERS, INPLACE_TWINS, OpCall, is_inplace, per_sample_result, register_op_rule,
                  unflatten_args)
from .registry import accum_dtype


def out_of_place(name: str, func):
    """The out-of-place twin of an in-place op (``mul_`` -> torch.mul), ``func`` itself when it is
    not in place, or None when there is none."""
    if name in INPLACE_TWINS:
        return getattr(torch, INPLACE_TWINS[name])
    if is_inplace(name) and name not in INPLACE_DUNDERS:
        return getattr(torch, name[:-1], None)
    return func


def check_unfolded(call: OpCall) -> str | None:
    for i, lay in call.flat_lays.items():
        if lay[1] != 1 or call.flat[i].shape[lay[0]] != call.batch:
            return "the generic rule needs the batch on a dim of its own (it is folded with others)"
    if call.out_lay[1] != 1 or call.out_shape[call.out_lay[0]] != call.batch:
        return "the generic rule needs the batch on a dim of its own (it is folded with others)"
    if call.func is None or out_of_place(call.name, call.func) is None:
        return f"an in-place op ({call.name}) without an out-of-place twin"
    return None


def generic_grads(call: OpCall, grad: torch.Tensor, slots: list) -> dict:
    """{slot: per-sample gradient [B, *shape]} of the parameter inputs at ``slots``."""
    func = out_of_place(call.name, call.func)
    flat = list(call.flat)
    if call.saved is not None:
        flat[0] = call.saved                       # the value an in-place op overwrote
    batched = sorted(call.flat_lays)
    dims = [call.flat_lays[i][0] for i in batched]
    positions = [call.pin_flat[s] for s in slots]
    params = [flat[i].detach() for i in positions]
    out_dim = call.out_lay[0]

    def one_sample(values, g):
        def f(*theta):
            inputs = list(flat)
            for i, d, v in zip(batched, dims, values):
                inputs[i] = v.unsqueeze(d)         # sample b alone: its batch dim of size 1
            for i, t in zip(positions, theta):
                inputs[i] = t
            args, kwargs = unflatten_args(inputs, call.spec)
            return func(*args, **kwargs)
        _, vjp = torch.func.vjp(f, *params)
        return vjp(g.unsqueeze(out_dim))

    with torch.enable_grad(), warnings.catch_warnings():
        # torch warns where an op has no batching rule and vmap loops over the samples: still exact
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads = torch.func.vmap(one_sample, in_dims=(dims, out_dim))([flat[i].detach() for i in batched],
                                                                    grad.detach())
    return {s: v.to(accum_dtype(v)) for s, v in zip(slots, grads)}


@register_op_rule(GENERIC, check=check_unfolded,
                  form=lambda c, slot: "generic: vmap of the op's vjp (materialises B x the parameter's entries)")
def generic_op(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    grads = generic_grads(call, grad, list(call.pins))
    return {s: per_sample_result(v, wants_norm(s)) for s, v in grads.items()}
