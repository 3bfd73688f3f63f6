"""What one scoring run needs, resolved once: the model, the measured parameters, the loss.

Backends receive a ``ScoringJob`` and never look at the user's raw options.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .inputs import ModelInputs, check_logits, check_loss, resolve_logits_fn
from .kernels import accum_dtype
from .scores import Score, resolve_score

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Several losses per sample from one forward (expected gradient length: one per class):
# logits [B, C], targets [B] or None -> (losses [B, K], weights [B, K], no gradient through them).
Objective = Callable[[torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ScoringJob:
    model: nn.Module
    params: list[tuple[str, nn.Parameter]]   # the measured parameters, in column order of sqnorms
    loss_fn: Score                           # logits [B, C] (, targets [B]) -> per-sample loss [B]
    logits_fn: Callable[[Any], torch.Tensor]
    device: torch.device
    autocast: torch.dtype | None = None
    max_memory: int | None = None            # bytes the backend may use per chunk; None: from free memory
    options: dict = field(default_factory=dict)  # backend-specific knobs (e.g. chunk_size)

    @property
    def accum_dtype(self) -> torch.dtype:
        """Squared norms are accumulated in fp32, or fp64 for a fp64 model."""
        return accum_dtype(*(p for _, p in self.params))

    def logits(self, x: ModelInputs | torch.Tensor, substitutes: dict[str, torch.Tensor] | None = None
               ) -> torch.Tensor:
        """Forward in the job's precision and take logits; inputs [B, ...] -> [B, C]. ``substitutes``
        maps parameter names to tensors used in their place for this forward only."""
        x = ModelInputs.of(x)
        with self.autocast_context():
            if substitutes:
                out = torch.func.functional_call(self.model, substitutes, x.args, x.kwargs, strict=False)
            else:
                out = self.model(*x.args, **x.kwargs)
        return check_logits(self.logits_fn(out), len(x))

    def losses(self, x: ModelInputs | torch.Tensor, substitutes: dict[str, torch.Tensor] | None = None
               ) -> torch.Tensor:
        """Per-sample losses of a batch; inputs [B, ...] -> [B]."""
        x = ModelInputs.of(x)
        return check_loss(self.loss_fn(self.logits(x, substitutes), x.targets), len(x))

    def objective_losses(self, x: ModelInputs | torch.Tensor, objective: Objective | None = None,
                         substitutes: dict[str, torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The K per-sample losses of ``objective`` from one forward, and their weights: inputs
        [B, ...] -> ([B, K], [B, K]). Without one, the job's own loss: ([B, 1], None)."""
        x = ModelInputs.of(x)
        if objective is None:
            return self.losses(x, substitutes)[:, None], None
        losses, weights = objective(self.logits(x, substitutes), x.targets)
        if not (isinstance(losses, torch.Tensor) and losses.dim() == 2 and losses.shape[0] == len(x)
                and isinstance(weights, torch.Tensor) and weights.shape == losses.shape):
            raise ValueError(f"an objective returns (losses [B, K], weights [B, K]) with B = {len(x)}")
        return losses, weights.detach()

    def autocast_context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)


def select_params(model: nn.Module, params: Iterable | None) -> list[tuple[str, nn.Parameter]]:
    """The parameters to measure: all with requires_grad (default), or the given subset
    (parameters of the model, or their names), always in ``model.named_parameters()`` order."""
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif isinstance(params, (str, torch.Tensor)):
        raise TypeError(f"params takes a list of parameters or of their names, got one {type(params).__name__}; "
                        f"pass it in a list: params=[{params!r}]" if isinstance(params, str) else
                        "params takes a list of parameters or of their names, got one tensor; pass params=[p]")
    else:
        wanted = list(params)
        # tied weights: every alias names the one parameter (named_parameters lists it once)
        by_name = dict(model.named_parameters(remove_duplicate=False))
        ids = set()
        for w in wanted:
            if isinstance(w, str):
                if w not in by_name:
                    raise ValueError(f"params names {w!r}, which is not a parameter of the model; "
                                     "see model.named_parameters() for the names")
                ids.add(id(by_name[w]))
            elif isinstance(w, torch.Tensor):
                ids.add(id(w))
            else:
                raise TypeError(f"params must hold parameters or their names, got {type(w).__name__}")
        chosen = [(n, p) for n, p in named if id(p) in ids]
        if len(chosen) != len(ids):
            raise ValueError("params holds a tensor that is not a parameter of the model")
    if not chosen:
        raise ValueError("no parameter to measure: the model has no parameter with requires_grad=True "
                         "(or params= is empty); unfreeze the parameters to score or pass params=")
    return chosen


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Score in eval mode (BatchNorm running stats, dropout off); restore every module's
    train/eval flag afterwards, also when scoring raises."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was_training in flags:
            m.training = was_training


@contextlib.contextmanager
def measure_only(job: ScoringJob) -> Iterator[None]:
    """Let autograd track exactly the measured parameters for the run (restored afterwards):
    frozen parameters build no graph, and a measured parameter with requires_grad=False is
    still measured, as in the vmap backend."""
    measured = {id(p) for _, p in job.params}
    # Only the parameters whose flag must change (usually none: every parameter measured).
    changed = [p for p in job.model.parameters() if p.requires_grad != (id(p) in measured)]
    try:
        for p in changed:
            p.requires_grad_(not p.requires_grad)
        yield
    finally:
        for p in changed:
            p.requires_grad_(not p.requires_grad)


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Move the model to ``device`` for the run and back afterwards (an exact copy both ways)."""
    home = model_device(model)
    if home == device:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def check_not_meta(model: nn.Module) -> None:
    """Raise ValueError for a model whose parameters or buffers have no data (the meta device)."""
    params = [n for n, t in model.named_parameters() if t.is_meta]
    empty = params + [n for n, t in model.named_buffers() if t.is_meta]
    if empty:
        kinds = "parameters" if len(params) == len(empty) else "parameters and buffers"
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise ValueError(
            f"the model's {kinds} {shown} are on the meta device (shapes without data: the model was built under "
            "torch.device('meta') or an empty-weights context), so there is nothing to score; give it its weights "
            "first: model.to_empty(device='cpu') and then model.load_state_dict(...), or "
            "model.load_state_dict(state, assign=True)")


def scored_module(model: nn.Module) -> nn.Module:
    """The module scored for ``model``: itself, or the module a DistributedDataParallel /
    DataParallel wraps (the wrapper's forward would sync gradients or scatter inputs, which
    per-sample scoring never wants). TypeError for what is not a module, with a hint to one held."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}{_wrapped_module_hint(model)}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def make_job(model: nn.Module, *, score, params, logits_fn, device, autocast, max_memory,
             options: dict | None = None) -> ScoringJob:
    model = scored_module(model)
    check_not_meta(model)
    if autocast not in (None, *AUTOCAST_DTYPES):
        raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {autocast!r}")
    if max_memory is not None and not (max_memory > 0 and math.isfinite(max_memory)):
        raise ValueError(f"max_memory must be a positive, finite number of bytes, got {max_memory}")
    return ScoringJob(
        model=model,
        params=select_params(model, params),
        loss_fn=resolve_score(score),
        logits_fn=resolve_logits_fn(logits_fn),
        device=torch.device(device) if device is not None else model_device(model),
        autocast=AUTOCAST_DTYPES.get(autocast) if autocast else None,
        max_memory=int(max_memory) if max_memory is not None else None,
        options=dict(options or {}),
    )


# Where AL libraries' wrappers keep the torch module: DeepAL's and DeepAL+'s Net (.clf), skorch
# (.module_), baal's ModelWrapper (.model), wrappers in general (.module, .net).
WRAPPED_MODULE_ATTRS = ("clf", "module_", "model", "module", "net")


def _wrapped_module_hint(obj: Any) -> str:
    """'; ... pass its .clf ...' when ``obj`` holds a torch module at a well-known attribute, else ''."""
    for attr in WRAPPED_MODULE_ATTRS:
        try:
            inner = getattr(obj, attr, None)
        except Exception:  # noqa: BLE001 - a property that fails: no hint from it
            continue
        if isinstance(inner, nn.Module):
            return f"; it holds one at .{attr}: pass its .{attr}, the torch module it wraps"
        if attr == "net" and isinstance(inner, type) and issubclass(inner, nn.Module):
            # DeepAL's Net before training: .net is the class, .clf comes with net.train(data)
            return ("; it looks like DeepAL's Net before training: it builds its torch module at .clf in "
                    "net.train(data); train it, then pass net.clf")
    return ""
