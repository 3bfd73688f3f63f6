"""Per-sample gradient norms from one batched forward and one backward to the layer outputs.

    engine = HooksBackend(job); engine.sqnorms(x)   # x [B, ...] -> [B, P]

1. Forward hooks on every layer with a norm rule (gradnorm_engine.norms) save the layer's
   inputs and register a tensor hook on its output *before* anything downstream can modify it
   in place (PyTorch hands such a hook the gradient of the value the layer returned).
2. One ``torch.autograd.grad`` of the summed loss asks only for gradients w.r.t. layer outputs:
   no parameter gradient is ever formed. As the backward reaches each layer, its tensor hook
   runs the layer's rule on (saved inputs, d L / d output), adds the per-sample squared norms to
   the result and drops the saved inputs.
3. Exactness for any model: a measured parameter is left to the rules only when one module owns
   it, that module ran exactly once, it has a rule, and the autograd graph shows exactly one
   use of the parameter. Everything else (bare parameters, layers without a rule, tied weights,
   a layer applied twice, weights read outside their module's forward) is scored by the exact
   fallback, ``vmap(grad)`` over just those parameters (or the per-sample loop when vmap cannot
   run the model), so per-sample gradients of a shared parameter are summed before the norm.

The model must treat the samples of a batch independently (eval mode; BatchNorm with running
statistics) and the rules read dim 0 of a layer's input as the sample. A layer that sees
another dim first (sequence-first data) is caught when that dim's size differs from the batch;
for when it happens to be equal, the first chunk of every new size is checked against the
per-sample loop on two samples, and a disagreement (a model the rules cannot read) hands the
whole job to the exact fallback with a ``HooksFallbackWarning``.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from ..job import ScoringJob, measure_only
from ..memory import activation_elems, chunk_budget, is_out_of_memory
from ..norms import NORM_RULES, check_rule_result, find_norm_rule, rule_name
from .base import Backend
from .loop import LoopBackend
from .vmap import VmapBackend

# Bytes per activation entry of one sample while a chunk runs: the forward's saved activations,
# the inputs the hooks keep, the output gradients in flight and the rules' temporaries.
ACTIVATION_COPIES = 6
MAX_CHUNK = 512

# The self-check against the per-sample loop: samples compared, and the relative tolerance per
# squared norm (low-precision autocast forwards differ between a batch and a single sample).
CHECK_SAMPLES = 2
# float32: a batched forward may use other convolution algorithms than a single sample's (oneDNN
# on CPU), and an ill-conditioned sample's gradient magnifies the difference: on CIFAR ResNet-18
# one sample's layer1.0.conv2 entry came out 1.2e-3 from float64 in both batched engines (hooks
# and vmap agreed to 7 digits) while the batch-1 loop was within 1e-6. A layer that reads the
# wrong dim as the sample is off by far more than this tolerance.
CHECK_RTOL = {torch.float64: 1e-6, torch.float32: 2e-2}
CHECK_RTOL_AUTOCAST = 0.25


class HooksFallbackWarning(UserWarning):
    """The rules disagreed with the per-sample loop; the job continues on the exact fallback."""


class _Call:
    """One call of a hooked layer in the current forward."""

    __slots__ = ("module", "inputs", "node", "edge", "active")

    def __init__(self, module: nn.Module, inputs: tuple, edge):
        self.module = module
        self.inputs: tuple | None = inputs
        self.edge = edge              # GradientEdge of the output, taken before any in-place op
        self.node = edge.node
        self.active = False           # set after the forward when the rule may score this call


class HooksBackend(Backend):
    """Exact per-sample norms at about the cost of one training step (see the module docstring).

    ``last_fallback`` names the parameters the exact fallback scored in the last chunk.
    """

    name = "hooks"

    def __init__(self, job: ScoringJob):
        super().__init__(job)
        model = job.model
        self.columns = {id(p): j for j, (_, p) in enumerate(job.params)}
        owners: dict[int, list[nn.Module]] = {}
        for m in model.modules():
            for p in m._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), []).append(m)
        # Layers whose rule may score some measured parameter: owned by this layer alone.
        self.ruled: list[tuple[nn.Module, object, list[nn.Parameter]]] = []
        for m in model.modules():
            rule = _trusted_rule(m)
            mine = [p for p in m._parameters.values()
                    if p is not None and id(p) in self.columns and len(owners[id(p)]) == 1]
            if rule is not None and mine:
                self.ruled.append((m, rule, mine))
        self._fallbacks: dict[tuple[str, ...], Backend] = {}
        self.last_fallback: tuple[str, ...] = ()   # names scored by the fallback in the last chunk
        self._checked_sizes: set[int] = set()       # chunk sizes already checked against the loop
        self.distrusted = False                     # the rules failed the check: fallback only
        # Parameters of shape [1, ...] outside every rule (position embeddings, class tokens)
        # scored by per-sample copies inside the main pass, once checked (see _try_copies).
        self.copied: dict[str, nn.Parameter] = {}
        self._copies_tried = False

    @classmethod
    def supports(cls, job: ScoringJob) -> bool:
        """False only where one batched backward cannot give per-sample gradients: a BatchNorm
        that normalises with batch statistics (training mode or no running statistics) mixes
        the samples, and TorchScript modules take no Python hooks."""
        if isinstance(job.model, torch.jit.ScriptModule):
            return False
        for m in job.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
                return False
        return True

    def chunk_size(self, example: torch.Tensor) -> int:
        if self.job.options.get("chunk_size"):
            return int(self.job.options["chunk_size"])
        job = self.job
        itemsize = torch.finfo(job.accum_dtype).bits // 8
        act = activation_elems(job.model, example, job.autocast_context)
        # The Gram form and the unfolded patches hold up to about one weight's size per sample.
        widest = max((p.numel() for _, _, ps in self.ruled for p in ps), default=0)
        per_sample = itemsize * (ACTIVATION_COPIES * act + widest)
        return max(1, min(MAX_CHUNK, chunk_budget(job.device, job.max_memory) // per_sample))

    def sqnorms(self, x: torch.Tensor) -> torch.Tensor:
        job = self.job
        with measure_only(job):
            if self.distrusted or not self.ruled:  # nothing for the rules: skip their forward
                self.last_fallback = tuple(n for n, _ in job.params)
                return self._fallback(job.params).sqnorms(x).to(job.accum_dtype)
            out = torch.zeros(x.shape[0], len(job.params), dtype=job.accum_dtype, device=x.device)
            try:
                needs_fallback = self._forward_and_backward(x, out)
            except Exception as err:  # noqa: BLE001 - see below
                if not self.copied or is_out_of_memory(err):
                    raise
                # The per-sample copies, checked on an earlier chunk, do not fit this one (a
                # shape that depends on the batch size): back to the fallback for good.
                self.copied = {}
                out.zero_()
                needs_fallback = self._forward_and_backward(x, out)
            fallback = [(n, p) for n, p in job.params if id(p) in needs_fallback]
            self.last_fallback = tuple(n for n, _ in fallback)
            if fallback:
                cols = [self.columns[id(p)] for _, p in fallback]
                out[:, cols] = self._fallback(fallback).sqnorms(x).to(out.dtype)
                if not self._copies_tried:
                    self._copies_tried = True
                    self.copied = self._try_copies(x, fallback, out)
            if x.shape[0] not in self._checked_sizes:
                self._checked_sizes.add(x.shape[0])
                if not self._agrees_with_loop(x, out):
                    self.distrusted = True
                    self.last_fallback = tuple(n for n, _ in job.params)
                    return self._fallback(job.params).sqnorms(x).to(job.accum_dtype)
        return out

    def _try_copies(self, x: torch.Tensor, fallback: list, out: torch.Tensor) -> dict[str, nn.Parameter]:
        """Which fallback parameters per-sample copies can score from now on.

        A parameter p of shape [1, ...] is replaced, for one forward, by B copies [B, ...] (the
        leading 1 becomes the batch), so that sample b reads only copy b and d loss / d copy b is
        sample b's gradient of p, summed over all of p's uses. That holds where p's leading 1 is a
        dim broadcast against the batch (x + pos, torch.cat([cls.expand(B, -1, -1), x])); other
        uses fail or disagree with the exact fallback on this chunk's first samples, and then p
        stays with the fallback.
        """
        named = [(n, p) for n, p in fallback if p.dim() >= 1 and p.shape[0] == 1]
        if not named:
            return {}
        n = min(CHECK_SAMPLES, x.shape[0])
        try:
            copies = self._copy_sqnorms(x[:n], dict(named))
        except Exception as err:  # noqa: BLE001 - a use the copies cannot take: keep the fallback
            if is_out_of_memory(err):
                raise
            return {}
        rtol = _check_rtol(self.job, out.dtype)
        agreed = {}
        for name, p in named:
            want = out[:n, self.columns[id(p)]]
            got = copies[name].to(out.dtype)
            if bool(((got - want).abs() <= rtol * want.abs() + 1e-30).all()):
                agreed[name] = p
        return agreed

    def _copy_sqnorms(self, x: torch.Tensor, named: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Per-sample squared norms of ``named`` parameters through per-sample copies [B, ...]."""
        copies = _per_sample_copies(named, x.shape[0])
        loss = self.job.losses(x, copies).sum()
        grads = torch.autograd.grad(loss, list(copies.values()), allow_unused=True)
        return {n: _per_sample_sqnorm(g, x.shape[0], self.job.accum_dtype, x.device)
                for n, g in zip(copies, grads)}

    def _agrees_with_loop(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Compare the first samples with the per-sample loop; warn and return False if the
        rules got them wrong (a layer that reads another dim than the batch as the sample)."""
        job = self.job
        n = min(CHECK_SAMPLES, x.shape[0])
        try:
            expected = LoopBackend(job).sqnorms(x[:n]).to(out.dtype)         # (n, P)
        except Exception as err:  # noqa: BLE001 - a model that cannot run one sample alone
            if is_out_of_memory(err):
                raise
            return True  # no per-sample reference to hold the rules to

        got = out[:n]
        rtol = _check_rtol(job, out.dtype)
        # Each entry within rtol of itself, with a floor of rtol * 1e-3 of the sample's total.
        floor = 1e-3 * expected.sum(dim=1, keepdim=True)
        bad = (got - expected).abs() > rtol * (expected.abs() + floor) + 1e-30
        if not bool(bad.any()):
            return True
        names = [job.params[j][0] for j in bad.any(dim=0).nonzero().flatten().tolist()]
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        warnings.warn(
            f"backend='hooks': the per-layer rules disagree with the per-sample loop for {shown}; a "
            "layer probably sees another dim than the batch first (e.g. sequence-first data) or the "
            "model mixes samples. Scoring continues exactly, but more slowly, through vmap/loop; use "
            "batch-first layouts, or pass backend='vmap' to skip this check.",
            HooksFallbackWarning, stacklevel=3)
        return False

    def _forward_and_backward(self, x: torch.Tensor, out: torch.Tensor) -> set[int]:
        """Fill ``out`` with every rule-scored column; return the ids of measured parameters
        that need the fallback."""
        job = self.job
        calls: list[_Call] = []
        missed: set[int] = set()   # parameters a rule did not return: they go to the fallback
        found: dict[int, torch.Tensor] = {}   # column -> per-sample squared norms from the rules
        # Checked [1, ...] parameters take per-sample copies in this forward (see _try_copies).
        copies = _per_sample_copies(self.copied, x.shape[0])
        handles = []
        try:
            for module, rule, mine in self.ruled:
                # prepend: the rule needs the layer's own output, before a user's forward hook
                # can replace it (hooks run in order, each given the previous one's result)
                handles.append(module.register_forward_hook(
                    self._recorder(module, rule, mine, calls, found, missed, x.shape[0]), prepend=True))
            loss = job.losses(x, copies).sum()
        finally:
            for h in handles:
                h.remove()
        if not loss.requires_grad:
            return set()  # no measured parameter reaches the loss: every norm is 0

        fired: dict[nn.Module, int] = {}
        for c in calls:
            fired[c.module] = fired.get(c.module, 0) + 1
        single = {c.node for c in calls if fired[c.module] == 1}
        uses, reachable, above_another = _graph_facts(loss.grad_fn, {c.node for c in calls}, single)
        covered: set[int] = set()
        for module, _, mine in self.ruled:
            if fired.get(module) == 1:
                covered.update(id(p) for p in mine if uses.get(id(p), 0) == 1)
        for c in calls:
            c.active = c.node in single and c.node in reachable
        # Capture only the outputs nearest the input: the backward to them passes through every
        # other active layer output, whose tensor hooks then fire on the way.
        edges = [c.edge for c in calls if c.active and c.node not in above_another]
        try:
            if edges or copies:
                grads = torch.autograd.grad(loss, [*edges, *copies.values()], allow_unused=True)
                for name, g in zip(copies, grads[len(edges):]):
                    found[self.columns[id(self.copied[name])]] = _per_sample_sqnorm(
                        g, x.shape[0], job.accum_dtype, x.device)
        finally:
            # Break the cycle output node -> tensor hook -> call -> node: autograd nodes are not
            # traversed by Python's collector, so the cycle would keep every chunk's graph alive.
            for c in calls:
                c.inputs = c.edge = c.node = None
        if found:  # one write for all columns instead of one per parameter
            cols = list(found)
            out[:, cols] = torch.stack([found[j].to(out.dtype) for j in cols], dim=1)
        covered -= missed
        return {id(p) for _, p in job.params if uses.get(id(p), 0) > 0 and id(p) not in covered}

    def _recorder(self, module, rule, mine, calls: list, found: dict, missed: set, batch: int):
        columns = self.columns

        def on_forward(_module, inputs, output):
            # A call the rule cannot read (no grad, keyword-only input, samples folded into
            # other dims as in x.view(-1, d)) is not recorded: the module's parameters then
            # go to the fallback.
            if not isinstance(output, torch.Tensor) or not output.requires_grad or not inputs \
                    or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() == 0 \
                    or inputs[0].shape[0] != batch or output.dim() == 0 or output.shape[0] != batch:
                return
            call = _Call(module, inputs, get_gradient_edge(output))
            calls.append(call)

            def on_grad(grad: torch.Tensor) -> None:
                if not call.active or call.inputs is None:
                    return
                inputs, call.inputs = call.inputs, None   # nothing is kept past its layer
                try:
                    result = rule(module, inputs, (grad,))
                except Exception as err:  # noqa: BLE001 - a layer the rule cannot read: exact fallback
                    if is_out_of_memory(err):
                        raise
                    _warn_rule_failed(rule, module, err)
                    missed.update(id(p) for p in mine)
                    return
                norms = {id(p): v for p, v in check_rule_result(result, rule, module, batch).items()}
                for p in mine:
                    if id(p) in norms:
                        col = columns[id(p)]
                        found[col] = found[col] + norms[id(p)] if col in found else norms[id(p)]
                    else:
                        missed.add(id(p))

            output.register_hook(on_grad)

        return on_forward

    def _fallback(self, params: list[tuple[str, nn.Parameter]]) -> Backend:
        key = tuple(n for n, _ in params)
        engine = self._fallbacks.get(key)
        if engine is None:
            engine = _ExactFallback(dataclasses.replace(self.job, params=params))
            self._fallbacks[key] = engine
        return engine

    def close(self) -> None:
        for engine in self._fallbacks.values():
            engine.close()
        self._fallbacks.clear()


def _check_rtol(job: ScoringJob, dtype: torch.dtype) -> float:
    """The self-checks' relative tolerance for squared norms of this dtype and precision."""
    return CHECK_RTOL_AUTOCAST if job.autocast is not None else CHECK_RTOL.get(dtype, 1e-3)


def _per_sample_copies(named: dict[str, nn.Parameter], batch: int) -> dict[str, torch.Tensor]:
    """For each [1, ...] parameter, ``batch`` leaf copies [batch, ...] of its values."""
    return {n: p.detach().expand(batch, *p.shape[1:]).clone().requires_grad_(True) for n, p in named.items()}


def _per_sample_sqnorm(g: torch.Tensor | None, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """||g_b||^2 per row of a per-sample gradient [B, ...] (zeros where it is unused)."""
    if g is None:
        return torch.zeros(batch, dtype=dtype, device=device)
    return g.to(dtype).flatten(1).pow(2).sum(dim=1)


def _trusted_rule(module: nn.Module):
    """The module's rule, if its computation is the one the rule was written for: a rule
    inherited from a base class is used only when the subclass keeps that class's forward and
    every method it calls (a subclass that pads in its own ``_conv_forward`` or rescales in its
    own ``forward`` goes to the fallback unless it registers a rule)."""
    rule = find_norm_rule(module)
    if rule is None:
        return None
    for cls in type(module).__mro__:
        if NORM_RULES.get(cls) is rule:
            return rule if _same_computation(type(module), cls) else None
    return None


# Methods a subclass may override without changing what the layer computes.
HARMLESS_OVERRIDES = {"extra_repr", "reset_parameters", "_load_from_state_dict", "_save_to_state_dict"}


def _same_computation(sub: type, cls: type) -> bool:
    """``sub`` keeps every method ``cls`` and its bases below nn.Module define (dunders aside)."""
    for klass in cls.__mro__:
        if klass is nn.Module or not issubclass(klass, nn.Module):
            break
        for name, value in vars(klass).items():
            if callable(value) and not name.startswith("__") and name not in HARMLESS_OVERRIDES:
                if getattr(sub, name, None) is not getattr(cls, name, None):
                    return False
    return True


def _warn_rule_failed(rule, module: nn.Module, err: Exception) -> None:
    warnings.warn(
        f"backend='hooks': the norm rule {rule_name(rule)} failed on a {type(module).__name__} "
        f"({type(err).__name__}: {err}); that layer's parameters are scored exactly by the fallback "
        "(vmap/loop), more slowly. Register a rule for this layer type to speed it up.",
        HooksFallbackWarning, stacklevel=2)


class _ExactFallback(Backend):
    """vmap(grad) over a few parameters; the per-sample loop if vmap cannot run the model.

    Runs the chunk in pieces of vmap's own chunk size: vmap holds one gradient per sample of
    every parameter it scores (a tied embedding can be large), the rules do not.
    """

    name = "hooks-fallback"

    def __init__(self, job):
        super().__init__(job)
        # vmap refuses some jobs up front (BatchNorm under autocast): those start on the loop
        self.engine: Backend = VmapBackend(job) if VmapBackend.supports(job) else LoopBackend(job)
        self.piece: int | None = None

    def sqnorms(self, x: torch.Tensor) -> torch.Tensor:
        if self.piece is None:
            self.piece = max(1, int(self.engine.chunk_size(x[:1])))
        return torch.cat([self._run(part) for part in x.split(self.piece)])

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.engine, VmapBackend):
            try:
                return self.engine.sqnorms(x)
            except Exception as err:  # noqa: BLE001 - any vmap limitation; OOM goes up to halve the chunk
                if is_out_of_memory(err):
                    raise
                self.engine = LoopBackend(self.job)
        return self.engine.sqnorms(x)


def _graph_facts(root, hooked: set, candidates: set):
    """Walk the autograd graph from ``root`` once.

    hooked: the output nodes of every recorded layer call; candidates: those whose rule will
    run. Returns (uses, reachable, above_another):
      uses[id(param)]  how many times the forward used each leaf parameter. Edges into its
                       AccumulateGrad count one each, except that a single-input node (a cast,
                       a transpose) that is not a layer output passes on the count of its own
                       consumers, so autocast's cached weight cast used twice counts twice.
      reachable        the hooked nodes the loss reaches.
      above_another    the candidate nodes with another candidate node somewhere below them.
    """
    parents: dict = {root: []}
    children: dict = {}
    order = []
    stack = [root]
    while stack:
        node = stack.pop()
        order.append(node)
        kids = [nxt for nxt, _ in node.next_functions if nxt is not None]
        children[node] = kids
        for nxt in kids:
            if nxt not in parents:
                parents[nxt] = []
                stack.append(nxt)
            parents[nxt].append(node)

    through: dict = {}

    def uses_through(node) -> int:
        if node in through:
            return through[node]
        if node is root or node in hooked or len(children[node]) != 1:
            count = 1
        else:
            count = sum(uses_through(p) for p in parents[node])
        through[node] = count
        return count

    uses: dict[int, int] = {}
    for node in order:
        variable = getattr(node, "variable", None)
        if variable is not None and type(node).__name__ == "AccumulateGrad":
            uses[id(variable)] = uses.get(id(variable), 0) + sum(uses_through(p) for p in parents[node])

    # Whether a candidate lies below each node, children before parents.
    has_below: dict = {}
    for node in _topological(root, children):
        has_below[node] = any(kid in candidates or has_below[kid] for kid in children[node])
    above_another = {n for n in candidates if has_below.get(n, False)}
    reachable = {n for n in hooked if n in parents}
    return uses, reachable, above_another


def _topological(root, children) -> list:
    """Nodes so that every node comes after all nodes below it (children first)."""
    seen, result = set(), []
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            result.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        for kid in children[node]:
            if kid not in seen:
                stack.append((kid, False))
    return result
