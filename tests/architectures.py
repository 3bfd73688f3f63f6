"""Tiny test models for the whole suite, each covering a shape of model the engine must score.

Every factory returns a fresh ``nn.Module`` (the caller seeds torch first); every input maker
takes a batch size and returns a batch for that model. All are small enough for CPU tests.

    model = ARCHITECTURES["tiny_resnet18"][0]()   # factory
    x = ARCHITECTURES["tiny_resnet18"][1](5)      # input maker -> [5, 3, 16, 16]
"""
from __future__ import annotations

from typing import Callable

import torch
import torchvision
from torch import nn

from gradnorm_engine.al.models import cifar_resnet18, small_transformer

VOCAB = 20
SEQ_LEN = 6


class _ResidualConvNet(nn.Module):
    """Conv2d + BatchNorm2d + in-place ReLU + Dropout + a residual add.  [B, 3, 8, 8] -> [B, 5]"""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn(self.stem(x)))
        h = self.relu(h + self.bn2(self.conv(h)))  # residual add, then in-place ReLU on the sum
        h = self.drop(h.mean(dim=(2, 3)))
        return self.head(h)


def bn_dropout_residual_cnn() -> nn.Module:
    return _ResidualConvNet()


class _TupleMLP(nn.Module):
    """Returns (logits [B, 4], features [B, 8]).  Input [B, 6]."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor):
        f = self.body(x)
        return self.head(f), f


def tuple_output_mlp() -> nn.Module:
    return _TupleMLP()


class _DictMLP(nn.Module):
    """Returns {"logits": [B, 4], "aux": [B, 2]}.  Input [B, 6]."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.head = nn.Linear(8, 4)
        self.aux = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor):
        f = self.body(x)
        return {"logits": self.head(f), "aux": self.aux(f)}


def dict_output_mlp() -> nn.Module:
    return _DictMLP()


def token_transformer() -> nn.Module:
    """gradnorm_engine's small transformer at tiny sizes.  Token ids [B, 6] -> [B, 4]"""
    return small_transformer(vocab_size=VOCAB, num_classes=4, dim=8, heads=2, depth=1, max_len=SEQ_LEN)


class _TiedLM(nn.Module):
    """Embedding whose weight is also the output projection (tied).  Token ids [B, 6] -> [B, 20]

    Classifies the next token after the sequence from the mean of the hidden states.
    """

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.mix = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, VOCAB, bias=True)
        self.out.weight = self.embed.weight  # tied: one Parameter used by two modules

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embed(tokens)))       # (B, T, 8)
        return self.out(self.norm(h.mean(dim=1)))          # (B, VOCAB)


def tied_weights_lm() -> nn.Module:
    return _TiedLM()


class _TwiceMLP(nn.Module):
    """The same Linear applied twice in one forward.  [B, 6] -> [B, 4]"""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.head(h)


def layer_applied_twice() -> nn.Module:
    return _TwiceMLP()


class _BareParamMLP(nn.Module):
    """Bare parameters used directly in forward: a learned offset and a per-feature scale.
    [B, 6] -> [B, 4]"""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.randn(6) * 0.1)
        self.body = nn.Linear(6, 8)
        self.scale = nn.Parameter(torch.ones(8) + 0.1 * torch.randn(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x + self.offset)) * self.scale
        return self.head(h)


def bare_parameter_model() -> nn.Module:
    return _BareParamMLP()


def tiny_resnet18() -> nn.Module:
    """CIFAR ResNet-18 at width 4 (all 18 layers, eval BatchNorm).  [B, 3, 16, 16] -> [B, 10]"""
    return cifar_resnet18(num_classes=10, in_channels=3, width=4)


def tiny_mobilenet_v3() -> nn.Module:
    """torchvision MobileNetV3-small (depthwise convs, squeeze-excite, Hardswish), untrained,
    at a quarter of the width with the reduced tail (61k parameters instead of 1.5M; every
    block type is kept).  [B, 3, 32, 32] -> [B, 5]"""
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=5, width_mult=0.25,
                                                  reduced_tail=True)
    # Untrained, the signal fades through the blocks (eval BatchNorm with unit running variance)
    # and the logits are ~1e-6; BatchNorm statistics from one batch, as after training, keep
    # the scores far from zero so comparisons mean something.
    _calibrate_batchnorm(model, torch.randn(16, 3, 32, 32))
    nn.init.normal_(model.classifier[-1].weight, std=0.5)  # torchvision's std 0.01 head: near-uniform logits
    return model


def _calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of the batch ``x`` (train mode,
    cumulative average), then leave the model in train mode as a fresh model is."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    for bn in bns:
        bn.momentum = 0.1


class _ConvZoo(nn.Module):
    """Conv1d / Conv3d with GroupNorm, LayerNorm, BatchNorm1d and BatchNorm3d.

    Input [B, 2, 4, 6, 6] (a tiny video); branch 1 runs Conv3d, branch 2 folds depth into
    length and runs Conv1d.  -> [B, 3]
    """

    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(2, 4, kernel_size=3, padding=1, stride=(1, 2, 2))
        self.bn3d = nn.BatchNorm3d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.conv1d = nn.Conv1d(2, 4, kernel_size=3, padding=1, padding_mode="reflect")
        self.bn1d = nn.BatchNorm1d(4)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.gn(self.bn3d(self.conv3d(x))))            # (B, 4, 4, 3, 3)
        a = a.mean(dim=(2, 3, 4))                                      # (B, 4)
        seq = x.mean(dim=(3,)).flatten(2)                              # (B, 2, 4*6)
        b = torch.relu(self.bn1d(self.conv1d(seq))).mean(dim=2)        # (B, 4)
        return self.head(self.ln(torch.cat([a, b], dim=1)))


def conv1d_3d_model() -> nn.Module:
    return _ConvZoo()


def _images(channels: int, size: int) -> Callable[[int], torch.Tensor]:
    return lambda batch: torch.randn(batch, channels, size, size)


def _tokens(batch: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ_LEN))


def _vectors(batch: int) -> torch.Tensor:
    return torch.randn(batch, 6)


def _videos(batch: int) -> torch.Tensor:
    return torch.randn(batch, 2, 4, 6, 6)


# name -> (factory () -> nn.Module, input maker (batch) -> Tensor)
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor]]] = {
    "bn_dropout_residual_cnn": (bn_dropout_residual_cnn, _images(3, 8)),
    "tuple_output_mlp": (tuple_output_mlp, _vectors),
    "dict_output_mlp": (dict_output_mlp, _vectors),
    "token_transformer": (token_transformer, _tokens),
    "tied_weights_lm": (tied_weights_lm, _tokens),
    "layer_applied_twice": (layer_applied_twice, _vectors),
    "bare_parameter_model": (bare_parameter_model, _vectors),
    "tiny_resnet18": (tiny_resnet18, _images(3, 16)),
    "tiny_mobilenet_v3": (tiny_mobilenet_v3, _images(3, 32)),
    "conv1d_3d_model": (conv1d_3d_model, _videos),
}

# Models whose forward returns a tuple / dict: pass logits_fn to score them.
LOGITS_FNS: dict[str, Callable] = {
    "tuple_output_mlp": lambda out: out[0],
    "dict_output_mlp": lambda out: out["logits"],
}
