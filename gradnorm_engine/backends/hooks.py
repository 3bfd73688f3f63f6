"""Per-sample gradient norms from one batched forward and one backward to the recorded op outputs.

    engine = HooksBackend(job); engine.sqnorms(x)   # x [B, ...] -> [B, P]

The rules' pass (``rule_pass``): the forward runs under a recorder that sees every torch op the
model calls (backends/recording.py), tracks where the samples are in every tensor
(norms/layout.py) and hooks the output of each op that takes a measured parameter; one
``torch.autograd.grad`` of the summed loss asks only for gradients w.r.t. those outputs (no
parameter gradient is ever formed), and each op's rule (norms/ops.py) turns (its recorded
arguments, its output gradient) into per-sample squared norms, or per-sample gradients where a
parameter has several uses or is derived from others.

Exactness for any model: the coverage check (backends/coverage.py) leaves a parameter to the rules
only when every way it reaches the loss runs through a recorded use whose sample layout is known.
Everything else (an op that loses the layout, such as a flip or sort along the batch; a use the
recorder cannot see, inside a custom autograd.Function or TorchScript; a rule that fails) is
scored by the exact fallback (``fallback.ExactFallback``: ``vmap(grad)`` over just those
parameters, or the per-sample loop when vmap cannot run the model).

The layout tracker guesses in two places (a constant expanded to the batch size, an index equal
to arange(B)); for those, and for anything else the rules could get wrong, the first chunk of
every new shape is checked against the per-sample loop on two samples, and a disagreement hands
the whole job to the exact fallback with a ``HooksFallbackWarning``.

What the backend learns while it runs (``_Downgrades``):
  per parameter  a parameter the rules cannot score goes to the fallback, chunk by chunk, with the
                 reason (``last_fallback``, ``last_reasons``); when those parameters hold more than
                 FALLBACK_SHARE of the measured entries, or include one of the LARGEST tensors, a
                 ``FallbackShareWarning`` names them, once per job;
  whole job      rules that disagree with the per-sample loop hand every parameter to the fallback.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import warn_at_caller
from ..inputs import ModelInputs
from ..job import Objective, ScoringJob, measure_only
from ..memory import activation_elems, chunk_budget, is_out_of_memory
from .base import Backend
from .fallback import ExactFallback
from .loop import LoopBackend
from .rule_pass import HooksFallbackWarning, RulePass, RulePlan

__all__ = ["FallbackShareWarning", "HooksBackend", "HooksFallbackWarning"]

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


# The fallback warning: the fallback's parameters hold more than this share of the measured
# entries, or include one of the LARGEST largest measured tensors.
FALLBACK_SHARE = 0.10
LARGEST = 5


class FallbackShareWarning(HooksFallbackWarning):
    """A large part of the measured parameters is scored by the slow exact fallback (named, with the
    reasons); gradnorm_engine.explain(model, batch) says how every parameter is scored."""


@dataclass
class _Downgrades:
    """What the backend has learnt about this job's rules, chunk by chunk."""

    checked_sizes: set[tuple] = field(default_factory=set)   # chunk shapes already checked against the loop
    rules_disagree: bool = False                            # the check failed: the fallback scores all
    warned_share: bool = False                              # FallbackShareWarning given


class HooksBackend(Backend):
    """Exact per-sample norms at about the cost of one training step (see the module docstring).

    ``last_fallback`` names the parameters the exact fallback scored in the last chunk, and
    ``last_reasons`` says why (name -> reason).
    """

    name = "hooks"

    def __init__(self, job: ScoringJob):
        super().__init__(job)
        self.plan = RulePlan(job)
        self.downgrades = _Downgrades()
        self._fallbacks: dict[tuple[str, ...], Backend] = {}
        self.last_fallback: tuple[str, ...] = ()   # names scored by the fallback in the last chunk
        self.last_reasons: dict[str, str] = {}
        self._per_sample_entries: int | None = None

    @property
    def ruled(self) -> list:
        """(layer, rule, its measured parameters) for every layer with a user-registered rule."""
        return self.plan.ruled

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
        # The Gram form and the unfolded patches hold up to about one weight's size per sample;
        # per-sample gradients (shared and derived parameters, the generic rule) one each.
        per_sample = itemsize * (ACTIVATION_COPIES * act + self.plan.widest(job) + self._per_sample_size(example))
        return max(1, min(MAX_CHUNK, chunk_budget(job.device, job.max_memory) // per_sample))

    def _per_sample_size(self, example: ModelInputs | torch.Tensor) -> int:
        """Entries of the per-sample gradients one sample holds, from a recorded forward on two
        copies of ``example`` (0 when it cannot run: the chunk's own pass will say why)."""
        if self._per_sample_entries is None:
            x = ModelInputs.of(example)
            x = ModelInputs.cat([x[:1], x[:1]])
            try:
                with measure_only(self.job):
                    self._per_sample_entries = RulePass(self.plan, self.job, len(x)).per_sample_entries(x)
            except Exception as err:  # noqa: BLE001 - a model the rules cannot run: sized without them
                if is_out_of_memory(err):
                    raise
                self._per_sample_entries = 0
        return self._per_sample_entries

    def sqnorms_per_loss(self, x: ModelInputs | torch.Tensor, objective: Objective | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, K, P] for the K losses of ``objective`` (the job's loss: K = 1), one forward and one
        backward per loss; the parameters the rules cannot score by the exact fallback."""
        job, state = self.job, self.downgrades
        x = ModelInputs.of(x)
        with measure_only(job):
            if state.rules_disagree:
                return self._all_by_fallback(x, objective)
            rule_pass = RulePass(self.plan, job, len(x))
            out, reasons = rule_pass.run(x, objective)
            weights = rule_pass.weights
            fallback = [(n, p) for n, p in job.params if id(p) in reasons]
            self.last_fallback = tuple(n for n, _ in fallback)
            self.last_reasons = {n: reasons[id(p)] for n, p in fallback}
            if fallback:
                cols = [self.plan.columns[id(p)] for _, p in fallback]
                sq, fallback_weights = self._fallback(fallback).sqnorms_per_loss(x, objective)
                out[:, :, cols] = sq.to(out.dtype)
                if weights is None:
                    weights = fallback_weights
            # keyed by the shapes: a later chunk whose size equals a sequence length is checked again
            shapes = (len(x), x.signature(), objective is None)
            if shapes not in state.checked_sizes:
                state.checked_sizes.add(shapes)
                if not self._agrees_with_loop(x, out, objective):
                    state.rules_disagree = True
                    return self._all_by_fallback(x, objective)
            if fallback:   # (after the check: when it fails, its own warning says what happens)
                self._warn_share(fallback)
        return out, weights

    def _warn_share(self, fallback: list[tuple[str, nn.Parameter]]) -> None:
        """Once per job: the fallback scores a large part of the parameters (see FALLBACK_SHARE)."""
        state = self.downgrades
        if state.warned_share:
            return
        total = sum(p.numel() for _, p in self.job.params)
        share = sum(p.numel() for _, p in fallback) / max(total, 1)
        largest = {id(p) for _, p in sorted(self.job.params, key=lambda np_: -np_[1].numel())[:LARGEST]}
        big = [n for n, p in fallback if id(p) in largest]
        if share <= FALLBACK_SHARE and not big:
            return
        state.warned_share = True
        shown = "; ".join(f"{n} ({self.last_reasons[n]})" for n, _ in fallback[:4])
        more = f"; and {len(fallback) - 4} more" if len(fallback) > 4 else ""
        warn_at_caller(
            f"backend='hooks': {len(fallback)} parameter tensor(s) holding {share:.0%} of the measured entries"
            f"{' (among them the largest: ' + ', '.join(big) + ')' if big else ''} are scored by the exact "
            f"fallback (vmap/loop), which is much slower than the rules: {shown}{more}. "
            "gradnorm_engine.explain(model, batch) says how every parameter is scored and why.", FallbackShareWarning)

    def _all_by_fallback(self, x: ModelInputs, objective: Objective | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.last_fallback = tuple(n for n, _ in self.job.params)
        self.last_reasons = {n: "the rules disagreed with the per-sample loop on this job" for n in self.last_fallback}
        sq, weights = self._fallback(self.job.params).sqnorms_per_loss(x, objective)
        return sq.to(self.job.accum_dtype), weights

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
        if out.dtype == torch.float64:
            cause = ("the recording probably guessed where the samples are wrong (a tensor expanded to the batch "
                     "size along a dim that is not the batch: sequence-first data whose length equals the batch "
                     "size), or the model treats a batch otherwise than a sample alone (it reads the batch size)")
        else:
            cause = (f"in {str(out.dtype).replace('torch.', '')}{' autocast' if job.autocast else ''} the usual "
                     "cause is rounding, not the rules: the model's batched kernels round differently from a "
                     "single sample's, and an ill-conditioned sample magnifies it beyond the check's tolerance "
                     "(the float64 model, model.double() with float64 inputs, tells the two apart); else the "
                     "recording guessed where the samples are wrong, or the model reads the batch size")
        warn_at_caller(
            f"backend='hooks': the rules disagree with the per-sample loop for {shown}; {cause}. The job "
            "continues through vmap/loop, more slowly; pass backend='vmap' to skip this check.", HooksFallbackWarning)
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
