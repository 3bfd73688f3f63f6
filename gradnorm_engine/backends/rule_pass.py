"""One recorded forward and backward of the hooks backend: the rules score what they can.

    plan = RulePlan(job)                                    # columns; the layers with a user rule
    out, needs_fallback = RulePass(plan, job, B).run(x)     # [B, K, P]; {id(parameter): why}

1. The forward runs under the recorder (backends/recording.py), which keeps every op call that
   takes a measured parameter (or a tensor derived from parameters) with batched data, with the
   sample layout of its tensors, and hooks its output; layers whose norm rule a user registered
   are recorded whole, by a forward hook that runs before any user forward hook.
2. The coverage check (backends/coverage.py) decides from the autograd graph which parameters the
   rules cover, which of them one rule scores as a norm and which take per-sample gradients.
3. One ``torch.autograd.grad`` of the summed loss per loss of the objective asks only for the
   gradients of the lowest recorded outputs: no parameter gradient is ever formed. As the
   backward reaches each recorded output, its tensor hook runs the op's rule (norms/ops.py) on
   (the recorded arguments, d L / d output).
4. Per-sample gradients of derived tensors are carried to their parameters by one batched
   vector-Jacobian product; per-sample gradients of a parameter's uses are summed, then squared.

``run`` returns the measured parameters the rules did not score, each with the reason, for the
exact fallback; ``RulePass.uses`` says how each one was scored (for ``gradnorm_engine.explain``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import warn_at_caller
from ..inputs import ModelInputs
from ..job import Objective, ScoringJob
from ..memory import is_out_of_memory
from ..norms import BUILT_IN_RULES, NORM_RULES, NormRule, check_rule_result, find_norm_rule, rule_name
from ..norms.layout import Unknown, is_unknown
from ..norms.ops import GENERIC, OP_RULES, describe_form, per_sample_result
from .coverage import Coverage, derived_vjp
from .recording import ModuleCall, Recorder


class HooksFallbackWarning(UserWarning):
    """The rules could not score something (they disagreed with the per-sample loop, or a rule
    failed on a layer); that part of the job continues on the exact fallback."""


class RulePlan:
    """For one job: the column of each measured parameter, and the layers with a user rule.

    ``columns`` maps id(parameter) to its column in the [B, P] result (``job.params`` order);
    ``ruled`` lists (layer, rule, its measured parameters) for every layer whose norm rule a user
    registered (``register_norm_rule``), in ``model.modules()`` order.
    """

    def __init__(self, job: ScoringJob):
        self.columns = {id(p): j for j, (_, p) in enumerate(job.params)}
        names = {m: n for n, m in job.model.named_modules()}
        self.ruled: list[tuple[nn.Module, NormRule, list[nn.Parameter]]] = []
        self.names: dict[nn.Module, str] = {}
        for m in job.model.modules():
            rule = user_rule(m)
            mine = [p for p in m._parameters.values() if p is not None and id(p) in self.columns]
            if rule is not None and mine:
                self.ruled.append((m, rule, mine))
                self.names[m] = names.get(m, type(m).__name__) or "(model)"

    def widest(self, job: ScoringJob) -> int:
        """Entries of the largest measured parameter (a Gram form holds about one per sample)."""
        return max((p.numel() for _, p in job.params), default=0)


class RulePass:
    """The rules' work on one chunk: what they found and which parameters they missed."""

    def __init__(self, plan: RulePlan, job: ScoringJob, batch: int):
        self.plan, self.job, self.batch = plan, job, batch
        self.weights: torch.Tensor | None = None   # the objective's weights [B, K], when there is one
        self.uses: dict[int, list[str]] = {}       # id(parameter) -> how each use was scored
        self.coverage: Coverage | None = None
        self.failed: dict[int, str] = {}
        self._noting = True

    def run(self, x: ModelInputs, objective: Objective | None = None) -> tuple[torch.Tensor, dict[int, str]]:
        """Squared norms [B, K, P] for the K losses of ``objective`` (the job's loss: K = 1), from
        one forward and one backward per loss, in the columns the rules score, zero elsewhere;
        and {id(parameter): reason} for the measured parameters that need the fallback.

        A single sample runs as two copies of itself (row 0 is returned): with B = 1 every dim
        of every tensor could hold the batch, so the layout tracker's reshapes pick one each and
        later ops find their operands disagreeing (nn.MultiheadAttention's head split, a ViT's
        attention), which would send every parameter behind them to the fallback. The sample
        first runs alone, without a graph, so that a model that cannot (one that squeezes the
        batch dim away) raises as it would in the other backends."""
        if self.batch == 1 and len(x) == 1:
            with torch.no_grad():
                self.job.objective_losses(x, objective)
            self.batch = 2
            try:
                out, reasons = self.run(ModelInputs.cat([x, x]), objective)
            finally:
                self.batch = 1
            self.weights = None if self.weights is None else self.weights[:1]
            return out[:1], reasons
        job = self.job
        recorder, losses, coverage = self._record(x, objective)
        try:
            out = torch.zeros(self.batch, losses.shape[1], len(job.params), dtype=job.accum_dtype,
                              device=x.device)
            if coverage is None:
                return out, {}   # no measured parameter reaches the losses: every norm is 0
            self.failed = dict(coverage.failed)
            last = losses.shape[1] - 1
            for k in range(losses.shape[1]):
                self._noting = k == 0            # explain() describes the uses once
                found = self._backward(recorder, coverage, losses[:, k].sum(), last=k == last)
                for pid, value in found.items():
                    if pid not in self.failed:
                        out[:, k, self.plan.columns[pid]] = value.to(out.dtype)
        finally:
            # Break the cycle output node -> tensor hook -> call -> node: autograd nodes are not
            # traversed by Python's collector, so the cycle would keep every chunk's graph alive.
            recorder.release()
        return out, {pid: why for pid, why in self.failed.items() if pid in coverage.in_graph}

    def per_sample_entries(self, x: ModelInputs) -> int:
        """Entries of the per-sample gradients the pass holds for one sample of ``x`` at once
        (those of every parameter and derived tensor scored as gradients, and of the parameters
        behind derived tensors, plus the largest one the generic rule materialises), from the
        recorded forward and the coverage check alone: no backward, no rule runs."""
        recorder, _, coverage = self._record(x, None)
        try:
            return 0 if coverage is None else _per_sample_entries(coverage, recorder)
        finally:
            recorder.release()

    def _record(self, x: ModelInputs, objective: Objective | None) -> tuple[Recorder, torch.Tensor, Coverage | None]:
        """The recorded forward and its coverage check: (the recorder, the losses [B, K], the
        Coverage, None where no measured parameter reaches the losses). The caller releases the
        recorder (it does so itself when this raises)."""
        measured = {id(p): p for _, p in self.job.params}
        recorder = Recorder(self.batch, measured, x.tensors())
        try:
            handles = self._module_hooks(recorder)
            try:
                with recorder:
                    losses, self.weights = self.job.objective_losses(x, objective)      # (B, K)
            finally:
                for h in handles:
                    h.remove()
            if not losses.requires_grad:
                return recorder, losses, None
            lay = recorder.layout(losses)
            if lay != (0, 1) and losses.grad_fn is not None:   # row b is not sample b's alone
                recorder.mixing.setdefault(losses.grad_fn, lay if is_unknown(lay) else Unknown(
                    "the losses", "their rows are not the samples"))
            self.coverage = Coverage(losses.sum().grad_fn, recorder, measured)
        except BaseException:
            recorder.release()
            raise
        return recorder, losses, self.coverage

    def _backward(self, recorder: Recorder, coverage: Coverage, loss: torch.Tensor, last: bool
                  ) -> dict[int, torch.Tensor]:
        """One loss's backward through the rules -> {id(parameter): squared norms [B]}; after the
        ``last`` loss's, each call's activations are dropped as soon as its rule has run."""
        norms: dict[int, torch.Tensor] = {}
        grads: dict[int, torch.Tensor] = {}     # id(parameter or derived tensor) -> summed per-sample gradients
        done: set[int] = set()

        def on_grad(call, grad):
            if id(call) in done or id(call) not in coverage.active_ids:
                return
            done.add(id(call))
            if isinstance(call, ModuleCall):
                self._module_rule(call, grad, norms)
            else:
                self._op_rule(call, grad, coverage, norms, grads)
            if last:
                call.free_inputs()

        recorder.on_grad = on_grad
        try:
            if coverage.edges:
                torch.autograd.grad(loss, coverage.edges, allow_unused=True, retain_graph=not last)
        finally:
            recorder.on_grad = None
        measured = recorder.measured
        derived = {d: g for d, g in grads.items() if d in recorder.derived and not self._failed_tensor(d, recorder)}
        for pid, g in derived_vjp(derived, recorder, measured).items():
            grads[pid] = grads[pid] + g if pid in grads else g
        found = dict(norms)
        for pid, g in grads.items():
            if pid in measured:
                found[pid] = per_sample_result(g.to(self.job.accum_dtype), True)
        return found

    def _failed_tensor(self, tid: int, recorder: Recorder) -> bool:
        if tid in self.failed:
            return True
        return any(p in self.failed for p in recorder.derived_from.get(tid, ()))

    def _fail(self, tensor: torch.Tensor, recorder: Recorder, reason: str) -> None:
        tid = id(tensor)
        for pid in ((tid,) if tid in recorder.measured else recorder.derived_from.get(tid, ())):
            self.failed.setdefault(pid, reason)

    def _op_rule(self, call, grad: torch.Tensor, coverage: Coverage, norms: dict, grads: dict) -> None:
        recorder = coverage.recorder
        slots = {s: t for s, t in call.pins.items() if not self._failed_tensor(id(t), recorder)}
        if not slots:
            return
        try:
            result = call.rule.fn(call, grad, lambda slot: coverage.wants_norm(call.pins[slot]))
        except Exception as err:  # noqa: BLE001 - an op form the rule cannot read: exact fallback
            if is_out_of_memory(err):
                raise
            _warn_op_rule_failed(call, err)
            for t in slots.values():
                self._fail(t, recorder, f"the rule for `{call.name}` failed ({type(err).__name__}: {err})")
            return
        for slot, t in slots.items():
            value = result.get(slot) if isinstance(result, dict) else None
            as_norm = coverage.wants_norm(t)
            want = (self.batch,) if as_norm else (self.batch, *t.shape)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != want:
                self._fail(t, recorder, f"the rule for `{call.name}` returned no {'norms' if as_norm else 'gradients'} "
                                        f"of shape {list(want)}")
                continue
            self._note(t, recorder, call, as_norm)
            if as_norm:
                norms[id(t)] = value
            else:
                grads[id(t)] = grads[id(t)] + value if id(t) in grads else value

    def _module_rule(self, call: ModuleCall, grad: torch.Tensor, norms: dict) -> None:
        try:
            result = call.rule(call.module, call.inputs, (grad,))
        except Exception as err:  # noqa: BLE001 - a layer the rule cannot read: exact fallback
            if is_out_of_memory(err):
                raise
            _warn_rule_failed(call.rule, call.module, err)
            for p in call.params:
                self.failed.setdefault(id(p), f"the norm rule {rule_name(call.rule)} failed "
                                              f"({type(err).__name__}: {err})")
            return
        values = {id(p): v for p, v in check_rule_result(result, call.rule, call.module, self.batch).items()}
        for p in call.params:
            if id(p) in values:
                norms[id(p)] = values[id(p)]
                if self._noting:
                    self.uses.setdefault(id(p), []).append(f"the norm rule {rule_name(call.rule)} of {call.name}")
            else:
                self.failed.setdefault(id(p), f"the norm rule {rule_name(call.rule)} returned no entry for it")

    def _note(self, tensor: torch.Tensor, recorder: Recorder, call, as_norm: bool) -> None:
        """What explain() says of this use: the op, its form, and how it reaches each parameter."""
        if not self._noting:
            return
        slot = next(s for s, t in call.pins.items() if t is tensor)
        form = describe_form(call, slot, as_norm)
        what = f"`{call.name}`" + (f": {form}" if form else "")
        tid = id(tensor)
        if tid in recorder.measured:
            self.uses.setdefault(tid, []).append(what)
        else:
            for pid in recorder.derived_from.get(tid, ()):
                self.uses.setdefault(pid, []).append(
                    f"{what} of a tensor derived from it, carried back by a batched VJP")

    def _module_hooks(self, recorder: Recorder) -> list:
        """Forward pre- and post-hooks on every layer with a user rule: its own parameters are not
        recorded inside it, and its output is one recorded call of the rule. Prepended: the rule
        needs the layer's own output, before a user's forward hook can replace it."""
        handles = []
        for module, rule, mine in self.plan.ruled:
            name = self.plan.names[module]

            def before(_m, _inputs, mine=mine):
                recorder.enter_module(mine)

            def after(m, inputs, output, rule=rule, mine=mine, name=name):
                recorder.exit_module(m, rule, mine, inputs, output, name)

            handles.append(module.register_forward_pre_hook(before, prepend=True))
            handles.append(module.register_forward_hook(after, prepend=True))
        return handles


def _per_sample_entries(coverage: Coverage, recorder: Recorder) -> int:
    """Entries per sample of the per-sample gradients the pass holds at once: those of every
    parameter and derived tensor scored as gradients (and of the parameters behind derived
    tensors), plus the largest one the generic rule materialises on the way to a norm."""
    summed, generic = {}, 0
    for call in coverage.calls:
        if isinstance(call, ModuleCall):
            continue
        for t in call.pins.values():
            if not coverage.wants_norm(t):
                summed[id(t)] = t.numel()
            elif call.rule is OP_RULES[GENERIC]:
                generic = max(generic, t.numel())
    behind = sum(recorder.measured[p].numel() for p in coverage.behind_derived if p in recorder.measured)
    return sum(summed.values()) + behind + generic


def user_rule(module: nn.Module) -> NormRule | None:
    """The rule a user registered for ``module``'s class (or a base class), if its computation is
    the one the rule was written for; None for layers the op rules score (the built-in ones).

    A rule inherited from a base class is used only when the subclass keeps that class's forward
    and every method it calls; a subclass that rescales in its own ``forward`` is recorded op by op
    instead."""
    rule = find_norm_rule(module)
    if rule is None:
        return None
    for cls in type(module).__mro__:
        if cls in NORM_RULES:
            if BUILT_IN_RULES.get(cls) is NORM_RULES[cls]:
                return None
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
    warn_at_caller(
        f"backend='hooks': the norm rule {rule_name(rule)} failed on a {type(module).__name__} "
        f"({type(err).__name__}: {err}); that layer's parameters are scored exactly by the fallback "
        "(vmap/loop), more slowly. Register a rule for this layer type to speed it up.", HooksFallbackWarning)


def _warn_op_rule_failed(call, err: Exception) -> None:
    warn_at_caller(
        f"backend='hooks': the rule {call.rule.name} for `{call.name}` failed ({type(err).__name__}: {err}); "
        "the parameters it takes are scored exactly by the fallback (vmap/loop), more slowly. "
        "gradnorm_engine.explain(model, batch) shows what each parameter is scored by.", HooksFallbackWarning)
