"""One recorded forward and backward of the hooks backend: the rules score what they can.

    plan = RulePlan(job)                                # layers whose rules may score which parameters
    needs_fallback = RulePass(plan, job, x).run(out)    # fills the rules' columns of out [B, P]

1. Forward hooks on every planned layer save the layer's inputs and register a tensor hook on
   its output *before* anything downstream can modify it in place (PyTorch hands such a hook
   the gradient of the value the layer returned).
2. One ``torch.autograd.grad`` of the summed loss asks only for gradients w.r.t. layer outputs:
   no parameter gradient is ever formed. As the backward reaches each layer, its tensor hook
   runs the layer's rule on (saved inputs, d L / d output) and drops the saved inputs.
3. A measured parameter is left to its rule only when one module owns it, that module ran
   exactly once, and the autograd graph (``graph.graph_facts``) shows exactly one use of it;
   ``run`` returns the others, for the exact fallback.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from ..inputs import ModelInputs
from ..job import Objective, ScoringJob
from ..memory import is_out_of_memory
from ..norms import NORM_RULES, NormRule, check_rule_result, find_norm_rule, rule_name
from .graph import graph_facts


class HooksFallbackWarning(UserWarning):
    """The rules could not score something (they disagreed with the per-sample loop, or a rule
    failed on a layer); that part of the job continues on the exact fallback."""


class RulePlan:
    """For one job: each layer with a trusted rule, and the measured parameters it alone owns.

    ``columns`` maps id(parameter) to its column in the [B, P] result (``job.params`` order);
    ``ruled`` lists (layer, rule, its parameters) in ``model.modules()`` order.
    """

    def __init__(self, job: ScoringJob):
        self.columns = {id(p): j for j, (_, p) in enumerate(job.params)}
        owners: dict[int, int] = {}
        for m in job.model.modules():
            for p in m._parameters.values():
                if p is not None:
                    owners[id(p)] = owners.get(id(p), 0) + 1
        self.ruled: list[tuple[nn.Module, NormRule, list[nn.Parameter]]] = []
        for m in job.model.modules():
            rule = trusted_rule(m)
            mine = [p for p in m._parameters.values()
                    if p is not None and id(p) in self.columns and owners[id(p)] == 1]
            if rule is not None and mine:
                self.ruled.append((m, rule, mine))

    def widest(self) -> int:
        """Entries of the largest parameter a rule scores (the Gram forms hold about one per sample)."""
        return max((p.numel() for _, _, ps in self.ruled for p in ps), default=0)


class _Call:
    """One call of a planned layer in the current forward."""

    __slots__ = ("module", "rule", "mine", "inputs", "node", "edge", "active")

    def __init__(self, module: nn.Module, rule: NormRule, mine: list, inputs: tuple, edge):
        self.module, self.rule, self.mine = module, rule, mine
        self.inputs: tuple | None = inputs
        self.edge = edge              # GradientEdge of the output, taken before any in-place op
        self.node = edge.node
        self.active = False           # set after the forward when the rule may score this call


class RulePass:
    """The rules' work on one chunk: what they found and which parameters they missed."""

    def __init__(self, plan: RulePlan, job: ScoringJob, batch: int):
        self.plan, self.job, self.batch = plan, job, batch
        self.calls: list[_Call] = []
        self.found: dict[tuple[int, int], torch.Tensor] = {}   # (loss, column) -> squared norms [B]
        self.missed: set[int] = set()              # parameters a rule did not return: the fallback's
        self.loss_index, self.last_loss = 0, 0     # the backward in progress, of 0..last_loss
        self.weights: torch.Tensor | None = None   # the objective's weights [B, K], when there is one

    def run(self, x: ModelInputs, copied: dict[str, nn.Parameter] | None = None,
            objective: Objective | None = None) -> tuple[torch.Tensor, set[int]]:
        """Squared norms [B, K, P] for the K losses of ``objective`` (the job's loss: K = 1), from
        one forward and one backward per loss, in the columns the rules (and the per-sample
        ``copied`` parameters) score, zero elsewhere; and the ids of the measured parameters
        that need the fallback. ``self.weights`` holds the objective's weights [B, K]."""
        job, copied = self.job, copied or {}
        # Checked [1, ...] parameters take per-sample copies in this forward (hooks.HooksBackend).
        copies = per_sample_copies(copied, self.batch)
        handles = []
        try:
            for module, rule, mine in self.plan.ruled:
                # prepend: the rule needs the layer's own output, before a user's forward hook
                # can replace it (hooks run in order, each given the previous one's result)
                handles.append(module.register_forward_hook(self._recorder(module, rule, mine), prepend=True))
            losses, self.weights = job.objective_losses(x, objective, copies)      # (B, K)
        finally:
            for h in handles:
                h.remove()
        out = torch.zeros(self.batch, losses.shape[1], len(job.params), dtype=job.accum_dtype, device=x.device)
        if not losses.requires_grad:
            return out, set()  # no measured parameter reaches the losses: every norm is 0

        covered, edges = self._trust_the_graph(losses.sum())
        self.last_loss = losses.shape[1] - 1
        try:
            for k in range(losses.shape[1]) if edges or copies else ():
                # One backward per loss; the saved inputs stay until the last (retain_graph).
                self.loss_index = k
                grads = torch.autograd.grad(losses[:, k].sum(), [*edges, *copies.values()], allow_unused=True,
                                            retain_graph=k < self.last_loss)
                for name, g in zip(copies, grads[len(edges):]):
                    self.found[k, self.plan.columns[id(copied[name])]] = per_sample_sqnorm(
                        g, self.batch, job.accum_dtype, x.device)
        finally:
            # Break the cycle output node -> tensor hook -> call -> node: autograd nodes are not
            # traversed by Python's collector, so the cycle would keep every chunk's graph alive.
            for c in self.calls:
                c.inputs = c.edge = c.node = None
        if self.found:  # one write for all columns instead of one per parameter
            keys = list(self.found)
            ks = torch.tensor([k for k, _ in keys], device=out.device)
            js = torch.tensor([j for _, j in keys], device=out.device)
            out[:, ks, js] = torch.stack([self.found[key].to(out.dtype) for key in keys], dim=1)
        scored = covered - self.missed
        return out, {id(p) for _, p in job.params if self.uses.get(id(p), 0) > 0 and id(p) not in scored}

    def _trust_the_graph(self, loss: torch.Tensor) -> tuple[set[int], list]:
        """Decide from the graph which calls' rules run: -> (ids of the parameters the rules
        cover, the output edges to ask the backward for)."""
        fired: dict[nn.Module, int] = {}
        for c in self.calls:
            fired[c.module] = fired.get(c.module, 0) + 1
        single = {c.node for c in self.calls if fired[c.module] == 1}
        self.uses, reachable, above_another = graph_facts(loss.grad_fn, {c.node for c in self.calls}, single)
        covered: set[int] = set()
        for module, _, mine in self.plan.ruled:
            if fired.get(module) == 1:
                covered.update(id(p) for p in mine if self.uses.get(id(p), 0) == 1)
        for c in self.calls:
            c.active = c.node in single and c.node in reachable
        # Capture only the outputs nearest the input: the backward to them passes through every
        # other active layer output, whose tensor hooks then fire on the way.
        return covered, [c.edge for c in self.calls if c.active and c.node not in above_another]

    def _recorder(self, module: nn.Module, rule: NormRule, mine: list):
        batch = self.batch

        def on_forward(_module, inputs, output):
            # A call the rule cannot read (no grad, keyword-only input, samples folded into
            # other dims as in x.view(-1, d)) is not recorded: the module's parameters then
            # go to the fallback.
            if not isinstance(output, torch.Tensor) or not output.requires_grad or not inputs \
                    or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() == 0 \
                    or inputs[0].shape[0] != batch or output.dim() == 0 or output.shape[0] != batch:
                return
            call = _Call(module, rule, mine, inputs, get_gradient_edge(output))
            self.calls.append(call)
            output.register_hook(lambda grad: self._score(call, grad))

        return on_forward

    def _score(self, call: _Call, grad: torch.Tensor) -> None:
        """The tensor hook of a call's output: run its rule on (saved inputs, output gradient)."""
        if not call.active or call.inputs is None:
            return
        inputs = call.inputs
        if self.loss_index == self.last_loss:
            call.inputs = None   # nothing is kept past its layer's last backward
        try:
            result = call.rule(call.module, inputs, (grad,))
        except Exception as err:  # noqa: BLE001 - a layer the rule cannot read: exact fallback
            if is_out_of_memory(err):
                raise
            _warn_rule_failed(call.rule, call.module, err)
            self.missed.update(id(p) for p in call.mine)
            return
        norms = {id(p): v for p, v in check_rule_result(result, call.rule, call.module, self.batch).items()}
        for p in call.mine:
            if id(p) in norms:
                key = (self.loss_index, self.plan.columns[id(p)])
                self.found[key] = self.found[key] + norms[id(p)] if key in self.found else norms[id(p)]
            else:
                self.missed.add(id(p))


def per_sample_copies(named: dict[str, nn.Parameter], batch: int) -> dict[str, torch.Tensor]:
    """For each [1, ...] parameter, ``batch`` leaf copies [batch, ...] of its values."""
    return {n: p.detach().expand(batch, *p.shape[1:]).clone().requires_grad_(True) for n, p in named.items()}


def per_sample_sqnorm(g: torch.Tensor | None, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """||g_b||^2 per row of a per-sample gradient [B, ...] (zeros where it is unused)."""
    if g is None:
        return torch.zeros(batch, dtype=dtype, device=device)
    return g.to(dtype).flatten(1).pow(2).sum(dim=1)


def trusted_rule(module: nn.Module) -> NormRule | None:
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
