"""Fused kernels for per-sample gradient norms, installed as ``gradnorm_engine.kernels``.

Each kernel file holds the ``@triton.jit`` kernel, its launcher and a plain-torch reference.
Every public function takes ``impl="auto" | "triton" | "torch"``: "auto" runs Triton on CUDA
tensors and the reference on CPU; "triton" on CPU needs TRITON_INTERPRET=1 set before the first
import (Triton's interpreter; how the tests run the kernels). ``python -m
gradnorm_engine.kernels.compile_check`` compiles every kernel for a GPU target without a GPU.
Under "auto", a kernel that fails to compile or launch warns once (``KernelFallbackWarning``)
and its reference runs from then on.

The kernels are self-contained: nothing here imports from the rest of gradnorm_engine (the
engine imports from here, never the other way round).
"""
from ._dispatch import KernelFallbackWarning, accum_dtype, is_out_of_memory
from .batch_norm_grad import batch_norm_grad_sqnorm, batch_norm_grad_sqnorm_reference
from .conv2d_weight_grad import conv2d_weight_grad_sqnorm, conv2d_weight_grad_sqnorm_reference
from .linear_weight_grad import linear_weight_grad_sqnorm, linear_weight_grad_sqnorm_reference
from .per_sample_sumsq import per_sample_sumsq, per_sample_sumsq_reference

__all__ = [
    "KernelFallbackWarning",
    "accum_dtype",
    "batch_norm_grad_sqnorm",
    "batch_norm_grad_sqnorm_reference",
    "conv2d_weight_grad_sqnorm",
    "conv2d_weight_grad_sqnorm_reference",
    "is_out_of_memory",
    "linear_weight_grad_sqnorm",
    "linear_weight_grad_sqnorm_reference",
    "per_sample_sumsq",
    "per_sample_sumsq_reference",
]
