"""Check a per-layer norm rule against the per-sample loop, for built-in and user rules.

    from gradnorm_engine.testing import check_rule
    check_rule(nn.Conv2d(3, 8, 3, padding=1), torch.randn(5, 3, 16, 16))  # raises on a mismatch
    result = check_rule(my_layer, x, raise_on_mismatch=False); print(result.report())

The layer runs in eval mode on a float64 copy (by default). A random output gradient gy
[B, ...] stands for d(summed loss)/d(output); the rule's answer for sample b is compared with
||d <layer(x_b), gy_b> / d p||^2 from one backward per sample.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .norms import NormRule, check_rule_result, entry_problem, find_norm_rule, rule_name

# Relative tolerance per computation dtype, applied to each sample's squared norm and to the
# largest one (so near-zero entries are not held to a relative bound they cannot meet).
DEFAULT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
# Absolute floor on squared norms, for layers whose gradient is zero up to rounding.
DEFAULT_ATOL = {torch.float64: 1e-18, torch.float32: 1e-10, torch.bfloat16: 1e-6, torch.float16: 1e-6}


@dataclass
class ParamCheck:
    name: str
    max_abs_error: float
    max_rel_error: float
    ok: bool
    note: str = ""


@dataclass
class RuleCheck:
    """What ``check_rule`` found: one row per parameter and whether all agree."""

    layer: str
    rule: str
    batch: int
    dtype: torch.dtype
    params: list[ParamCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.params)

    def report(self) -> str:
        lines = [f"norm rule {self.rule} for {self.layer} (batch {self.batch}, {self.dtype}): "
                 + ("agrees with the per-sample loop" if self.ok else "DISAGREES with the per-sample loop")]
        for p in self.params:
            lines.append(f"  {'ok  ' if p.ok else 'FAIL'} {p.name}: max abs error {p.max_abs_error:.3g}, "
                         f"max rel error {p.max_rel_error:.3g}{'  ' + p.note if p.note else ''}")
        return "\n".join(lines)


def check_rule(layer: nn.Module, inputs, *, rule: NormRule | None = None, grad_outputs: torch.Tensor | None = None,
               dtype: torch.dtype | None = torch.float64, rtol: float | None = None,
               atol: float | None = None, raise_on_mismatch: bool = True, seed: int = 0) -> RuleCheck:
    """Compare ``rule`` (default: the registered rule for ``layer``) with the per-sample loop.

    inputs: a tensor [B, ...] or a tuple of tensors, each batched on dim 0 (integer tensors,
    such as token ids, are kept as they are). dtype: the precision of the comparison (the layer
    and floating inputs are copied to it; None keeps them). A sample passes when
    |rule - loop| <= rtol * (|loop| + max |loop|) + atol (defaults per dtype). Returns a ``RuleCheck``; raises
    AssertionError with its report when they disagree and ``raise_on_mismatch`` is True.
    """
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    layer = copy.deepcopy(layer).eval()
    if dtype is not None:
        layer = layer.to(dtype)
        inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    rule = rule or find_norm_rule(layer)
    if rule is None:
        raise ValueError(f"no norm rule is registered for {type(layer).__name__}; write one and register "
                         "it with @gradnorm_engine.register_norm_rule(...), or pass rule=")
    batch = inputs[0].shape[0]
    with torch.enable_grad():
        output = layer(*inputs)
    if not isinstance(output, torch.Tensor) or output.shape[:1] != (batch,):
        raise ValueError(f"check_rule needs a layer returning one tensor [B, ...] with B = {batch}, got "
                         f"{type(output).__name__} {tuple(getattr(output, 'shape', ()))}")
    if grad_outputs is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        grad_outputs = torch.randn(output.shape, generator=gen, dtype=output.dtype).to(output.device)
    with torch.no_grad():
        returned = rule(layer, inputs, (grad_outputs.detach(),))
    got = {id(p): v for p, v in check_rule_result(returned, rule, layer, batch, entries=False).items()}

    # A rule covers the parameters its layer owns directly; child modules have rules of their own.
    named = [(n, p) for n, p in layer.named_parameters(recurse=False) if p.requires_grad]
    expected = _per_sample_loop(layer, inputs, grad_outputs, [p for _, p in named])
    comp_dtype = dtype or next((p.dtype for _, p in named), torch.float32)
    tol = rtol if rtol is not None else DEFAULT_RTOL.get(comp_dtype, 1e-4)
    floor = atol if atol is not None else DEFAULT_ATOL.get(comp_dtype, 1e-10)
    result = RuleCheck(layer=type(layer).__name__, rule=rule_name(rule),
                       batch=batch, dtype=comp_dtype)
    for (name, p), ref in zip(named, expected):
        if id(p) not in got:
            result.params.append(ParamCheck(name, float("nan"), float("nan"), False,
                                            "the rule returned no entry for this parameter"))
            continue
        problem = entry_problem(got[id(p)], batch)
        if problem:
            result.params.append(ParamCheck(name, float("nan"), float("nan"), False,
                                            f"the rule {problem}, expected a tensor [{batch}]"))
            continue
        value = got[id(p)].detach().to(ref.device, torch.float64)
        err = (value - ref).abs()
        scale = ref.abs().max().clamp_min(1e-300)
        rel = err / ref.abs().clamp_min(1e-300)
        ok = bool((err <= tol * ref.abs() + tol * scale + floor).all())
        result.params.append(ParamCheck(name, float(err.max()), float(rel.max()), ok))
    if raise_on_mismatch and not result.ok:
        raise AssertionError(result.report())
    return result


def _per_sample_loop(layer: nn.Module, inputs: tuple, grad_outputs: torch.Tensor, params: list) -> list[torch.Tensor]:
    """For every parameter, ||d <layer(x_b), gy_b> / d p||^2 for each b, by one backward per sample."""
    batch = inputs[0].shape[0]
    out = [torch.zeros(batch, dtype=torch.float64) for _ in params]
    for b in range(batch if params else 0):
        with torch.enable_grad():
            y = layer(*(t[b : b + 1] for t in inputs))
            inner = (y * grad_outputs[b : b + 1].to(y.dtype)).sum()
            grads = torch.autograd.grad(inner, params, allow_unused=True)
        for col, g in zip(out, grads):
            if g is not None:
                col[b] = g.detach().to(torch.float64).pow(2).sum().cpu()
    return out
