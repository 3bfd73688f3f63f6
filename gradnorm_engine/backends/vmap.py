"""Per-sample gradients with ``torch.func.vmap(grad)``, reduced to squared norms chunk by chunk.

Each chunk materialises B x P gradient entries for a moment, reduces them with the fused
``per_sample_sumsq`` kernel and drops them, so memory is bounded by the chunk, not the pool.
"""
from __future__ import annotations

import functools

import torch
from torch.func import functional_call, grad, jacrev, vmap

from ..inputs import ModelInputs, check_logits, check_loss
from ..job import Objective
from ..kernels import per_sample_sumsq
from ..memory import activation_elems, chunk_budget
from ..scores import check_labels, cross_entropy
from .base import Backend
from .limits import vmap_limit

# Bytes per measured parameter entry and per activation entry of one sample while a chunk
# runs: the per-sample gradient plus autograd's temporaries (about 3 copies), and the saved
# activations with their gradients (about 4 copies). Deliberately generous; an OOM still
# halves the chunk and retries.
PARAM_COPIES = 3
ACTIVATION_COPIES = 4
# Beyond these sizes throughput stops growing. On a CPU the work is per sample anyway and
# larger chunks only add memory traffic: CIFAR ResNet-18, 2 cores, 10.6 samples/s at chunk 8,
# 7.5 at 16, 4.9 at 64 (bench/results/cpu-2core.md).
MAX_CHUNK = {"cuda": 1024, "cpu": 16}


class VmapBackend(Backend):
    name = "vmap"

    def __init__(self, job):
        if not self.supports(job):
            raise ValueError(
                "backend='vmap' cannot score a model with BatchNorm under autocast: torch.func's "
                "batch_norm rule refuses the mixed low-precision input and fp32 weights; use "
                "backend='hooks' (or 'auto'), or autocast=None")
        super().__init__(job)
        model = job.model
        measured = {n for n, _ in job.params}
        self.names = [n for n, _ in job.params]
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if n not in measured}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.num_classes: int | None = None   # the logits' width, once labels are checked

    @classmethod
    def supports(cls, job) -> bool:
        has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in job.model.modules())
        return not (job.autocast is not None and has_batchnorm)

    def _logits_one(self, measured: dict, args: tuple, kwargs: dict) -> torch.Tensor:
        """One sample's logits [1, C]: the model sees a batch of one, every input of the sample with it."""
        args = tuple(t.unsqueeze(0) for t in args)
        kwargs = {k: t.unsqueeze(0) for k, t in kwargs.items()}
        out = functional_call(self.job.model, ({**measured, **self.frozen}, self.buffers), args, kwargs)
        return check_logits(self.job.logits_fn(out), 1)

    def _loss_one(self, measured: dict, args: tuple, kwargs: dict, targets: torch.Tensor | None) -> torch.Tensor:
        targets = None if targets is None else targets.unsqueeze(0)
        loss = check_loss(self.job.loss_fn(self._logits_one(measured, args, kwargs), targets), 1)
        return loss[0]

    def _losses_one(self, measured: dict, args: tuple, kwargs: dict, targets: torch.Tensor | None,
                    objective: Objective) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample's K losses [K], and their weights [K] (as the auxiliary output)."""
        targets = None if targets is None else targets.unsqueeze(0)
        losses, weights = objective(self._logits_one(measured, args, kwargs), targets)
        return losses[0], weights[0].detach()

    def chunk_size(self, example: ModelInputs | torch.Tensor) -> int:
        if self.job.options.get("chunk_size"):
            return int(self.job.options["chunk_size"])
        job = self.job
        itemsize = torch.finfo(job.accum_dtype).bits // 8
        param_elems = sum(p.numel() for _, p in job.params)
        act_elems = activation_elems(job.model, example, job.autocast_context)
        per_sample = itemsize * (PARAM_COPIES * param_elems + ACTIVATION_COPIES * act_elems)
        limit = MAX_CHUNK.get(job.device.type, MAX_CHUNK["cpu"])
        return max(1, min(limit, chunk_budget(job.device, job.max_memory) // per_sample))

    def check_labels(self, x: ModelInputs) -> None:
        """The built-in cross_entropy's labels, checked before vmap (inside it they cannot be read)."""
        if x.targets is None or getattr(self.job.loss_fn, "fn", None) is not cross_entropy:
            return
        if self.num_classes is None:
            with torch.no_grad():
                self.num_classes = int(self.job.logits(x[:1]).shape[1])
        check_labels(x.targets, self.num_classes)

    def _per_sample(self, fn, x: ModelInputs):
        """``fn(measured, args, kwargs, targets)`` of one sample, vmapped over the chunk: in_dims 0 for
        every tensor of the inputs (positional and keyword alike) and for the labels when there are
        any (None otherwise: vmap maps tensors only); what torch.func cannot run is one line naming
        the backend that can."""
        measured = {n: p.detach() for n, p in self.job.params}
        per_sample = vmap(fn, in_dims=(None, 0, 0, 0 if x.targets is not None else None), randomness="error")
        try:
            with self.job.autocast_context():
                return per_sample(measured, x.args, x.kwargs, x.targets)
        except RuntimeError as err:
            known = vmap_limit(err)
            if known is None:
                raise
            raise known from err

    def sqnorms(self, x: ModelInputs | torch.Tensor) -> torch.Tensor:
        x = ModelInputs.of(x)
        self.check_labels(x)
        grads = self._per_sample(grad(self._loss_one), x)   # {name: [B, *param.shape]}
        out = per_sample_sumsq([grads[n] for n in self.names], per_tensor=True)  # [B, P]
        return out.to(self.job.accum_dtype)

    def sqnorms_per_loss(self, x: ModelInputs | torch.Tensor, objective: Objective | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample Jacobians of the K losses (jacrev inside vmap), reduced to [B, K, P]."""
        if objective is None:
            return self.sqnorms(x)[:, None], None
        x = ModelInputs.of(x)
        jac = jacrev(functools.partial(self._losses_one, objective=objective), has_aux=True)
        grads, weights = self._per_sample(jac, x)   # {name: [B, K, *shape]}, [B, K]
        batch, k = weights.shape
        flat = [grads[n].reshape(batch * k, *grads[n].shape[2:]) for n in self.names]
        out = per_sample_sumsq(flat, per_tensor=True).reshape(batch, k, len(self.names))
        return out.to(self.job.accum_dtype), weights
