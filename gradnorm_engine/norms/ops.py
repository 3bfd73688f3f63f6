"""Op rules: per-sample gradient norms of the parameters one torch op takes, from the op's recorded
arguments and the gradient of its output.

The hooks backend records every torch function and Tensor method the model's forward calls
(backends/recording.py). Where an op takes a measured parameter (or a tensor derived from
parameters only) together with batched data, the call is kept as an ``OpCall``, and as the
backward reaches the op's output the rule registered for the op's name runs:

    rule(call, grad, wants_norm) -> {slot: tensor}

``grad`` is d L / d output for the summed loss L over the batch; its samples sit where
``call.out_lay`` says (norms/layout.py: possibly not dim 0, possibly folded with other dims).
For each parameter input (``call.pins``, keyed by slot: the argument's position) the rule returns
  wants_norm(slot) True   the squared norm per sample [B] of d loss_b / d input (the parameter is
                          used once: the closed forms of norms/forms.py apply)
  wants_norm(slot) False  the per-sample gradient [B, *input.shape] (the parameter is used several
                          times, or the input is derived from parameters: the engine sums the uses,
                          or carries the gradient through the derivation, before the norm)
Rows are accumulated in float32 (float64 for float64 inputs).

    @register_op_rule("linear", signature=("input", "weight", "bias"))
    def linear_op(call, grad, wants_norm): ...

A rule may declare ``check(call) -> reason | None`` (run at record time: the calls it cannot score
go to the exact fallback with that reason, before any backward) and ``form(call, slot) -> str``
(which closed form it will use for that input, for ``gradnorm_engine.explain``). Ops without a rule of their own get the
generic rule (norms/generic.py: vmap of the op's own vjp).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# The rule of every op without one of its own (registered by norms/generic.py).
GENERIC = "*"

# In-place dunders with the out-of-place op each computes (the generic rule re-runs that one),
# and every in-place dunder: those and the ones without such a twin.
INPLACE_TWINS = {"__iadd__": "add", "__isub__": "sub", "__imul__": "mul", "__itruediv__": "div",
                 "__ifloordiv__": "floor_divide", "__imod__": "remainder", "__ipow__": "pow"}
INPLACE_DUNDERS = {*INPLACE_TWINS, "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__setitem__"}


def is_inplace(name: str) -> bool:
    """Whether the op called ``name`` writes its first argument (``mul_``, ``__iadd__``, ``__setitem__``)."""
    return (name.endswith("_") and not name.endswith("__")) or name in INPLACE_DUNDERS


class OpCall:
    """One recorded op call that takes parameter inputs and batched data.

    args      the positional arguments, keyword ones moved into place by the rule's signature
    kwargs    the keyword arguments outside the signature
    lays      the layout of each positional argument (None: batch-free)
    pins      slot -> the parameter (or derived) tensor taking that slot; a slot is a position in
              ``args``, or ("flat", i) for a tensor found inside a list argument (generic rule only)
    flat, spec, flat_lays, pin_flat   the arguments flattened one list level, as the generic rule
              re-calls the op: spec rebuilds (args, kwargs); flat_lays: flat index -> layout
    out_lay, out_shape   the output's layout and shape; batch: B
    saved     the value ``args[0]`` had before an in-place op overwrote it (mul_, div_), or None
    extra     what the forward computed for the rule on the side (layer_norm: mean and rstd)
    edge      the output's autograd gradient edge, taken before any in-place op (the recording's)
    """

    __slots__ = ("name", "func", "args", "kwargs", "lays", "pins", "flat", "spec", "flat_lays", "pin_flat",
                 "out_lay", "out_shape", "batch", "saved", "extra", "rule", "uses", "edge")

    def __init__(self, name: str, func, rule: "OpRule"):
        self.name, self.func, self.rule = name, func, rule
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.lays: list = []
        self.pins: dict = {}
        self.flat: list = []
        self.spec = None
        self.flat_lays: dict = {}
        self.pin_flat: dict = {}
        self.out_lay = None
        self.out_shape: tuple = ()
        self.batch = 0
        self.saved = None
        self.extra = None
        self.uses: dict | None = None   # id(parameter) -> autograd uses, where one call makes several (RNNs)
        self.edge = None                # the output's gradient edge (set by the recording)

    def arg(self, pos: int, default=None):
        """Positional argument ``pos`` (keyword ones are moved into place), or ``default``."""
        if len(self.args) > pos and self.args[pos] is not None:
            return self.args[pos]
        return default

    def lay(self, pos: int):
        return self.lays[pos] if len(self.lays) > pos else None

    def free_inputs(self) -> None:
        """Drop the activations kept for the rule, once it has run for the last loss: each is freed
        as the backward passes it, as a training step frees its saved tensors (kept to the end of
        the pass, they raised the peak, and the allocator then handed the memory back to the
        system and took it again page by page on every chunk: 5-10% of a ResNet-18 pass on CPU)."""
        self.args = self.flat = self.saved = self.extra = None

    def release(self) -> None:
        """Drop the tensors kept for the rule (after the last backward)."""
        self.args = self.flat = self.pins = self.saved = self.extra = self.edge = None
        self.kwargs = {}


Rule = Callable[[OpCall, torch.Tensor, Callable[[object], bool]], dict]


@dataclass(frozen=True)
class OpRule:
    fn: Rule
    signature: tuple = ()
    check: Callable[[OpCall], "str | None"] | None = None
    form: Callable[[OpCall], str] | None = None
    keeps_args: bool = True          # False: the rule reads only shapes and layouts (add, expand)

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


# op name -> its rule; filled by the rule files that norms/__init__.py imports.
OP_RULES: dict[str, OpRule] = {}


def register_op_rule(*names: str, signature: tuple = (), check=None, form=None, keeps_args: bool = True,
                     replace: bool = False):
    """Decorator registering ``rule`` for the torch ops called ``names`` (F.linear is "linear",
    Tensor.__add__ "__add__", ...). Registering a name twice raises unless ``replace=True``."""
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError("register_op_rule takes op names, e.g. @register_op_rule('linear')")

    def decorate(fn: Rule) -> Rule:
        rule = OpRule(fn, tuple(signature), check, form, keeps_args)
        for n in names:
            if n in OP_RULES and not replace and OP_RULES[n].fn is not fn:
                raise ValueError(f"op {n!r} already has the rule {OP_RULES[n].name}; pass replace=True to override it")
            OP_RULES[n] = rule
        return fn

    return decorate


def find_op_rule(name: str) -> OpRule:
    """The rule for op ``name``: its own, or the generic one."""
    return OP_RULES.get(name) or OP_RULES[GENERIC]


def describe_form(call: OpCall, slot, as_norm: bool) -> str:
    """What the call's rule computes for the input at ``slot``, e.g. "gram (T=65, p=1024, d=256)";
    "" when the rule does not say."""
    if not as_norm:
        return "per-sample gradients"
    if call.rule.form is None:
        return ""
    try:
        return call.rule.form(call, slot)
    except Exception:  # noqa: BLE001 - a description only
        return ""


def flatten_args(args: tuple, kwargs: dict) -> tuple[list, tuple]:
    """An op's arguments as one flat list, list/tuple arguments expanded one level, and the spec
    ``unflatten_args`` rebuilds them from. (Cheaper than torch's pytree on every op of a forward;
    a tensor nested deeper is not seen, so a parameter there fails the coverage check.)"""
    flat, aspec = [], []
    for a in args:
        if isinstance(a, (list, tuple)):
            aspec.append((type(a), len(a)))
            flat.extend(a)
        else:
            aspec.append(None)
            flat.append(a)
    kspec = []
    for k, v in kwargs.items():
        if isinstance(v, (list, tuple)):
            kspec.append((k, type(v), len(v)))
            flat.extend(v)
        else:
            kspec.append((k, None, 1))
            flat.append(v)
    return flat, (aspec, kspec)


def unflatten_args(flat: list, spec: tuple) -> tuple[tuple, dict]:
    aspec, kspec = spec
    args, i = [], 0
    for s in aspec:
        if s is None:
            args.append(flat[i])
            i += 1
        else:
            kind, n = s
            args.append(kind(flat[i:i + n]) if kind in (list, tuple) else list(flat[i:i + n]))
            i += n
    kwargs = {}
    for k, kind, n in kspec:
        if kind is None:
            kwargs[k] = flat[i]
            i += 1
        else:
            kwargs[k] = kind(flat[i:i + n]) if kind in (list, tuple) else list(flat[i:i + n])
            i += n
    return tuple(args), kwargs


def per_sample_result(value: torch.Tensor, wants_norm: bool) -> torch.Tensor:
    """A per-sample gradient [B, ...] as the rule's answer: itself, or its squared norms [B]."""
    return value.reshape(value.shape[0], -1).pow(2).sum(dim=1) if wants_norm else value
