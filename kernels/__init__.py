"""Fused kernels for per-sample gradient norms, installed as ``gradnorm_engine.kernels``.

Each kernel file holds the ``@triton.jit`` kernel, its launcher and a plain-torch reference.
Every public function takes ``impl="auto" | "triton" | "torch"``.
"""
from .per_sample_sumsq import per_sample_sumsq, per_sample_sumsq_reference

__all__ = ["per_sample_sumsq", "per_sample_sumsq_reference"]
