"""What the benchmark measures on: a model, batches of realistic random inputs, a precision.

    workload = build_workload("resnet18", device, batch_size=32, n_batches=4, seed=0)
    workload.model      # eval mode, BatchNorm statistics calibrated, on ``device``
    workload.batches    # list of distinct input batches [B, ...] on ``device``

Models:
  resnet18            gradnorm_engine.al.models.cifar_resnet18 (11.17M parameters), 3x32x32 images
  mobilenet_v3_small  torchvision.models.mobilenet_v3_small(weights=None) (2.54M), 3x224x224
  transformer         gradnorm_engine.al.models.small_transformer at a realistic size: vocabulary
                      8000, width 256, 8 heads, 4 blocks, 128 tokens (4.19M parameters)
  small_cnn           gradnorm_engine.al.models.small_cnn on 3x32x32 (5.5k parameters; pool scaling)
Transformers and larger CNNs (torchvision; transformers for the BERTs), 10 classes unless said:
  vit                 torchvision VisionTransformer, 3x32x32, patch 4, 6 layers x 256, 8 heads, MLP 1024
  swin_t              torchvision swin_t, 3x64x64
  convnext_tiny       torchvision convnext_tiny, 3x64x64
  resnet50            torchvision resnet50, 3x64x64
  bert                Hugging Face BertForSequenceClassification, 4 layers x 256, 4 heads, FFN 1024,
                      vocabulary 30522, 64 token ids (no mask), 3 labels
  vit_b_16            torchvision vit_b_16, 3x224x224, 1000 classes (GPU sizes)
  bert_base           Hugging Face BERT-base (12 x 768), 128 token ids, 3 labels (GPU sizes)
torchvision's ViTs start with a zero head (every logit 0, every entropy gradient 0): the
workloads draw it from N(0, 0.02) so that the scores are not all zero.

Inputs are never zeros: images are standard normal (what normalised photographs look like to
the first layer), token ids uniform over the vocabulary.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..al import models
from ..extras import require

DTYPES = ("fp32", "tf32", "bf16")
TRANSFORMER_SIZE = dict(vocab_size=8000, num_classes=4, dim=256, heads=8, depth=4, max_len=128)
# Batches run through the model in train mode (no gradients) so BatchNorm's running statistics
# describe the data: with the initial mean 0 / variance 1 the eval-mode activations of a deep
# random net explode and the softmax saturates, which would make every entropy gradient ~0.
BN_CALIBRATION_BATCHES = 4


@dataclass
class Workload:
    name: str
    model: nn.Module
    batches: list[torch.Tensor]
    description: str

    @property
    def batch_size(self) -> int:
        return int(self.batches[0].shape[0])

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class _Spec:
    build: Callable[[int], nn.Module]              # width -> model
    make_input: Callable[[int, torch.Generator], torch.Tensor]  # batch size, generator -> [B, ...]
    description: str


def _images(size: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda b, gen: torch.randn(b, 3, size, size, generator=gen)


def _tokens(b: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, TRANSFORMER_SIZE["vocab_size"], (b, TRANSFORMER_SIZE["max_len"]), generator=gen)


class HFLogits(nn.Module):
    """A Hugging Face classifier fed token ids, returning its logits tensor (the rows call
    entropy(model(x)) directly)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def _torchvision(name: str, **kwargs) -> Callable[[int], nn.Module]:
    def build(_width: int) -> nn.Module:
        tvm = require("torchvision.models", extra="bench", feature=f"the {name} benchmark workload")
        model = getattr(tvm, name)(weights=None, **kwargs) if name != "VisionTransformer" else tvm.VisionTransformer(**kwargs)
        heads = getattr(model, "heads", None)
        if heads is not None:   # ViT: a zero head gives zero logits and zero entropy gradients
            with torch.no_grad():
                heads.head.weight.normal_(0.0, 0.02)
        return model
    return build


def _bert(layers: int, hidden: int, heads: int, ffn: int) -> Callable[[int], nn.Module]:
    def build(_width: int) -> nn.Module:
        transformers = require("transformers", extra="dev", feature="the BERT benchmark workloads")
        config = transformers.BertConfig(vocab_size=BERT_VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, intermediate_size=ffn, num_labels=3)
        return HFLogits(transformers.BertForSequenceClassification(config))
    return build


BERT_VOCAB = 30522


def _bert_tokens(length: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda b, gen: torch.randint(1, BERT_VOCAB, (b, length), generator=gen)


MODELS: dict[str, _Spec] = {
    "resnet18": _Spec(lambda w: models.cifar_resnet18(num_classes=10, width=w), _images(32),
                      "CIFAR ResNet-18, 3x32x32, 10 classes"),
    "mobilenet_v3_small": _Spec(_torchvision("mobilenet_v3_small"), _images(224), "torchvision MobileNetV3-small, 3x224x224, 1000 classes"),
    "transformer": _Spec(lambda _w: models.small_transformer(**TRANSFORMER_SIZE), _tokens,
                         "small transformer, 128 tokens, vocab 8000, d=256, 8 heads, 4 blocks, 4 classes"),
    "small_cnn": _Spec(lambda w: models.small_cnn(num_classes=10, in_channels=3, width=w), _images(32),
                       "small CNN, 3x32x32, 10 classes"),
    "vit": _Spec(_torchvision("VisionTransformer", image_size=32, patch_size=4, num_layers=6, num_heads=8,
                              hidden_dim=256, mlp_dim=1024, num_classes=10), _images(32),
                 "torchvision ViT, 3x32x32, patch 4, 6 layers x 256, 10 classes"),
    "swin_t": _Spec(_torchvision("swin_t", num_classes=10), _images(64), "torchvision swin_t, 3x64x64, 10 classes"),
    "convnext_tiny": _Spec(_torchvision("convnext_tiny", num_classes=10), _images(64),
                           "torchvision convnext_tiny, 3x64x64, 10 classes"),
    "resnet50": _Spec(_torchvision("resnet50", num_classes=10), _images(64), "torchvision resnet50, 3x64x64, 10 classes"),
    "bert": _Spec(_bert(4, 256, 4, 1024), _bert_tokens(64), "Hugging Face BERT, 4 layers x 256, 64 token ids, 3 labels"),
    "vit_b_16": _Spec(_torchvision("vit_b_16"), _images(224), "torchvision vit_b_16, 3x224x224, 1000 classes"),
    "bert_base": _Spec(_bert(12, 768, 12, 3072), _bert_tokens(128), "Hugging Face BERT-base, 128 token ids, 3 labels"),
}
DEFAULT_WIDTH = {"resnet18": 64, "small_cnn": 16}


def model_names() -> list[str]:
    return list(MODELS)


def make_inputs(name: str, batch_size: int, n_batches: int, *, seed: int, device: torch.device) -> list[torch.Tensor]:
    """``n_batches`` distinct input batches [batch_size, ...] for model ``name``, on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    make = MODELS[name].make_input
    return [make(batch_size, gen).to(device) for _ in range(n_batches)]


def build_model(name: str, device: torch.device, *, width: int | None = None, seed: int = 0) -> nn.Module:
    """Model ``name`` with seeded random weights, BatchNorm calibrated, in eval mode, on ``device``."""
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; choose one of {model_names()}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[name].build(width or DEFAULT_WIDTH.get(name, 0)).to(device)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        calibration = make_inputs(name, 16, BN_CALIBRATION_BATCHES, seed=seed + 10_000, device=device)
        _calibrate_batchnorm(model, calibration)
    return model.eval()


def build_workload(name: str, device: torch.device, *, batch_size: int, n_batches: int, seed: int = 0,
                   width: int | None = None) -> Workload:
    model = build_model(name, device, width=width, seed=seed)
    batches = make_inputs(name, batch_size, n_batches, seed=seed + 1, device=device)
    description = MODELS[name].description
    if width and width != DEFAULT_WIDTH.get(name, width):
        description += f", width {width}"
    return Workload(name, model, batches, description)


def _calibrate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    model.eval()


@contextlib.contextmanager
def precision(dtype: str, device: torch.device) -> Iterator[torch.dtype | None]:
    """Set the matmul/conv precision for ``dtype`` and yield the autocast dtype (None or bf16).

    fp32: full fp32 (TF32 off); tf32: TF32 tensor cores for fp32 matmuls and convolutions
    (CUDA only; on the CPU it is plain fp32); bf16: fp32 weights with bf16 autocast.
    The global flags are restored afterwards.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {DTYPES}")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    tf32 = dtype == "tf32" and device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield torch.bfloat16 if dtype == "bf16" else None
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def autocast_context(device: torch.device, autocast: torch.dtype | None):
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast)
