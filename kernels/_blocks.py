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
    stays float64; everything else, mixed pairs included, runs in float32 at float32 accuracy
    (see ``dot_precision``).

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


# How tl.dot multiplies float32 operands. "tf32x3" splits each operand into a TF32 head and a
# TF32 tail and adds three tensor-core products (head*head + head*tail + tail*head): products
# keep ~2^-22 relative accuracy, as float32 FMA does, at tensor-core speed. (Plain "tf32" would
# keep only ~2^-11.) The kernels' tests hold every float32 result to 1e-5 of float64.
FP32_DOT_PRECISION = "tf32x3"


def dot_precision(dot: torch.dtype) -> str:
    """input_precision for tl.dot on operands of dtype ``dot``: FP32_DOT_PRECISION for float32,
    "ieee" (exact products) for everything else."""
    return FP32_DOT_PRECISION if dot == torch.float32 else "ieee"
