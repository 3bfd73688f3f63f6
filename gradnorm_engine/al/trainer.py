"""The thin trainer: the main model alone (cross-entropy) or jointly with LossNet (LL4AL / LPLgrad).

    config = TrainConfig(epochs=200, lr=0.1, milestones=(160,), detach_epoch=120)
    stats = train(model, data.train, labeled, config, device=device, lossnet=lossnet, generator=g)
    acc, per_class = evaluate(model, data.test, device)

Joint training, per batch of B labeled samples:
    ce_i   = cross-entropy of f(x_i)                          [B]
    l_hat  = LossNet(stage outputs of f)                      [B]
    total  = mean(ce) + lambda * ranking_loss(l_hat, ce.detach(), margin)
From epoch ``detach_epoch`` on (0-based) the stage outputs are detached before LossNet, so the
auxiliary loss no longer shapes f. Both models use SGD (momentum 0.9, weight decay 5e-4) and a
MultiStepLR (x0.1 at each milestone), re-created on every call (the reference code re-creates its
optimizers every cycle).

On CUDA the forward runs under bf16 autocast with channels_last tensors; the loss is taken in
fp32. The data may live on the GPU (see ``place_split``): batches are gathered and augmented
where the data is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import UsageError
from .datasets import ImageTensors
from .lossnet import LossNet, ranking_loss, stage_taps


class TrainingDivergedError(UsageError):
    """Training produced a non-finite loss (usually a learning rate too large for the data)."""


# A split may move to the GPU when it takes at most this share of the free GPU memory.
GPU_DATA_FRACTION = 0.25


@dataclass
class TrainConfig:
    epochs: int
    lr: float
    milestones: tuple[int, ...] = ()
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    detach_epoch: int | None = None   # None: never detach the LossNet features
    loss_weight: float = 1.0          # lambda in total = CE + lambda * L_pair
    margin: float = 1.0               # xi of the ranking loss
    progress: bool = True

    def __post_init__(self):
        self.milestones = tuple(int(m) for m in self.milestones)
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2, got {self.batch_size}")


@dataclass
class TrainStats:
    epochs: int
    samples: int
    final_loss: float
    final_ce: float
    final_ranking: float | None = None
    history: list[float] = field(default_factory=list)  # mean total loss per epoch


def place_split(split: ImageTensors, device: torch.device) -> ImageTensors:
    """The split on ``device`` when it fits comfortably there (GPU), else where it is (CPU)."""
    if device.type != "cuda":
        return split
    free, _total = torch.cuda.mem_get_info(device)
    return split.to(device) if split.nbytes() <= GPU_DATA_FRACTION * free else split


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; nothing on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Model on ``device``; channels_last on CUDA (faster convolutions under autocast)."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def to_model_layout(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and x.dim() == 4 else x


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """A random permutation of 0..n-1 in batches; a last batch of one joins the previous one
    (BatchNorm cannot train on a single sample)."""
    order = torch.randperm(n, generator=generator)
    parts = list(order.split(batch_size))
    if len(parts) > 1 and parts[-1].numel() == 1:
        last = parts.pop()
        parts[-1] = torch.cat([parts[-1], last])
    return parts


def train(model: nn.Module, data: ImageTensors, indices: torch.Tensor, config: TrainConfig, *,
          device: torch.device, lossnet: LossNet | None = None, generator: torch.Generator | None = None,
          desc: str = "train") -> TrainStats:
    """Train ``model`` (and ``lossnet`` when given) on ``data[indices]`` for ``config.epochs`` epochs."""
    indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
    if indices.numel() < 2:
        raise ValueError(f"need at least 2 labeled samples to train, got {indices.numel()}")
    prepare_model(model, device)
    optimizers = [torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                  weight_decay=config.weight_decay)]
    taps = None
    if lossnet is not None:
        lossnet.to(device)
        taps = stage_taps(model)
        optimizers.append(torch.optim.SGD(lossnet.parameters(), lr=config.lr, momentum=config.momentum,
                                          weight_decay=config.weight_decay))
    schedulers = [torch.optim.lr_scheduler.MultiStepLR(o, milestones=list(config.milestones), gamma=0.1)
                  for o in optimizers]
    model.train()
    if lossnet is not None:
        lossnet.train()

    history: list[float] = []
    last_ce = last_rank = math.nan
    bar = tqdm(range(config.epochs), desc=desc, unit="epoch", disable=not config.progress,
               dynamic_ncols=True, leave=False)
    for epoch in bar:
        total_sum, count = 0.0, 0
        ce_sum, rank_sum = 0.0, 0.0
        detach = config.detach_epoch is not None and epoch >= config.detach_epoch
        for batch in _batches(indices.numel(), config.batch_size, generator):
            x, y = data.batch(indices[batch], device, augment=True, generator=generator)
            x = to_model_layout(x, device)
            with autocast_for(device):
                if taps is not None:
                    logits, features = taps(x)
                else:
                    logits, features = model(x), None
            ce = F.cross_entropy(logits.float(), y, reduction="none")  # [B]
            loss = ce.mean()
            if lossnet is not None:
                if detach:
                    features = [f.detach() for f in features]
                with autocast_for(device):
                    predicted = lossnet(features)
                rank = ranking_loss(predicted.float(), ce.detach(), config.margin)
                loss = loss + config.loss_weight * rank
                rank_sum += float(rank.detach()) * len(batch)
            value = float(loss.detach())
            if not math.isfinite(value):   # stop before the step: the weights stay finite
                raise TrainingDivergedError(
                    f"training diverged: the loss is {value} in epoch {epoch + 1} of {config.epochs} (learning "
                    f"rate {config.lr:g}); lower the learning rate (--lr), or check the data for NaN/Inf")
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in optimizers:
                o.step()
            total_sum += value * len(batch)
            ce_sum += float(ce.detach().mean()) * len(batch)
            count += len(batch)
        for s in schedulers:
            s.step()
        # The last step of an epoch can break the weights after its own loss was finite.
        for m in (model, lossnet):
            if m is not None and not all(bool(torch.isfinite(p).all()) for p in m.parameters()):
                raise TrainingDivergedError(
                    f"training diverged: the weights hold NaN or Inf after epoch {epoch + 1} of {config.epochs} "
                    f"(learning rate {config.lr:g}); lower the learning rate (--lr), or check the data for NaN/Inf")
        history.append(total_sum / count)
        last_ce = ce_sum / count
        last_rank = rank_sum / count if lossnet is not None else math.nan
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    bar.close()
    return TrainStats(epochs=config.epochs, samples=int(indices.numel()), final_loss=history[-1],
                      final_ce=last_ce, final_ranking=None if lossnet is None else last_rank, history=history)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageTensors, device: torch.device, *, num_classes: int | None = None,
             batch_size: int = 512) -> tuple[float, list[float]]:
    """Test accuracy in percent, and per-class accuracy in percent (NaN for a class with no test sample)."""
    was_training = model.training
    model.eval()
    prepare_model(model, device)
    k = num_classes or int(data.labels.max()) + 1
    correct = torch.zeros(k, dtype=torch.int64)
    total = torch.zeros(k, dtype=torch.int64)
    try:
        for idx in torch.arange(len(data)).split(batch_size):
            x, y = data.batch(idx, device)
            with autocast_for(device):
                pred = model(to_model_layout(x, device)).argmax(dim=1)
            y, pred = y.cpu(), pred.cpu()
            total += torch.bincount(y, minlength=k)
            correct += torch.bincount(y[pred == y], minlength=k)
    finally:
        model.train(was_training)
    acc = 100.0 * float(correct.sum()) / max(1, int(total.sum()))
    per_class = [100.0 * int(c) / int(t) if t else math.nan for c, t in zip(correct, total)]
    return acc, per_class
