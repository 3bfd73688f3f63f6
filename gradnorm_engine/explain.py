"""How the hooks backend scores each parameter of a model, and why: one recorded pass on one batch.

    report = explain(model, batch)          # a loader batch, as score_pool reads it; same options
    print(report)                            # one line per parameter, grouped by how it is scored
    report.fallback                          # the parameters left to the slow exact fallback
    report["encoder.layers.0.self_attn.in_proj_weight"].uses     # nn.TransformerEncoder's attention

Per measured parameter, ``scored_by`` is one of
  "rule"          one op rule scores its norm in closed form (``uses``: the op and its form:
                  gram / materialise / pixel_gram / rank one / rows per distinct id / ...)
  "summed"        several uses (tied weights, a layer applied twice, packed attention weights):
                  per-sample gradients of each use, summed before the norm
  "derived"       it reaches the ops through tensors derived from it (weight_norm, spectral_norm,
                  a table lookup, a split): per-sample gradients carried back by a batched VJP
  "layer rule"    the norm rule a user registered for its layer
  "fallback"      the exact fallback (vmap(grad), or the per-sample loop) scores it; ``reason``
                  says which op lost the sample layout, which use the recording did not see, or
                  which rule failed
  "unused"        the loss does not reach it: its gradient, and its score, are 0
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .backends import check_backend_name
from .backends.hooks import HooksBackend
from .backends.rule_pass import RulePass, RulePlan
from .job import eval_mode, measure_only, on_device
from .options import ScoringOptions

KINDS = ("rule", "summed", "derived", "layer rule", "fallback", "unused")
HEADINGS = {"rule": "scored by one op rule", "summed": "per-sample gradients, summed over its uses",
            "derived": "through tensors derived from it (batched VJP)", "layer rule": "by a user's layer rule",
            "fallback": "by the exact fallback (slow)", "unused": "not reached by the loss (score 0)"}


@dataclass(frozen=True)
class ParameterScoring:
    name: str
    shape: tuple
    scored_by: str
    uses: tuple = ()
    reason: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def line(self) -> str:
        what = self.reason if self.scored_by == "fallback" else "; ".join(self.uses)
        return f"{self.name} {list(self.shape)}" + (f": {what}" if what else "")


@dataclass
class Explanation:
    """What one recorded pass found, per measured parameter (in ``model.named_parameters()`` order)."""

    parameters: list[ParameterScoring]
    batch: int
    supported: bool = True
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> ParameterScoring:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)

    def by(self, kind: str) -> list[ParameterScoring]:
        return [p for p in self.parameters if p.scored_by == kind]

    @property
    def fallback(self) -> list[ParameterScoring]:
        return self.by("fallback")

    @property
    def fallback_share(self) -> float:
        """The share of the measured entries the exact fallback scores."""
        total = sum(p.numel for p in self.parameters)
        return sum(p.numel for p in self.fallback) / max(total, 1)

    def report(self) -> str:
        total = sum(p.numel for p in self.parameters)
        counts = ", ".join(f"{len(self.by(k))} {k}" for k in KINDS if self.by(k))
        lines = [f"hooks backend, one batch of {self.batch}: {len(self.parameters)} parameter tensors "
                 f"({total:,} entries): {counts}; the exact fallback scores {self.fallback_share:.1%} of the entries"]
        lines += [f"note: {n}" for n in self.notes]
        for kind in KINDS:
            group = self.by(kind)
            if group:
                lines.append(f"{HEADINGS[kind]}:")
                lines += [f"  {p.line()}" for p in group]
        return "\n".join(lines)

    __str__ = report


def explain(model: nn.Module, batch: Any, **options) -> Explanation:
    """How ``backend="hooks"`` scores each parameter of ``model`` on ``batch`` (a loader batch:
    a tensor, a tuple, or a mapping, read as score_pool reads it), and why. Takes score_pool's
    options (score, params, logits_fn, input_key(s), num_inputs, label_key, device, autocast, ...).
    Runs one recorded forward and backward, as the backend does on a chunk, without the
    self-check against the per-sample loop; changes nothing in the model. The options that choose
    how a pool is streamed (chunk_size, progress, max_memory) have nothing to act on here;
    ``backend`` may only be "hooks" or "auto" (the other backends score every parameter their one
    way: "vmap" by vmap(grad), "loop" by one backward per sample)."""
    backend = options.get("backend")
    if backend is not None:
        check_backend_name(backend)
    if backend not in (None, "auto", "hooks"):
        raise ValueError(f"explain describes the hooks backend, but backend={backend!r} was passed: that backend "
                         "scores every parameter the same way (vmap: vmap(grad); loop: one backward per sample); "
                         "leave backend out, or pass 'hooks'")
    checked = ScoringOptions.from_kwargs(options)
    job = checked.make_job(model)
    reader = checked.input_reader(job.model, needs_targets=job.loss_fn.needs_targets)
    x = reader.read(batch)
    with on_device(job.model, job.device), eval_mode(job.model), torch.enable_grad():
        x = x.to(job.device)
        notes = []
        supported = HooksBackend.supports(job)
        if not supported:
            notes.append("backend='hooks' refuses this model (a BatchNorm with batch statistics, or TorchScript): "
                         "'auto' scores it with vmap or the loop")
        rule_pass = RulePass(RulePlan(job), job, len(x))
        with measure_only(job):
            _, reasons = rule_pass.run(x)
    coverage = rule_pass.coverage
    parameters = []
    for name, p in job.params:
        pid = id(p)
        uses = tuple(rule_pass.uses.get(pid, ()))
        if pid in reasons:
            kind = "fallback"
        elif coverage is None or pid not in coverage.in_graph or not uses:
            kind = "unused"
        elif pid in coverage.recorder.in_modules:
            kind = "layer rule"
        elif pid in coverage.behind_derived:
            kind = "derived"
        elif pid in coverage.as_norm:
            kind = "rule"
        else:
            kind = "summed"
        parameters.append(ParameterScoring(name, tuple(p.shape), kind, uses, reasons.get(pid, "")))
    return Explanation(parameters, len(x), supported, notes)
