"""Models the project trains and scores, each small enough to read in one screen.

    cifar_resnet18(num_classes=10)       # CIFAR ResNet-18: 3x3 stem, no max-pool, 11.17M params
    model.stage_outputs(x) -> (logits, [layer1, layer2, layer3, layer4])  # the LossNet taps
    small_cnn(num_classes=10, in_channels=1)
    small_transformer(vocab_size=100, num_classes=4)  # token ids [B, T] -> logits [B, C]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (3x3 stem, stride 1, no max-pool), as in the LPLgrad code.

    ``width`` scales every stage (64 -> 64, 128, 256, 512); a narrower net trains faster on CPU.
    """

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stage_channels = tuple(widths)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        stages = []
        for i, (planes, blocks) in enumerate(zip(widths, num_blocks)):
            layers = []
            for j in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride=(1 if i == 0 or j > 0 else 2)))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(widths[-1], num_classes)

    def stage_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (logits [B, C], [layer1 (B, w, H, W), layer2, layer3, layer4 (B, 8w, H/8, W/8)])"""
        out = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(out)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        logits = self.linear(torch.flatten(F.adaptive_avg_pool2d(f4, 1), 1))
        return logits, [f1, f2, f3, f4]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, 8w] (what Coreset measures distances on)."""
        f4 = self.stage_outputs(x)[1][3]
        return torch.flatten(F.adaptive_avg_pool2d(f4, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage_outputs(x)[0]


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> CifarResNet:
    """The paper's CIFAR ResNet-18 (3x3 stem, no max-pool); ``width`` 64 is the paper's model."""
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
        if value < 1:
            raise ValueError(f"cifar_resnet18: {name} must be at least 1, got {value}")
    return CifarResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, width=width)


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; for small images such as the 8x8 digits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(2 * width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width)


class SmallTransformer(nn.Module):
    """Token classifier: Embedding + learned position parameter + pre-norm encoder blocks
    (self-attention, MLP) + LayerNorm + mean pool + Linear. Token ids [B, T] -> logits [B, C]."""

    def __init__(self, vocab_size: int = 100, num_classes: int = 4, dim: int = 32, heads: int = 4,
                 depth: int = 2, max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(_EncoderBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[:, : tokens.shape[1]]  # (B, T, d)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)  # (B, h, T, T)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.norm2(h))


def small_transformer(vocab_size: int = 100, num_classes: int = 4, dim: int = 32, heads: int = 4,
                      depth: int = 2, max_len: int = 64) -> SmallTransformer:
    return SmallTransformer(vocab_size, num_classes, dim, heads, depth, max_len)
