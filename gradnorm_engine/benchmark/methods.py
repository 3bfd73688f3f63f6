"""Every way of getting per-sample gradient norms, one function per benchmark row.

Each ``*_method(ctx)`` returns a ``Method`` whose ``fn(x)`` takes a batch x [B, ...] and
returns the Frobenius score ||d H(x_i) / d theta|| of the samples it covered ([n], n =
``samples_per_call``), or None for the floors, which compute no per-sample norm. H is the
softmax entropy (``gradnorm_engine.scores.entropy``), theta every trainable parameter.

Rows:
  loop        per-sample backward on the first ``loop_samples`` samples: batch of one,
              autograd.grad, squared norms; what the public LPLgrad code does
  vmap-naive  the torch.func tutorial: vmap(grad) over the whole batch, per-tensor norms
  <backend>   every engine backend registered in gradnorm_engine.backends.BACKENDS (but
              ``loop``, which the ``loop`` row already is), hot path ``sqnorms`` on the batch
  opacus      Opacus' GradSampleModule (per-sample gradients from hooks), when importable
  fwd_bwd     batched forward + backward of the summed entropy: one training step's work
  forward     batched forward and entropy without gradients: the inference floor

A method that cannot run (an Opacus refusal, a backend whose ``supports`` says no) raises
``MethodUnavailable``; the runner turns that into a row with an ``error`` field.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..backends import BACKENDS
from ..job import make_job
from ..reduction import reduce_sqnorms
from ..scores import entropy
from .workloads import autocast_context

FLOORS = ("fwd_bwd", "forward")


class MethodUnavailable(RuntimeError):
    """This method cannot run on this model or machine; the message says why."""


@dataclass
class MethodContext:
    model: nn.Module              # eval mode, on ``device``
    device: torch.device
    autocast: torch.dtype | None  # None (fp32/tf32) or torch.bfloat16
    loop_samples: int             # how many samples one ``loop`` call covers
    chunk_size: int               # the chunk engine backends are told to use


@dataclass
class Method:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor | None]
    samples_per_call: Callable[[torch.Tensor], int]  # x -> how many samples fn(x) scored
    close: Callable[[], None] = field(default=lambda: None)
    notes: Callable[[], str | None] = field(default=lambda: None)  # after a call: anything worth saying

    @property
    def is_floor(self) -> bool:
        return self.name in FLOORS


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _accumulate(g: torch.Tensor) -> torch.Tensor:
    """Squares are summed in fp32, or fp64 for a fp64 model (the reference)."""
    return g if g.dtype == torch.float64 else g.float()


def _whole_batch(x: torch.Tensor) -> int:
    return int(x.shape[0])


def loop_method(ctx: MethodContext) -> Method:
    model, params = ctx.model, _params(ctx.model)

    def fn(x: torch.Tensor) -> torch.Tensor:
        scores = []
        for i in range(min(ctx.loop_samples, x.shape[0])):
            with autocast_context(ctx.device, ctx.autocast):
                logits = model(x[i : i + 1])
            grads = torch.autograd.grad(entropy(logits)[0], params)
            scores.append(torch.stack([_accumulate(g).pow(2).sum() for g in grads]).sum().sqrt())
        return torch.stack(scores)

    return Method("loop", fn, lambda x: min(ctx.loop_samples, int(x.shape[0])))


def vmap_naive_method(ctx: MethodContext) -> Method:
    """vmap(grad) over the batch, then one norm per parameter tensor, as the tutorial does."""
    model = ctx.model
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_one(theta: dict, x1: torch.Tensor) -> torch.Tensor:
        with autocast_context(ctx.device, ctx.autocast):
            logits = functional_call(model, ({**theta, **frozen}, buffers), (x1.unsqueeze(0),))
        return entropy(logits)[0]

    per_sample_grads = vmap(grad(loss_one), in_dims=(None, 0))

    def fn(x: torch.Tensor) -> torch.Tensor:
        grads = per_sample_grads(params, x)  # {name: [B, *shape]}
        norms = torch.stack([g.float().flatten(1).norm(dim=1) for g in grads.values()], dim=1)  # [B, P]
        return norms.pow(2).sum(dim=1).sqrt()

    return Method("vmap-naive", fn, _whole_batch)


def engine_backend_method(ctx: MethodContext, name: str) -> Method:
    """The engine's backend ``name`` on its hot path: ``sqnorms`` of one chunk, then the norm."""
    cls = BACKENDS[name]
    job = make_job(ctx.model, score="entropy", params=None, logits_fn=None, device=ctx.device,
                   autocast="bf16" if ctx.autocast == torch.bfloat16 else None, max_memory=None,
                   options={"chunk_size": ctx.chunk_size})
    supports = getattr(cls, "supports", None)
    if supports is not None and not supports(job):
        raise MethodUnavailable(f"backend {name!r} does not support this model (its supports(job) is False)")
    backend = cls(job)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return reduce_sqnorms(backend.sqnorms(x), "frobenius")

    def notes() -> str | None:
        # A backend that scores some parameters by a slower exact fallback says which (hooks).
        fallback = getattr(backend, "last_fallback", None)
        if fallback:
            shown = ", ".join(fallback[:3]) + (", ..." if len(fallback) > 3 else "")
            return f"exact fallback for {len(fallback)} of {len(job.params)} parameter tensors: {shown}"
        return None

    return Method(name, fn, _whole_batch, close=backend.close, notes=notes)


def opacus_method(ctx: MethodContext) -> Method:
    """Opacus' GradSampleModule on a copy of the model; its refusal becomes MethodUnavailable."""
    try:
        from opacus import GradSampleModule
    except ImportError:
        raise MethodUnavailable("opacus is not installed (pip install opacus)") from None
    model = copy.deepcopy(ctx.model)
    # Opacus records activations only in train mode; there, BatchNorm and Dropout would compute
    # another function than the eval-mode model every other row scores.
    changes_in_train = [type(m).__name__ for m in model.modules()
                        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                        or (isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0)]
    if changes_in_train:
        raise MethodUnavailable(f"opacus records per-sample gradients only in train mode, where this model's "
                                f"{changes_in_train[0]} layers compute something else than in eval mode")
    model.train()
    try:
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    except Exception as err:  # Opacus says why it refuses the model (e.g. BatchNorm)
        raise MethodUnavailable(f"opacus refuses the model: {_opacus_reason(err)}") from None
    params = _params(model)

    def fn(x: torch.Tensor) -> torch.Tensor:
        with autocast_context(ctx.device, ctx.autocast):
            logits = wrapped(x)
        entropy(logits).sum().backward()
        sq = torch.stack([p.grad_sample.float().flatten(1).pow(2).sum(dim=1) for p in params], dim=1)
        for p in params:
            p.grad_sample = None
            p.grad = None
        return sq.sum(dim=1).sqrt()

    def close() -> None:
        remove = getattr(wrapped, "_close", None)
        if remove is not None:
            remove()

    return Method("opacus", fn, _whole_batch, close=close)


def fwd_bwd_method(ctx: MethodContext) -> Method:
    model, params = ctx.model, _params(ctx.model)

    def fn(x: torch.Tensor) -> None:
        with autocast_context(ctx.device, ctx.autocast):
            logits = model(x)
        torch.autograd.grad(entropy(logits).sum(), params)

    return Method("fwd_bwd", fn, _whole_batch)


def forward_method(ctx: MethodContext) -> Method:
    model = ctx.model

    def fn(x: torch.Tensor) -> None:
        with torch.no_grad(), autocast_context(ctx.device, ctx.autocast):
            entropy(model(x))

    return Method("forward", fn, _whole_batch)


def method_names() -> list[str]:
    """Every row, in the order the runner measures them: floors, reference, the rest."""
    return ["forward", "fwd_bwd", "loop", "vmap-naive", *engine_backend_names(), "opacus"]


def engine_backend_names() -> list[str]:
    """Registered backends but ``loop`` (the ``loop`` row is the per-sample reference already):
    ``vmap`` first, the generic baseline the others improve on, then registry order."""
    names = [name for name in BACKENDS if name != "loop"]
    return sorted(names, key=lambda name: name != "vmap")


def build_method(name: str, ctx: MethodContext) -> Method:
    fixed = {"loop": loop_method, "vmap-naive": vmap_naive_method, "opacus": opacus_method,
             "fwd_bwd": fwd_bwd_method, "forward": forward_method}
    if name in fixed:
        return fixed[name](ctx)
    if name in BACKENDS:
        return engine_backend_method(ctx, name)
    raise ValueError(f"unknown benchmark method {name!r}; choose from {method_names()}")


def _opacus_reason(err: BaseException, limit: int = 200) -> str:
    """Opacus' refusal on one line: it raises one error holding a list of errors, one per layer."""
    inner = err.args[0] if err.args and isinstance(err.args[0], list) and err.args[0] else None
    text = " ".join(str(inner[0] if inner else err).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    more = f" (and {len(inner) - 1} more layers)" if inner and len(inner) > 1 else ""
    return f"{type(err).__name__}: {text}{more}"
