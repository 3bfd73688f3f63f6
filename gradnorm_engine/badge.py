"""BADGE (Ash et al., ICLR 2020): k-means++ seeding on gradient embeddings, never materialised.

    picked = badge(model, loader, k=100)                 # -> LongTensor [k], pool positions, pick order
    picked = kmeans_pp_gradient_embeddings(h, p, k)      # from features h [N, D] and probabilities p [N, C]

Sample x's gradient embedding is the gradient of the cross-entropy against its pseudo-label
yhat = argmax p(x) with respect to the weight W [C, D] of the layer producing the logits:

    g(x) = (p(x) - e_yhat) h(x)^T = a(x) h(x)^T          (C x D; h = the layer's input)

Materialised, the pool's embeddings take N x C x D numbers (a 20,000-sample pool of 100 classes
and 768 features: 1.5e9). They are not needed: every quantity k-means++ reads factorises,

    ||g(x)||^2 = ||a(x)||^2 ||h(x)||^2,   <g(x), g(y)> = (a(x) . a(y)) (h(x) . h(y)),
    ||g(x) - g(y)||^2 = ||g(x)||^2 + ||g(y)||^2 - 2 (a(x) . a(y)) (h(x) . h(y)),

so the selection holds a [N, C], h [N, D] and a few [N] vectors (memory linear in N (C + D)),
and each new center costs one pass over them: O(N (C + D)) time per pick.

Seeding as BADGE's reference code does: the first center is the sample of largest ||g(x)||
(ties: the lower position), each further one is drawn with probability proportional to the
squared distance to its nearest center (D^2 sampling), from ``generator``.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .devices import check_device
from .inputs import InputReader, resolve_logits_fn
from .job import eval_mode, model_device, on_device, scored_module
from .loaders import as_pool, check_pool_loader
from .scores import at_least_fp32


def gradient_embedding_factors(features: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a = p - e_yhat [N, C], h [N, D]): the factors of every g(x) = a(x) h(x)^T."""
    if features.dim() != 2 or probs.dim() != 2 or features.shape[0] != probs.shape[0]:
        raise ValueError(f"features must be [N, D] and probs [N, C] for the same N, got {tuple(features.shape)} "
                         f"and {tuple(probs.shape)}")
    a = probs.clone()
    a[torch.arange(a.shape[0], device=a.device), probs.argmax(dim=1)] -= 1.0
    return a, features


def kmeans_pp_gradient_embeddings(features: torch.Tensor, probs: torch.Tensor, k: int,
                                  generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding over the gradient embeddings of ``features`` [N, D] and ``probs`` [N, C],
    factorised (module docstring).  -> LongTensor [k] of row positions, in pick order."""
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in 1..{n} (the pool's size), got {k}")
    # In the inputs' precision (float32 pools stay float32: no copy of h is made), fp32 at least.
    dtype = torch.promote_types(torch.promote_types(features.dtype, probs.dtype), torch.float32)
    a, h = gradient_embedding_factors(features.to(dtype), probs.to(dtype))
    sq_norm = a.pow(2).sum(dim=1) * h.pow(2).sum(dim=1)                  # ||g(x)||^2, [N]
    first = int(torch.argmax(sq_norm))                                    # the first maximum: lower position
    picked = [first]
    nearest = _sqdist_to(first, a, h, sq_norm)                            # D(x)^2 to the nearest center
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    taken[first] = True
    for _ in range(k - 1):
        weights = nearest.masked_fill(taken, 0.0).double().cpu()
        if float(weights.sum()) <= 0.0:   # every remaining embedding equals a center: take them in order
            nxt = int((~taken).nonzero()[0])
        else:
            nxt = int(torch.multinomial(weights, 1, generator=generator))   # D^2 sampling
        picked.append(nxt)
        taken[nxt] = True
        nearest = torch.minimum(nearest, _sqdist_to(nxt, a, h, sq_norm))
    return torch.tensor(picked, dtype=torch.int64)


def _sqdist_to(center: int, a: torch.Tensor, h: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """||g(x) - g(center)||^2 for every x, from the factors.  -> [N]"""
    cross = (a @ a[center]) * (h @ h[center])
    return (sq_norm + sq_norm[center] - 2.0 * cross).clamp_min(0.0)


def last_layer_features(model: nn.Module, loader: Iterable, *, layer: nn.Module | None = None,
                        logits_fn=None, device=None, progress: bool = True, **input_options
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The input h [N, D] of the layer producing the logits, and the probabilities p [N, C], in
    pool order (eval mode, no gradients).  ``layer``: that layer (default: the last nn.Linear
    of ``model.modules()``); its output must be the logits themselves."""
    model = scored_module(model)   # a DDP / DataParallel wrapper's module, as score_pool scores it
    loader = as_pool(loader)
    check_pool_loader(loader)
    layer = layer or _last_linear(model)
    device = check_device(device) if device is not None else model_device(model)
    reader = InputReader(model, **input_options)
    logits_fn = resolve_logits_fn(logits_fn)
    captured: list[torch.Tensor] = []

    def keep(_module, inputs, output):
        captured.append((inputs[0], output))

    feats, probs = [], []
    handle = layer.register_forward_hook(keep)
    bar = tqdm(unit="sample", unit_scale=True, desc="badge features", disable=not progress, dynamic_ncols=True)
    try:
        with on_device(model, device), eval_mode(model), torch.no_grad():
            for batch in loader:
                x = reader.read(batch).to(device)
                captured.clear()
                logits = logits_fn(model(*x.args, **x.kwargs))
                if len(captured) != 1:
                    raise ValueError(f"the layer {type(layer).__name__} ran {len(captured)} times in one forward; "
                                     "BADGE needs the one layer that produces the logits (pass layer=)")
                h, out = captured[0]
                if out.shape != logits.shape or not torch.equal(out, logits):
                    raise ValueError("the output of the chosen layer is not the model's logits, so its weight gradient "
                                     "is not BADGE's embedding; pass layer= the linear layer that produces the logits")
                feats.append(at_least_fp32(h).reshape(len(x), -1).cpu())   # fp32 at least, as the scores
                probs.append(at_least_fp32(logits).softmax(dim=1).cpu())
                bar.update(len(x))
    finally:
        handle.remove()
        bar.close()
    if not feats:
        raise ValueError("the pool is empty: the loader yielded no samples")
    return torch.cat(feats), torch.cat(probs)


def badge(model: nn.Module, loader: Iterable, k: int, *, layer: nn.Module | None = None,
          generator: torch.Generator | None = None, **options) -> torch.Tensor:
    """BADGE's picks from the pool: k pool positions, in pick order.  -> LongTensor [k]

    Options: ``layer``, ``logits_fn``, ``device``, ``progress`` and the input options
    (``input_key``, ``input_keys``, ``exclude_keys``, ``num_inputs``) as in score_pool.
    """
    features, probs = last_layer_features(model, loader, layer=layer, **options)
    return kmeans_pp_gradient_embeddings(features, probs, k, generator)


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer; pass layer= the layer producing the logits")
    return linears[-1]
