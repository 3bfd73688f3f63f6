"""The recorded forward of the hooks backend: every torch op the model calls, and where its samples go.

    recorder = Recorder(batch, measured, x.tensors())
    with recorder:
        losses = job.losses(x)
    recorder.calls           # OpCalls: ops that took a parameter (or derived tensor) and batched data

A ``torch.overrides.TorchFunctionMode`` sees every torch function and Tensor method called from
Python, whichever module (or none) calls it: F.linear on Swin's module weights, F.layer_norm in
ConvNeXt's LayerNorm2d, ``gamma * x``, torch.addmm in Hugging Face's Conv1D, ``cls.expand(B, -1, -1)``,
``x + pos``, ``table[index]``, parametrizations. For each call it

1. tracks the sample layout of the outputs (norms/layout.py), starting from the model inputs at
   (0, 1); a layout is a mark on the tensor (its ``__dict__``, tagged with this recorder, so a
   tensor that outlives the forward carries nothing another recording would read);
2. marks outputs computed from measured parameters and no batched data as *derived*, with the
   parameters they come from (weight_norm's weight, a split of in_proj_bias, a position embedding
   looked up with a [1, T] id buffer, Swin's bias gathered from its table);
3. records a *meet* where a parameter or derived tensor enters an op with batched data: an
   ``OpCall`` with the arguments its rule reads, the output's gradient edge, and a tensor hook on
   the output that hands (call, d L / d output) to ``on_grad`` during the backward;
4. marks the autograd nodes the coverage check (backends/coverage.py) stops at: each meet's output
   node, each derivation's, each user-rule module's output.

What it sees that a TorchFunctionMode alone would not:
* ``F.multi_head_attention_forward`` starts with its own ``has_torch_function`` check, through which
  the mode would see the composite but none of its projections: it runs as a copy of the same code
  whose ``has_torch_function`` is False, with the mode on (the same ops, the same results);
* ``torch.lstm/gru/rnn_tanh/rnn_relu`` are one fused op: norms/rnn.py unrolls them;
* F.layer_norm with a measured weight runs as torch.native_layer_norm (the kernel F.layer_norm
  runs; not under autocast, whose cast F.layer_norm would get), keeping mean and rstd for the rule.

A module whose norm rule a user registered is opaque: inside its forward its own parameters are
not marked, and its output is one recorded call of that rule (``enter_module`` / ``exit_module``).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

from ..norms import rnn
from ..norms.layout import Unknown, is_unknown, propagate
from ..norms.ops import GENERIC, OP_RULES, OpCall, find_op_rule, flatten_args, is_inplace

MARK = "_gradnorm_layout"

# Calls that never return a tensor, and property getters that do not: passed straight through.
PLAIN = {"size", "dim", "numel", "stride", "is_contiguous", "item", "tolist", "__len__", "__bool__",
         "is_floating_point", "is_complex", "element_size", "data_ptr", "storage_offset", "get_device", "__format__",
         "__repr__", "untyped_storage", "_is_view", "nelement", "__hash__", "__index__", "__int__", "__float__",
         "is_nonzero", "register_hook", "ndimension", "is_inference", "is_pinned", "is_shared", "is_set_to",
         "_version", "__array__", "numpy", "equal", "allclose", "__contains__"}
PLAIN_GETTERS = {"shape", "dtype", "device", "requires_grad", "is_cuda", "ndim", "layout", "is_leaf", "is_sparse",
                 "is_quantized", "is_meta", "names", "grad_fn", "_version", "is_nested", "itemsize", "nbytes",
                 "is_mkldnn", "is_xpu", "is_mps", "_base", "grad", "output_nr", "_backward_hooks", "is_cpu"}
# New tensors of a given shape: constants, whatever the batched tensor they are made from.
CONSTANT_MAKERS = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zeros_like", "ones_like",
                   "empty_like", "full_like"}
EXPANDS = {"expand", "expand_as", "broadcast_to"}


def op_name(func) -> str:
    """The name op rules and the layout tracker know an op by (F.linear: "linear")."""
    if func is torch.Tensor.unfold:
        return "Tensor.unfold"           # windows along a dim, unlike F.unfold (im2col)
    name = getattr(func, "__name__", "")
    if name == "__get__":                # a property: Tensor.T, Tensor.mT, ...
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name


def _version(t: torch.Tensor):
    """The version counter of ``t`` (bumped by every in-place write into its memory, through any view)."""
    try:
        return t._version
    except RuntimeError:        # an inference tensor: no counter, and no in-place write outside inference mode
        return None


def _unchecked(f):
    """A copy of ``f`` whose ``has_torch_function`` checks are False: the mode then sees its body."""
    env = dict(f.__globals__)
    env["has_torch_function"] = lambda *a: False
    env["has_torch_function_unary"] = lambda *a: False
    env["has_torch_function_variadic"] = lambda *a: False
    clone = types.FunctionType(f.__code__, env, f.__name__, f.__defaults__, f.__closure__)
    clone.__kwdefaults__ = f.__kwdefaults__
    return clone


MHA_UNCHECKED = _unchecked(F.multi_head_attention_forward)


class _Hook:
    """The tensor hook of one recorded output; emptied when the pass ends, so that the autograd
    graph (which holds the hook) does not keep the recorder, and with it the chunk, alive."""

    __slots__ = ("recorder", "call")

    def __init__(self, recorder: "Recorder", call):
        self.recorder, self.call = recorder, call

    def __call__(self, grad):
        recorder = self.recorder
        if recorder is not None and recorder.on_grad is not None:
            recorder.on_grad(self.call, grad)


class ModuleCall:
    """One call of a module with a user-registered rule: its inputs and its own parameters."""

    __slots__ = ("module", "rule", "params", "inputs", "edge", "name")

    def __init__(self, module, rule, params, inputs, edge, name: str):
        self.module, self.rule, self.params, self.inputs, self.edge, self.name = \
            module, rule, params, inputs, edge, name

    def free_inputs(self) -> None:
        self.inputs = None

    def release(self) -> None:
        self.inputs = self.edge = None


class Recorder(TorchFunctionMode):
    """See the module docstring. ``measured`` maps id(parameter) to the parameter."""

    def __init__(self, batch: int, measured: dict, inputs: list):
        super().__init__()
        self.batch = batch
        self.measured = measured
        self.token = object()
        self.calls: list = []                   # OpCalls and ModuleCalls, in forward order
        self.derived: dict[int, torch.Tensor] = {}      # id -> derived tensor (kept alive: ids stay unique)
        self.derived_from: dict[int, frozenset] = {}    # id(derived) -> ids of the parameters behind it
        self.check: dict = {}                   # autograd node -> ids of the tensors it takes directly
        self.derivations: dict = {}             # derivation node -> ids of its derived outputs
        self.uses: dict[int, int] = {}          # id(parameter or derived) -> recorded direct uses
        self.in_modules: dict[int, list] = {}   # id(parameter) -> the ModuleCalls that scored it
        self.failed: dict[int, str] = {}        # id (parameter or derived) -> why no rule can score it
        self.suspended: dict[int, int] = {}     # id(parameter) -> depth inside an opaque module
        self.mixing: dict = {}                  # autograd node of a tensor whose sample layout was lost -> Unknown
        self.lost_memory: dict = {}             # id(base) -> (base, op): a write lost the samples in its memory
        self.on_grad = None                     # set by the rules' pass for the backward
        self._hooks: list[_Hook] = []
        self._inputs = list(inputs)
        for t in self._inputs:
            if isinstance(t, torch.Tensor) and t.dim() >= 1:
                self.set_layout(t, (0, 1))

    # ------------------------------------------------------------------ marks
    def layout(self, t: torch.Tensor):
        mark = t.__dict__.get(MARK)
        if mark is None or mark[0] is not self.token:
            return None
        if mark[2] != _version(t):              # its memory was written since: through another view?
            return self._rewritten(t, mark[1])
        return mark[1]

    def _rewritten(self, t: torch.Tensor, lay):
        """The layout of ``t`` after a write into memory it shares: Unknown when a write that lost the
        samples went into that memory (a view made before ``base[1:] = 0`` or ``base[:1].copy_(...)``
        holds what its layout no longer says), else its own."""
        root = t._base if t._base is not None else t
        if id(root) in self.lost_memory and not is_unknown(lay):
            lay = Unknown(self.lost_memory[id(root)][1], "memory it shares with another tensor was written in place")
        self.set_layout(t, lay)
        return lay

    def set_layout(self, t: torch.Tensor, lay) -> None:
        if lay is None:
            t.__dict__.pop(MARK, None)
        else:
            t.__dict__[MARK] = (self.token, lay, _version(t))
            if lay.__class__ is Unknown and t.grad_fn is not None:
                # a gradient through here may carry one sample's loss to another's activations:
                # nothing recorded below it may be scored by its rule (backends/coverage.py)
                self.mixing.setdefault(t.grad_fn, lay)

    def is_pin(self, t: torch.Tensor) -> bool:
        """A measured parameter (outside an opaque module's own forward) or a derived tensor."""
        i = id(t)
        if i in self.measured:
            return t.requires_grad and not self.suspended.get(i)
        return i in self.derived and self.derived[i] is t

    def leaves(self, t: torch.Tensor) -> frozenset:
        i = id(t)
        return frozenset((i,)) if i in self.measured else self.derived_from.get(i, frozenset())

    def fail(self, tensors, reason: str) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and self.is_pin(t):
                self.failed.setdefault(id(t), reason)

    # ------------------------------------------------------------------ the mode
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        if name in PLAIN or (name in PLAIN_GETTERS and getattr(func, "__name__", "") == "__get__"):
            return func(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            with self:
                return MHA_UNCHECKED(*args, **kwargs)
        if rnn.is_unrollable(name, args) and func is getattr(torch, name, None):
            return rnn.unrolled(self, name, *args)

        flat, spec = flatten_args(args, kwargs)
        lays, pins = {}, []
        for i, t in enumerate(flat):
            if isinstance(t, torch.Tensor):
                lay = self.layout(t)
                if lay is not None:
                    lays[i] = lay
                elif self.is_pin(t):
                    pins.append(i)
        if not lays and not pins:
            out = func(*args, **kwargs)
            if name in EXPANDS and self._to_batch(args, out):
                self.set_layout(out, (0, 1))    # a constant given to every sample (BERT's token_type_ids)
            return out

        inplace = is_inplace(name)
        target = args[0] if inplace and args and isinstance(args[0], torch.Tensor) else None
        # the value an in-place op overwrites, where the rule reads it (x.mul_(gamma))
        saved = target.detach().clone() if pins and lays and target is not None \
            and find_op_rule(name).keeps_args else None
        extra = None
        if name == "layer_norm" and pins and 0 in lays \
                and not torch.is_autocast_enabled(flat[0].device.type):
            out, extra = self._layer_norm(args, kwargs)
        else:
            out = func(*args, **kwargs)

        out_lay = None
        if lays and name not in CONSTANT_MAKERS:
            out_lay = propagate(name, args, kwargs, [(flat[i], lay) for i, lay in lays.items()],
                                target if name == "__setitem__" else out, self.batch)
        if target is not None and lays:
            out_lay = self._written_in_place(name, args, target, out_lay)
        if pins:
            if lays:
                self._meet(name, func, args, kwargs, flat, spec, lays, pins, out, out_lay, saved, extra)
            elif name in EXPANDS and self._to_batch(args, out):
                out_lay = (0, 1)                # a parameter given to every sample: the class token
                self._meet(name, func, args, kwargs, flat, spec, lays, pins, out, out_lay, None, None)
            else:
                self._derive(flat, pins, out)
                return out
        self._mark(out, out_lay)
        return out

    def _mark(self, out, lay) -> None:
        if lay is None:
            return
        if isinstance(out, (tuple, list)):
            lays = lay if isinstance(lay, list) else [lay] * len(out)
            for o, lay_o in zip(out, lays):
                if isinstance(o, torch.Tensor) and lay_o is not None:
                    self.set_layout(o, lay_o)
        elif isinstance(out, torch.Tensor):
            self.set_layout(out, lay)

    def _layer_norm(self, args, kwargs):
        names = ("input", "normalized_shape", "weight", "bias", "eps")
        values = dict(zip(names, args))
        values.update(kwargs)
        shape = values["normalized_shape"]
        shape = [shape] if isinstance(shape, int) else list(shape)
        eps = values.get("eps")
        out, mean, rstd = torch.native_layer_norm(values["input"], shape, values.get("weight"), values.get("bias"),
                                                  1e-5 if eps is None else eps)
        return out, (mean, rstd)

    def _to_batch(self, args, out) -> bool:
        """p.expand(B, ...) or p.expand_as(a batched tensor): every sample gets its own copy."""
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != self.batch or self.batch == 1:
            return False
        source = args[0]
        if len(args) > 1 and isinstance(args[1], torch.Tensor):
            return self.layout(args[1]) == (0, 1)
        return source.dim() < out.dim() or source.shape[0] == 1

    def _written_in_place(self, name, args, target, out_lay):
        """``target``'s layout after an in-place op: kept only when what the op writes agrees with
        it (a view's base loses its layout with the view)."""
        before = self.layout(target)
        if name == "__setitem__":
            value = args[2] if len(args) > 2 else None
            value_lay = self.layout(value) if isinstance(value, torch.Tensor) else None
            indices = args[1] if isinstance(args[1], tuple) else (args[1],)
            if value_lay is None and not any(isinstance(i, torch.Tensor) and self.layout(i) is not None
                                             for i in indices):
                if before is None:
                    return None                 # constants written into a batch-free tensor
                value = value_lay = None        # constants: fine where the region holds every sample alike
            after = self._region_agrees(target, args[1], before, value, value_lay)
        else:
            after = out_lay
        # an Unknown ``after`` is written too when it equals ``before``: a write through a view whose
        # samples were already lost (h[1:].mul_(2), h[:1].copy_(h[-1:])) treats rows by their
        # position in the batch, which a sample alone never sees
        if after != before or is_unknown(after):
            # a batch-free tensor filled from batched data takes their layout (a mask built from
            # zeros_like(mask).masked_fill_(mask, -inf)); a batched one written with other samples'
            # data, or a view whose base now holds both, loses it
            if before is not None or is_unknown(after):
                after = after if is_unknown(after) else Unknown(name, "writes other samples' data in place")
            self.set_layout(target, after)
            root = target._base
            if target._base is not None:
                self.set_layout(root, Unknown(name, "a view of it was written in place"))
            else:
                root = target
            if is_unknown(after):
                self.lost_memory.setdefault(id(root), (root, name))    # and every other view of it
        return after

    def _region_agrees(self, target, index, before, value, value_lay):
        """x[index] = value: x's layout when the written region's samples are value's, else Unknown."""
        if before is None:
            return Unknown("__setitem__", "batched values written into a batch-free tensor")
        region = torch.Tensor.__getitem__(target, index)
        batched = [(target, before)]
        indices = index if isinstance(index, tuple) else (index,)
        batched += [(i, self.layout(i)) for i in indices if isinstance(i, torch.Tensor) and self.layout(i) is not None]
        region_lay = propagate("__getitem__", (target, index), {}, batched, region, self.batch)
        if is_unknown(region_lay):
            return Unknown("__setitem__", f"writes a region that is not every sample's alike ({region_lay.why})")
        if value_lay is not None:
            aligned = propagate("expand_as", (value, region), {}, [(value, value_lay)], region, self.batch)
            if aligned != region_lay:
                return Unknown("__setitem__", "writes another sample's values")
        return before

    # ------------------------------------------------------------------ derived tensors and meets
    def _derive(self, flat, pins, out) -> None:
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        leaves = frozenset().union(*(self.leaves(flat[i]) for i in pins))
        made = set()
        for o in outs:
            if o.requires_grad and o.grad_fn is not None:
                self.derived[id(o)] = o
                self.derived_from[id(o)] = leaves
                made.add(id(o))
        for o in outs:
            if id(o) in made:
                self.check.setdefault(o.grad_fn, set()).update(id(flat[i]) for i in pins)
                self.derivations.setdefault(o.grad_fn, set()).update(made)
        for i in pins:
            self.uses[id(flat[i])] = self.uses.get(id(flat[i]), 0) + 1

    def _meet(self, name, func, args, kwargs, flat, spec, lays, pins, out, out_lay, saved, extra) -> None:
        pin_tensors = [flat[i] for i in pins]
        if not isinstance(out, torch.Tensor) or not out.requires_grad or out.grad_fn is None:
            self.fail(pin_tensors, f"`{name}`: its output takes no gradient (computed under no_grad, or inside a "
                                   "custom autograd.Function whose backward the recording cannot see)")
            return
        if out_lay is None or is_unknown(out_lay):
            where = out_lay.describe() if is_unknown(out_lay) else f"`{name}`"
            self.fail(pin_tensors, f"`{name}` reads data whose sample layout was lost at {where}")
            return
        rule = find_op_rule(name)
        call = OpCall(name, func, rule)
        call.batch, call.out_lay, call.out_shape, call.saved, call.extra = self.batch, out_lay, tuple(out.shape), \
            saved, extra
        call.flat, call.spec, call.flat_lays = flat, spec, {i: lay for i, lay in lays.items()}
        positional = list(args)
        rest = dict(kwargs)
        for j, arg_name in enumerate(rule.signature):
            if arg_name in rest and j >= len(positional):
                positional.extend([None] * (j - len(positional)))
                positional.append(rest.pop(arg_name))
        call.args, call.kwargs = tuple(positional), rest
        call.lays = [self.layout(a) if isinstance(a, torch.Tensor) else None for a in positional]
        call.pins = {j: a for j, a in enumerate(positional) if isinstance(a, torch.Tensor) and self.is_pin(a)}
        call.pin_flat = {j: next(i for i in pins if flat[i] is a) for j, a in call.pins.items()}
        if len(call.pins) != len(pins):
            # a parameter inside a list argument, or a keyword outside the signature: the generic rule
            call.rule = rule = OP_RULES[GENERIC]
            call.pins = {("flat", i): flat[i] for i in pins}
            call.pin_flat = {("flat", i): i for i in pins}
        if rule.check is not None:
            problem = rule.check(call)
            if problem:
                self.fail(pin_tensors, f"`{name}`: {problem}")
                return
        if not rule.keeps_args:             # shapes and layouts are all the rule reads
            call.args = tuple(a if not isinstance(a, torch.Tensor) or self.is_pin(a) else None for a in positional)
            call.flat = None
        call.edge = get_gradient_edge(out)
        ids = {id(t) for t in pin_tensors}
        self.check.setdefault(out.grad_fn, set()).update(ids)
        for t in pin_tensors:
            self.uses[id(t)] = self.uses.get(id(t), 0) + 1
        self._hook(out, call)

    def add_call(self, call: OpCall, hook_on: torch.Tensor, ends: list) -> None:
        """A recorded call computed outside the mode (norms/rnn.py): the rule runs on the gradient of
        ``hook_on``; every path from its parameters to the loss passes one of ``ends``."""
        call.batch, call.out_lay, call.out_shape = self.batch, (0, 1), tuple(hook_on.shape)
        call.edge = get_gradient_edge(hook_on)
        ids = {id(t) for t in call.pins.values()}
        for node in [hook_on.grad_fn, *(t.grad_fn for t in ends)]:
            self.check.setdefault(node, set()).update(ids)
        for t in call.pins.values():
            self.uses[id(t)] = self.uses.get(id(t), 0) + (call.uses or {}).get(id(t), 1)
        self._hook(hook_on, call)

    def _hook(self, out: torch.Tensor, call) -> None:
        hook = _Hook(self, call)
        self._hooks.append(hook)
        self.calls.append(call)
        out.register_hook(hook)

    # ------------------------------------------------------------------ opaque modules
    def enter_module(self, params: list) -> None:
        for p in params:
            self.suspended[id(p)] = self.suspended.get(id(p), 0) + 1

    def exit_module(self, module, rule, params: list, inputs: tuple, output, name: str) -> None:
        for p in params:
            self.suspended[id(p)] -= 1
        mine = [p for p in params if p.requires_grad]
        if not mine:
            return
        reason = None
        if not isinstance(output, torch.Tensor) or not output.requires_grad or output.grad_fn is None:
            reason = "its output is not one tensor that takes a gradient"
        elif not inputs or not isinstance(inputs[0], torch.Tensor) or self.layout(inputs[0]) != (0, 1) \
                or self.layout(output) != (0, 1):
            reason = "a layer rule reads dim 0 of its input and output as the sample, and the samples are elsewhere"
        for p in mine:
            self.in_modules.setdefault(id(p), [])
        if reason:
            for p in mine:
                self.failed.setdefault(id(p), f"the norm rule for {type(module).__name__} ({name}): {reason}")
            return
        call = ModuleCall(module, rule, mine, inputs, get_gradient_edge(output), name)
        self.check.setdefault(output.grad_fn, set()).update(id(p) for p in mine)
        for p in mine:
            self.in_modules[id(p)].append(call)
        self._hook(output, call)

    # ------------------------------------------------------------------ the end of the pass
    def release(self) -> None:
        """Drop everything the pass kept (called after the last backward)."""
        for hook in self._hooks:
            hook.recorder = hook.call = None
        for call in self.calls:
            call.release()
        for t in self._inputs:
            if isinstance(t, torch.Tensor):
                self.set_layout(t, None)
        self._hooks.clear()
        self.calls.clear()
        self.derived.clear()
        self.check.clear()
        self.derivations.clear()
        self.mixing.clear()
        self.lost_memory.clear()
        self.on_grad = None
