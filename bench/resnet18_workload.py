"""The CIFAR ResNet-18 scoring job shared by the hooks benchmarks (run them from any folder:
``python bench/hooks_vs_training_step.py`` puts this folder on sys.path)."""
from __future__ import annotations

import torch

from gradnorm_engine.job import ScoringJob, make_job
from gradnorm_engine.al.models import cifar_resnet18


def resnet18_job(device: torch.device, batch: int, *, autocast: str | None = None, channels_last: bool = False,
                 width: int = 64) -> tuple[torch.nn.Module, torch.Tensor, ScoringJob]:
    """(model, random inputs [batch, 3, 32, 32], entropy-scoring job of all parameters), seeded.
    On CUDA, float32 means float32: TF32 is switched off for the model's convolutions and matmuls."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = cifar_resnet18(width=width).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    job = make_job(model, score="entropy", params=None, logits_fn=None, device=device,
                   autocast=autocast, max_memory=None)
    return model, x, job
