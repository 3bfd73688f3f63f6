"""Per-sample gradient norms from one batched forward and one backward to the layer outputs.

    engine = HooksBackend(job); engine.sqnorms(x)   # x [B, ...] -> [B, P]

The rules' pass (``rule_pass``): forward hooks on every layer with a norm rule
(gradnorm_engine.norms) keep its inputs and hook its output; one ``torch.autograd.grad`` of
the summed loss asks only for gradients w.r.t. layer outputs (no parameter gradient is ever
formed), and each layer's rule turns (inputs, output gradient) into per-sample squared norms.

Exactness for any model: a measured parameter is left to the rules only when one module owns
it, that module ran exactly once, it has a rule, and the autograd graph shows exactly one use
of the parameter. Everything else (bare parameters, layers without a rule, tied weights, a
layer applied twice, weights read outside their module's forward) is scored by the exact
fallback (``fallback.ExactFallback``: ``vmap(grad)`` over just those parameters, or the
per-sample loop when vmap cannot run the model), so per-sample gradients of a shared parameter
are summed before the norm.

The model must treat the samples of a batch independently (eval mode; BatchNorm with running
statistics) and the rules read dim 0 of a layer's input as the sample. A layer that sees
another dim first (sequence-first data) is caught when that dim's size differs from the batch;
for when it happens to be equal, the first chunk of every new size is checked against the
per-sample loop on two samples, and a disagreement (a model the rules cannot read) hands the
whole job to the exact fallback with a ``HooksFallbackWarning``.

What the backend learns while it runs, and how it steps down (``_Downgrades``):
  per parameter  a parameter the rules cannot score goes to the fallback, chunk by chunk;
  copies         a [1, ...] parameter outside every rule (position embedding, class token) is
                 tried once with per-sample copies inside the rules' pass and kept there when
                 it agrees with the fallback; dropped for good if a later chunk cannot take them;
  whole job      rules that disagree with the per-sample loop hand every parameter to the fallback.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..inputs import ModelInputs
from ..job import Objective, ScoringJob, measure_only
from ..memory import activation_elems, chunk_budget, is_out_of_memory
from .base import Backend
from .fallback import ExactFallback
from .loop import LoopBackend
from .rule_pass import HooksFallbackWarning, RulePass, RulePlan, per_sample_copies, per_sample_sqnorm

__all__ = ["HooksBackend", "HooksFallbackWarning"]

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


@dataclass
class _Downgrades:
    """What the backend has learnt about this job's rules, chunk by chunk."""

    checked_sizes: set[tuple] = field(default_factory=set)   # chunk shapes already checked against the loop
    rules_disagree: bool = False                            # the check failed: the fallback scores all
    copied: dict[str, nn.Parameter] = field(default_factory=dict)   # [1, ...] parameters scored by copies
    copies_tried: bool = False


class HooksBackend(Backend):
    """Exact per-sample norms at about the cost of one training step (see the module docstring).

    ``last_fallback`` names the parameters the exact fallback scored in the last chunk.
    """

    name = "hooks"

    def __init__(self, job: ScoringJob):
        super().__init__(job)
        self.plan = RulePlan(job)
        self.downgrades = _Downgrades()
        self._fallbacks: dict[tuple[str, ...], Backend] = {}
        self.last_fallback: tuple[str, ...] = ()   # names scored by the fallback in the last chunk

    @property
    def ruled(self) -> list:
        """(layer, rule, its measured parameters) for every layer the rules may score."""
        return self.plan.ruled

    @property
    def copied(self) -> dict[str, nn.Parameter]:
        """The [1, ...] parameters scored by per-sample copies inside the rules' pass."""
        return self.downgrades.copied

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

    def chunk_size(self, example: ModelInputs | torch.Tensor) -> int:
        if self.job.options.get("chunk_size"):
            return int(self.job.options["chunk_size"])
        job = self.job
        itemsize = torch.finfo(job.accum_dtype).bits // 8
        act = activation_elems(job.model, example, job.autocast_context)
        # The Gram form and the unfolded patches hold up to about one weight's size per sample.
        per_sample = itemsize * (ACTIVATION_COPIES * act + self.plan.widest())
        return max(1, min(MAX_CHUNK, chunk_budget(job.device, job.max_memory) // per_sample))

    def sqnorms_per_loss(self, x: ModelInputs | torch.Tensor, objective: Objective | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, K, P] for the K losses of ``objective`` (the job's loss: K = 1), one forward and one
        backward per loss; the parameters the rules cannot score by the exact fallback."""
        job, state = self.job, self.downgrades
        x = ModelInputs.of(x)
        with measure_only(job):
            if state.rules_disagree or not self.plan.ruled:  # nothing for the rules: skip their forward
                return self._all_by_fallback(x, objective)
            out, weights, fallback = self._by_rules(x, objective)
            self.last_fallback = tuple(n for n, _ in fallback)
            if fallback:
                cols = [self.plan.columns[id(p)] for _, p in fallback]
                sq, _ = self._fallback(fallback).sqnorms_per_loss(x, objective)
                out[:, :, cols] = sq.to(out.dtype)
                if not state.copies_tried and objective is None:
                    state.copies_tried = True
                    state.copied = self._try_copies(x, fallback, out[:, 0])
            # keyed by the shapes: a later chunk whose size equals a sequence length is checked again
            shapes = (len(x), x.signature(), objective is None)
            if shapes not in state.checked_sizes:
                state.checked_sizes.add(shapes)
                if not self._agrees_with_loop(x, out, objective):
                    state.rules_disagree = True
                    return self._all_by_fallback(x, objective)
        return out, weights

    def _by_rules(self, x: ModelInputs, objective: Objective | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[str, nn.Parameter]]]:
        """The rules' pass over ``x``; -> (squared norms [B, K, P] where the rules scored, the
        objective's weights, the (name, parameter)s left to the fallback)."""
        state = self.downgrades
        try:
            out, weights, needs_fallback = self._rule_pass(x, objective, state.copied)
        except Exception as err:  # noqa: BLE001 - see below
            if not state.copied or is_out_of_memory(err):
                raise
            # The per-sample copies, checked on an earlier chunk, do not fit this one (a
            # shape that depends on the batch size): back to the fallback for good.
            state.copied = {}
            out, weights, needs_fallback = self._rule_pass(x, objective, {})
        return out, weights, [(n, p) for n, p in self.job.params if id(p) in needs_fallback]

    def _rule_pass(self, x: ModelInputs, objective: Objective | None, copied: dict):
        rule_pass = RulePass(self.plan, self.job, len(x))
        out, needs_fallback = rule_pass.run(x, copied, objective)
        return out, rule_pass.weights, needs_fallback

    def _all_by_fallback(self, x: ModelInputs, objective: Objective | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.last_fallback = tuple(n for n, _ in self.job.params)
        sq, weights = self._fallback(self.job.params).sqnorms_per_loss(x, objective)
        return sq.to(self.job.accum_dtype), weights

    def _try_copies(self, x: ModelInputs, fallback: list, out: torch.Tensor) -> dict[str, nn.Parameter]:
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
        n = min(CHECK_SAMPLES, len(x))
        try:
            copies = self._copy_sqnorms(x[:n], dict(named))
        except Exception as err:  # noqa: BLE001 - a use the copies cannot take: keep the fallback
            if is_out_of_memory(err):
                raise
            return {}
        rtol = _check_rtol(self.job, out.dtype)
        agreed = {}
        for name, p in named:
            want = out[:n, self.plan.columns[id(p)]]
            got = copies[name].to(out.dtype)
            if bool(((got - want).abs() <= rtol * want.abs() + 1e-30).all()):
                agreed[name] = p
        return agreed

    def _copy_sqnorms(self, x: ModelInputs, named: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Per-sample squared norms of ``named`` parameters through per-sample copies [B, ...]."""
        copies = per_sample_copies(named, len(x))
        loss = self.job.losses(x, copies).sum()
        grads = torch.autograd.grad(loss, list(copies.values()), allow_unused=True)
        return {n: per_sample_sqnorm(g, len(x), self.job.accum_dtype, x.device)
                for n, g in zip(copies, grads)}

    def _agrees_with_loop(self, x: ModelInputs, out: torch.Tensor, objective: Objective | None = None) -> bool:
        """Compare the first samples with the per-sample loop; warn and return False if the
        rules got them wrong (a layer that reads another dim than the batch as the sample)."""
        job = self.job
        n = min(CHECK_SAMPLES, len(x))
        try:
            expected = LoopBackend(job).sqnorms_per_loss(x[:n], objective)[0].to(out.dtype)   # (n, K, P)
        except Exception as err:  # noqa: BLE001 - a model that cannot run one sample alone
            if is_out_of_memory(err):
                raise
            return True  # no per-sample reference to hold the rules to

        expected = expected.transpose(1, 2).reshape(n, -1)   # (n, P*K): each parameter's K columns
        got = out[:n].transpose(1, 2).reshape(n, -1)
        rtol = _check_rtol(job, out.dtype)
        # Each entry within rtol of itself, with a floor of rtol * 1e-3 of the sample's total.
        floor = 1e-3 * expected.sum(dim=1, keepdim=True)
        bad = (got - expected).abs() > rtol * (expected.abs() + floor) + 1e-30
        if not bool(bad.any()):
            return True
        names = [job.params[j // out.shape[1]][0] for j in bad.any(dim=0).nonzero().flatten().tolist()]
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        warnings.warn(
            f"backend='hooks': the per-layer rules disagree with the per-sample loop for {shown}; a "
            "layer probably sees another dim than the batch first (e.g. sequence-first data) or the "
            "model mixes samples. Scoring continues exactly, but more slowly, through vmap/loop; use "
            "batch-first layouts, or pass backend='vmap' to skip this check.",
            HooksFallbackWarning, stacklevel=3)
        return False

    def _fallback(self, params: list[tuple[str, nn.Parameter]]) -> Backend:
        key = tuple(n for n, _ in params)
        engine = self._fallbacks.get(key)
        if engine is None:
            engine = ExactFallback(dataclasses.replace(self.job, params=params))
            self._fallbacks[key] = engine
        return engine

    def close(self) -> None:
        for engine in self._fallbacks.values():
            engine.close()
        self._fallbacks.clear()


def _check_rtol(job: ScoringJob, dtype: torch.dtype) -> float:
    """The self-checks' relative tolerance for squared norms of this dtype and precision."""
    return CHECK_RTOL_AUTOCAST if job.autocast is not None else CHECK_RTOL.get(dtype, 1e-3)
