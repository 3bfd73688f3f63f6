"""LossNet, the auxiliary loss-prediction module of LL4AL / LPLgrad, and its ranking loss.

    taps = stage_taps(model)                  # x -> (logits [B, K], [f1, f2, f3, f4])
    lossnet = LossNet(model_stage_channels(model))
    l_hat = lossnet(features)                 # [B], predicted per-sample loss
    loss = ranking_loss(l_hat, ce.detach())   # scalar, margin 1

LossNet: for each tap f_k (B, C_k, H_k, W_k): global average pool -> Linear(C_k, 128) -> ReLU;
concatenate the 128-vectors (4 taps: 512) -> Linear(512, 1).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

TAP_LAYERS = ("layer1", "layer2", "layer3", "layer4")


class LossNet(nn.Module):
    """Predicts each sample's loss from the main model's stage outputs.  [f_k (B, C_k, H, W)] -> [B]"""

    def __init__(self, channels: Sequence[int], hidden: int = 128):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.taps = nn.ModuleList(nn.Sequential(nn.Linear(c, hidden), nn.ReLU()) for c in self.channels)
        self.head = nn.Linear(hidden * len(self.channels), 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.taps):
            raise ValueError(f"LossNet was built for {len(self.taps)} feature maps, got {len(features)}")
        # A feature map (B, C, H, W) is pooled to (B, C); an already flat (B, C) passes as is.
        pooled = [f.flatten(2).mean(dim=2) if f.dim() > 2 else f for f in features]
        hidden = [tap(p) for tap, p in zip(self.taps, pooled)]
        return self.head(torch.cat(hidden, dim=1)).squeeze(1)


def ranking_loss(predicted: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Pairwise margin ranking loss of LL4AL.  predicted [B], target [B] -> scalar.

    Pairs (i, B-1-i) for i < B // 2 (the first half of the batch against the flipped batch); with
    s = +1 if target_i > target_j else -1:
        L = mean over pairs of max(0, margin - s * (predicted_i - predicted_j)).
    An odd batch leaves its middle sample out of every pair; a batch of one has no pair and
    gives a zero loss (still attached to the graph, so backward works).
    """
    if predicted.shape != target.shape or predicted.dim() != 1:
        raise ValueError(f"predicted and target must both be [B], got {tuple(predicted.shape)} and {tuple(target.shape)}")
    pairs = predicted.shape[0] // 2
    if pairs == 0:
        return predicted.sum() * 0.0
    diff_pred = (predicted - predicted.flip(0))[:pairs]
    diff_target = (target - target.flip(0)).detach()[:pairs]
    sign = torch.where(diff_target > 0, 1.0, -1.0).to(diff_pred.dtype)
    return torch.clamp(margin - sign * diff_pred, min=0).mean()


def ranking_loss_reference(predicted: list[float], target: list[float], margin: float = 1.0) -> float:
    """The same loss as a plain Python loop over pairs (for tests and readers)."""
    b = len(predicted)
    terms = []
    for i in range(b // 2):
        j = b - 1 - i
        s = 1.0 if target[i] > target[j] else -1.0
        terms.append(max(0.0, margin - s * (predicted[i] - predicted[j])))
    return sum(terms) / len(terms) if terms else 0.0


class _HookTaps:
    """Captures the outputs of named submodules (e.g. torchvision ResNet's layer1..layer4)."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.model = model
        self.names = tuple(names)
        self.captured: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise ValueError(f"model has no submodule(s) {missing} to tap for LossNet")
        for name in self.names:
            modules[name].register_forward_hook(_Capture(self, name))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.captured = {}
        logits = self.model(x)
        features = [self.captured[n] for n in self.names]
        self.captured = {}
        return logits, features


class _Capture:
    """The forward hook of one tapped layer. An object rather than a closure: a deep copy of the
    model copies it too, pointing at the copy's taps (a closure would keep feeding the original's)."""

    def __init__(self, taps: _HookTaps, name: str):
        self.taps, self.name = taps, name

    def __call__(self, _module, _inputs, output):
        self.taps.captured[self.name] = output


def has_stage_taps(model: nn.Module) -> bool:
    """Whether LossNet can read this model's stages (``stage_outputs`` or layer1..layer4)."""
    if callable(getattr(model, "stage_outputs", None)):
        return True
    return all(hasattr(model, n) for n in TAP_LAYERS)


def stage_taps(model: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
    """A function x -> (logits, [stage outputs]) for ``model``.

    Uses ``model.stage_outputs`` when the model has it (gradnorm_engine.al.models.cifar_resnet18),
    else forward hooks on ``layer1..layer4`` (torchvision ResNets). The hooks are registered
    once per model and stay, so call this once and keep the function.
    """
    if callable(getattr(model, "stage_outputs", None)):
        return model.stage_outputs
    if all(hasattr(model, n) for n in TAP_LAYERS):
        taps = getattr(model, "_lossnet_taps", None)
        if taps is None:
            taps = _HookTaps(model, TAP_LAYERS)
            # Stored outside nn.Module's registries so state_dict and .to() ignore it.
            object.__setattr__(model, "_lossnet_taps", taps)
        return taps
    raise ValueError(
        f"{type(model).__name__} exposes no stage outputs for LossNet: give it a "
        "stage_outputs(x) -> (logits, [features]) method or layer1..layer4 submodules "
        "(e.g. gradnorm_engine.al.models.cifar_resnet18 or a torchvision ResNet)")


@torch.no_grad()
def stage_channels(model: nn.Module, example: torch.Tensor) -> list[int]:
    """Channels of each tapped stage, read from one forward pass on ``example`` [1, ...]."""
    was_training = model.training
    model.eval()
    try:
        _, features = stage_taps(model)(example)
    finally:
        model.train(was_training)
    return [int(f.shape[1]) for f in features]


def lossnet_for(model: nn.Module, example: torch.Tensor, hidden: int = 128) -> LossNet:
    """A LossNet sized to ``model``'s stages (example: one input [1, C, H, W] on the model's device)."""
    return LossNet(stage_channels(model, example), hidden=hidden).to(example.device)


__all__ = ["LossNet", "ranking_loss", "ranking_loss_reference", "stage_taps", "has_stage_taps",
           "stage_channels", "lossnet_for"]
