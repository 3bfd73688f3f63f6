"""The registry of per-layer norm rules: which function turns a layer's input and output
gradient into per-sample squared gradient norms of its parameters.

A rule is a plain function

    rule(layer, inputs, grad_outputs) -> {parameter: squared norms [B]}

where ``inputs`` are the positional arguments the layer was called with (batch on dim 0) and
``grad_outputs = (d L / d output,)`` with L the *summed* loss over the batch. Because the model
runs in eval mode and the loss treats rows independently, row b of ``grad_outputs[0]`` is the
gradient of sample b's own loss, so

    result[p][b] = || d loss_b / d p ||^2     (accumulated in float32, float64 for float64 input)

Rules cover only the parameters the layer owns directly; a rule may leave out parameters with
``requires_grad=False``.

    @register_norm_rule(MyLayer)
    def my_layer_norms(layer, inputs, grad_outputs): ...   # -> {layer.weight: [B], ...}

Lookup walks ``type(layer).__mro__``, so a subclass of ``nn.Linear`` gets the Linear rule
unless a rule is registered for the subclass itself. The hooks backend applies an inherited
rule only to subclasses that keep the base class's ``forward``; a subclass with its own forward
is scored by the exact fallback until a rule is registered for it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..kernels import accum_dtype  # noqa: F401  (one definition for the project, used by every rule)

NormRule = Callable[[nn.Module, tuple, tuple], dict]

# The one registry: layer class -> rule. Filled by the rule files that norms/__init__.py imports.
NORM_RULES: dict[type, NormRule] = {}


def register_norm_rule(*layer_types: type, replace: bool = False) -> Callable[[NormRule], NormRule]:
    """Decorator registering ``rule`` for every class in ``layer_types``.

    Registering a class that already has a rule raises, unless ``replace=True``.
    """
    if not layer_types:
        raise TypeError("register_norm_rule needs at least one layer class, e.g. @register_norm_rule(nn.Linear)")
    for cls in layer_types:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_norm_rule takes nn.Module subclasses, got {cls!r}")

    def decorate(rule: NormRule) -> NormRule:
        for cls in layer_types:
            if cls in NORM_RULES and not replace and NORM_RULES[cls] is not rule:
                raise ValueError(
                    f"{cls.__name__} already has the norm rule {NORM_RULES[cls].__name__}; pass "
                    f"register_norm_rule({cls.__name__}, replace=True) to override it")
            NORM_RULES[cls] = rule
        return rule

    return decorate


def find_norm_rule(layer: nn.Module) -> NormRule | None:
    """The rule for ``layer``'s class or its nearest registered base class, or None."""
    for cls in type(layer).__mro__:
        rule = NORM_RULES.get(cls)
        if rule is not None:
            return rule
    return None


def wants(p: torch.Tensor | None) -> bool:
    """Whether a rule should score parameter ``p`` (present and trainable)."""
    return p is not None and p.requires_grad


def rule_name(rule: NormRule) -> str:
    return getattr(rule, "__qualname__", None) or getattr(rule, "__name__", None) or repr(rule)


def entry_problem(value, batch: int) -> str | None:
    """Why one entry of a rule's result is not per-sample squared norms [B], or None."""
    if not isinstance(value, torch.Tensor):
        return f"returned a {type(value).__name__}, not a tensor"
    if value.shape != (batch,):
        return f"returned {tuple(value.shape)}"
    return None


def check_rule_result(result, rule: NormRule, layer: nn.Module, batch: int, *, entries: bool = True) -> dict:
    """A rule's answer, checked: a dict {parameter: per-sample squared norms [B]}. Raises TypeError
    (not a dict) or, with ``entries``, ValueError (an entry of another type or shape), naming the rule."""
    where = f"the norm rule {rule_name(rule)} for {type(layer).__name__}"
    if not isinstance(result, dict):
        raise TypeError(f"{where} returned a {type(result).__name__}; a rule returns a dict "
                        "{parameter: tensor [B] of per-sample squared norms}")
    for p, value in result.items() if entries else ():
        problem = entry_problem(value, batch)
        if problem:
            raise ValueError(f"{where} {problem} for a parameter of shape {tuple(getattr(p, 'shape', ()))}; "
                             f"a rule returns one squared norm per sample, a tensor of shape [{batch}]")
    return result
