"""nn.Linear on inputs [B, d] or sequences [B, ..., d], and the ops that compute the same thing:
F.linear, torch.addmm (Hugging Face's Conv1D), x @ W / W @ x with a 2-D parameter W.

With a [B, T, d] (all dims but the batch and the features flattened into T) and g [B, T, p]:

    weight: ||sum_t g_t a_t^T||^2   (materialised or Gram form, whichever is cheaper)
    bias:   ||sum_t g_t||^2
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .forms import prefer_gram, weight_sqnorm
from .layout import rows
from .ops import OpCall, per_sample_result, register_op_rule
from .registry import accum_dtype, register_norm_rule, wants


@register_norm_rule(nn.Linear)
def linear_norms(layer: nn.Linear, inputs: tuple, grad_outputs: tuple) -> dict:
    g = grad_outputs[0]
    batch = g.shape[0]
    a = inputs[0].reshape(batch, -1, layer.in_features)     # (B, T, d)
    g = g.reshape(batch, -1, layer.out_features)            # (B, T, p)
    out = {}
    if wants(layer.weight):
        out[layer.weight] = weight_sqnorm(a, g)
    if wants(layer.bias):
        out[layer.bias] = g.to(accum_dtype(g, layer.bias)).sum(dim=1).pow(2).sum(dim=1)
    return out


# --------------------------------------------------------------------------- op rules
# The same maths on a recorded op: F.linear / torch.addmm (Hugging Face's Conv1D: x @ W + b on
# x.view(-1, d)) / x @ W and W @ x with a 2-D parameter W. The sample rows are first regrouped
# from wherever the layout puts them (sequence-first, folded into x.view(-1, d), windows), so
# a_b [T, d] and g_b [T, p] hold every position of sample b.

def linear_like(call: OpCall, a: torch.Tensor, g: torch.Tensor, wants_norm, weight, bias=None,
                transposed: bool = False) -> dict:
    """{weight slot: ||sum_t g_t a_t^T||^2 or the gradient itself, bias slot: ||sum_t g_t||^2 or
    sum_t g_t}, for a [B, T, d] and g [B, T, p]; ``transposed``: the weight is stored [d, p]."""
    out = {}
    acc = accum_dtype(a, g)
    if weight in call.pins:
        if wants_norm(weight):
            out[weight] = weight_sqnorm(a, g)
        else:
            grad = torch.bmm(g.to(acc).transpose(1, 2), a.to(acc))                     # (B, p, d)
            out[weight] = grad.transpose(1, 2) if transposed else grad
    if bias is not None and bias in call.pins:
        summed = g.to(acc).sum(dim=1)
        out[bias] = per_sample_result(summed, wants_norm(bias)).reshape(
            (-1,) if wants_norm(bias) else (summed.shape[0], *call.pins[bias].shape))
    return out


BIAS_FORM = "sum over the positions"


def linear_form(positions: int, out_features: int, in_features: int) -> str:
    if positions == 1:
        form = "rank one"
    else:
        form = "gram" if prefer_gram(positions, out_features, in_features) else "materialise"
    return f"{form} (T={positions}, p={out_features}, d={in_features})"


def _linear_check(call: OpCall) -> str | None:
    x, w = call.arg(0), call.arg(1)
    if call.lay(0) is None or call.lay(1) is not None or (call.arg(2) is not None and call.lay(2) is not None):
        return "only the input may be batched"
    if call.lay(0)[0] == x.dim() - 1:
        return "the batch is the feature dim"
    if w.dim() != 2:
        return "a weight of other than two dims"
    return None


@register_op_rule("linear", signature=("input", "weight", "bias"), check=_linear_check,
                  form=lambda c, slot: linear_form(math.prod(c.out_shape) // (c.batch * c.args[1].shape[0]),
                                                   *c.args[1].shape) if slot == 1 else BIAS_FORM)
def linear_op(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    """F.linear(x, W, b) = x W^T + b."""
    w = call.args[1]
    a = rows(call.args[0], call.lay(0), call.batch, w.shape[1])
    g = rows(grad, call.out_lay, call.batch, w.shape[0])
    return linear_like(call, a, g, wants_norm, weight=1, bias=2 if call.arg(2) is not None else None)


def _addmm_check(call: OpCall) -> str | None:
    if call.kwargs.get("beta", 1) != 1 or call.kwargs.get("alpha", 1) != 1:
        return "addmm with alpha or beta"
    if call.lay(1) is None or call.lay(0) is not None or call.lay(2) is not None:
        return "only mat1 may be batched"
    if 1 in call.pins:
        return "the batched operand is a parameter"
    return None


@register_op_rule("addmm", signature=("input", "mat1", "mat2"), check=_addmm_check,
                  form=lambda c, slot: linear_form(c.args[1].numel() // (c.batch * c.args[2].shape[0]),
                                                   c.args[2].shape[1], c.args[2].shape[0]) if slot == 2 else BIAS_FORM)
def addmm_op(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    """torch.addmm(b, x, W) = x @ W + b with W [d, p] (Hugging Face's Conv1D)."""
    w = call.args[2]
    a = rows(call.args[1], call.lay(1), call.batch, w.shape[0])
    g = rows(grad, call.out_lay, call.batch, w.shape[1])
    return linear_like(call, a, g, wants_norm, weight=2, bias=0, transposed=True)


def _matmul_check(call: OpCall) -> str | None:
    if len(call.pins) != 1 or next(iter(call.pins)) not in (0, 1):
        return "a matmul of two parameter inputs"
    pos = next(iter(call.pins))
    other = 1 - pos
    if call.pins[pos].dim() != 2:
        return "a parameter input of other than two dims"
    x = call.arg(other)
    lay = call.lay(other)
    if lay is None or x is None or x.dim() < 2:
        return "the other operand is not batched"
    if lay[0] >= x.dim() - (1 if pos == 1 else 2):
        return "the batch is a matrix dim"
    return None


def _matmul_form(call: OpCall, slot) -> str:
    pos = next(iter(call.pins))
    w = call.pins[pos]
    d, p = (w.shape[0], w.shape[1]) if pos == 1 else (w.shape[1], w.shape[0])
    return linear_form(call.args[1 - pos].numel() // (call.batch * d), p, d)


@register_op_rule("matmul", "mm", "__matmul__", signature=("input", "other"), check=_matmul_check, form=_matmul_form)
def matmul_op(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    """x @ W (W [d, p] on the right) or W @ x (W [p, d] on the left, x [..., d, T])."""
    pos = next(iter(call.pins))
    w = call.pins[pos]
    if pos == 1:
        a = rows(call.args[0], call.lay(0), call.batch, w.shape[0])
        g = rows(grad, call.out_lay, call.batch, w.shape[1])
        return linear_like(call, a, g, wants_norm, weight=1, transposed=True)
    a = rows(call.args[1].transpose(-1, -2), call.lay(1), call.batch, w.shape[1])
    g = rows(grad.transpose(-1, -2), call.out_lay, call.batch, w.shape[0])
    return linear_like(call, a, g, wants_norm, weight=0)
