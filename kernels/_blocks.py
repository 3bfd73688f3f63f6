"""Block-size helpers shared by the launchers."""
from __future__ import annotations

import torch


def pow2_block(n: int, lo: int = 16, hi: int = 64) -> int:
    """Smallest power of two >= n, clamped to [lo, hi] (tl.dot needs every block dim >= 16)."""
    b = lo
    while b < n and b < hi:
        b *= 2
    return b


def dot_dtype(*tensors: torch.Tensor, interpreted: bool = False) -> torch.dtype:
    """The dtype both tl.dot operands are cast to; products accumulate in float32 (float64).

    bf16/fp16 pairs stay in half precision (tensor cores, exact products, fp32 sums); float64
    stays float64; everything else, mixed pairs included, runs in full float32: the kernels ask
    tl.dot for input_precision="ieee" (exact products, not TF32). "tf32x3" (three TF32
    tensor-core products, ~2^-22 relative accuracy) was no faster on an H200 for the conv kernel,
    whose time went to gathering patches (CIFAR ResNet-18 layer1 conv, batch 256: 1.77 ms vs
    1.66 ms, bench/results/h200-hooks.md); worth timing again once the gather is faster.

    Under Triton's interpreter bf16 goes through float32 instead: its tl.dot multiplies the raw
    uint16 storage of bf16 tiles (triton 3.8 interpreter.create_dot). That is the same maths,
    since a product of two bf16 numbers is exact in float32 and the sums are float32 either way.
    """
    dtypes = {t.dtype for t in tensors}
    if torch.float64 in dtypes:
        return torch.float64
    if interpreted and torch.bfloat16 in dtypes:
        return torch.float32
    if len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16}:
        return dtypes.pop()
    return torch.float32

