"""The torch module and its logits inside skorch-style wrappers, and array pools as loaders.

Shared by the modAL and scikit-activeml adapters, whose classifiers are sklearn-style
estimators wrapping a PyTorch module:

    modAL ActiveLearner            .estimator    -> skorch NeuralNetClassifier
    skactiveml SklearnClassifier   .estimator_   -> skorch NeuralNetClassifier
    skactiveml SkorchClassifier    .neural_net_  -> skorch NeuralNet
    skorch NeuralNet               .module_      -> torch.nn.Module (after fit/initialize)
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..inputs import default_logits

# Where each wrapper keeps the next layer inward; fitted attributes before unfitted ones.
_INNER = ("module_", "neural_net_", "estimator_", "estimator")
_MAX_DEPTH = 8


def wrapper_chain(estimator: Any) -> list[Any]:
    """``estimator`` and the objects it wraps, outermost first, ending at an ``nn.Module``."""
    chain = [estimator]
    while not isinstance(chain[-1], nn.Module):
        outer = chain[-1]
        inner = next((getattr(outer, a) for a in _INNER if getattr(outer, a, None) is not None), None)
        if inner is None or len(chain) > _MAX_DEPTH:
            raise TypeError(
                f"cannot find a fitted torch module inside {type(estimator).__name__}: expected a "
                "torch.nn.Module, a fitted skorch net (with .module_), a skactiveml SkorchClassifier "
                "or SklearnClassifier, or a modAL learner wrapping one of these; fit (or initialize()) "
                "the classifier before querying")
        chain.append(inner)
    return chain


def torch_module(estimator: Any) -> nn.Module:
    """The fitted ``nn.Module`` inside ``estimator`` (or ``estimator`` itself)."""
    return wrapper_chain(estimator)[-1]


def logits_fn_for(estimator: Any) -> Callable[[Any], torch.Tensor]:
    """Map the module's forward output to class logits [B, C], the way the wrapper reads it.

    Logits only matter up to a per-row constant (softmax is shift-invariant), so log-probabilities
    are logits too. The outermost wrapper that declares an output convention decides:

    - skactiveml ``SkorchClassifier``: the first entry ``(idx, transform)`` of its effective
      ``forward_outputs`` gives class probabilities ``P = transform(out[idx])``. With a softmax
      (``CrossEntropyLoss``) the raw output is logits; with ``torch.exp`` (``NLLLoss``) it is
      log-probabilities; otherwise logits = log P.
    - skorch ``NeuralNetClassifier``: with ``NLLLoss`` the module outputs probabilities and
      skorch trains on ``log(P + eps)``; the same is used here. A plain ``NeuralNet`` hands the
      raw output to its criterion (with ``NLLLoss``: log-probabilities), and any other
      criterion sees the raw output too: the raw output then.
    """
    for layer in wrapper_chain(estimator):
        if hasattr(layer, "forward_outputs") and hasattr(layer, "neural_net_"):
            return _skactiveml_logits(layer)
        if hasattr(layer, "criterion_"):
            if isinstance(layer.criterion_, nn.NLLLoss) and _is_skorch_classifier(layer):
                return _log_probabilities_plus_eps
            return default_logits
    return default_logits


def _is_skorch_classifier(layer: Any) -> bool:
    """A ``skorch.NeuralNetClassifier`` (or subclass): its ``get_loss`` takes log(P + eps) for NLLLoss."""
    return any(cls.__name__ == "NeuralNetClassifier" and cls.__module__.startswith("skorch")
               for cls in type(layer).__mro__)


def _skactiveml_logits(clf: Any) -> Callable[[Any], torch.Tensor]:
    outputs = clf._effective_forward_outputs() if hasattr(clf, "_effective_forward_outputs") else None
    idx, transform = next(iter(outputs.values())) if outputs else (0, nn.Softmax(dim=-1))

    def pick(output: Any) -> torch.Tensor:
        return output[idx] if isinstance(output, (tuple, list)) else output

    if isinstance(transform, (nn.Softmax, nn.LogSoftmax)) or transform is torch.exp:
        return pick
    if transform is None:
        return lambda output: _safe_log(pick(output))
    return lambda output: _safe_log(transform(pick(output)))


def _safe_log(p: torch.Tensor) -> torch.Tensor:
    # Probabilities of exactly 0 would give -inf logits and NaN entropies.
    return torch.log(p.clamp(min=torch.finfo(p.dtype).tiny))


def _log_probabilities_plus_eps(output: Any) -> torch.Tensor:
    p = default_logits(output)
    return torch.log(p + torch.finfo(p.dtype).eps)


def array_loader(X: Any, module: nn.Module, batch_size: int = 256) -> DataLoader:
    """A non-shuffling loader over an array pool [N, ...], in pool order.

    Floating inputs are cast to the module's floating dtype (skorch users often keep float64
    numpy arrays; the module is float32).
    """
    if hasattr(X, "toarray"):
        raise TypeError("sparse pools are not supported: pass a dense array (X.toarray())")
    x = torch.as_tensor(np.asarray(X))
    if x.is_floating_point():
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), x.dtype)
        x = x.to(dtype)
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"the pool is empty (shape {tuple(x.shape)}); pass at least one sample")
    return DataLoader(TensorDataset(x), batch_size=batch_size, shuffle=False)


def module_and_loader(clf: Any, X: Any, batch_size: int, options: dict | None) -> tuple[nn.Module, DataLoader, dict]:
    """What an adapter hands the engine for the wrapper ``clf`` and the array pool ``X``: its torch
    module, a loader over ``X`` in pool order, and ``options`` (copied) with the wrapper's logits
    and no progress bar unless they say otherwise."""
    module = torch_module(clf)
    options = dict(options or {})
    options.setdefault("logits_fn", logits_fn_for(clf))
    options.setdefault("progress", False)
    return module, array_loader(X, module, batch_size), options
