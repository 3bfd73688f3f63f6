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


def accum_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (also for bf16/fp16 inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def wants(p: torch.Tensor | None) -> bool:
    """Whether a rule should score parameter ``p`` (present and trainable)."""
    return p is not None and p.requires_grad
