"""kernels/_dispatch.py: which path runs, and a kernel that fails under impl="auto" falls back to its exact reference,
once warned; impl="triton" and out-of-memory errors still raise."""
from types import SimpleNamespace

import pytest
import torch

from gradnorm_engine.kernels import _dispatch
from gradnorm_engine.kernels._dispatch import KernelFallbackWarning, run_with_fallback, use_triton
from gradnorm_engine.kernels.per_sample_sumsq import _per_sample_sumsq_kernel


@pytest.fixture(autouse=True)
def _forget_failures():
    yield
    _dispatch._FAILED.clear()


def _broken():
    raise RuntimeError("PassManager::run failed\nlong compiler log")


class _CudaLike:
    """What use_triton reads of a CUDA float32 tensor (no GPU here)."""
    is_cuda = True
    dtype = torch.float32


class _CompiledKernel:
    """Stands for a kernel decorated without the interpreter."""


@pytest.mark.skipif(not _dispatch.TRITON_AVAILABLE, reason="needs the triton package")
def test_auto_warns_once_runs_the_reference_and_remembers():
    tensors, kernel = [_CudaLike()], _CompiledKernel()
    assert use_triton("auto", tensors, kernel, "demo_kernel") is True
    with pytest.warns(KernelFallbackWarning, match="demo_kernel: the Triton kernel failed .*PassManager"):
        assert run_with_fallback("auto", "demo_kernel", _broken, lambda: 7) == 7
    assert use_triton("auto", tensors, kernel, "demo_kernel") is False     # reference from now on
    assert use_triton("auto", tensors, kernel, "other_kernel") is True     # only that kernel
    assert use_triton("triton", tensors, kernel, "demo_kernel") is True    # still on request


def test_triton_and_out_of_memory_raise():
    with pytest.raises(RuntimeError, match="PassManager"):
        run_with_fallback("triton", "demo_kernel", _broken, lambda: 7)

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_with_fallback("auto", "demo_kernel", oom, lambda: 7)
    assert not _dispatch._FAILED


def test_a_working_kernel_runs_without_warning(recwarn):
    assert run_with_fallback("auto", "demo_kernel", lambda: 3, lambda: 7) == 3
    assert not [w for w in recwarn if issubclass(w.category, KernelFallbackWarning)]


def test_dispatch_rules():
    cuda, cpu = SimpleNamespace(is_cuda=True, dtype=torch.float32), SimpleNamespace(is_cuda=False, dtype=torch.float32)
    cuda64 = SimpleNamespace(is_cuda=True, dtype=torch.float64)
    compiled = object()                      # stands for a JITFunction (not interpreted)
    interpreted = _per_sample_sumsq_kernel
    assert use_triton("auto", [cuda, cuda], compiled, "k") is True
    assert use_triton("auto", [cuda], interpreted, "k") is False  # the interpreter is not a fast path
    assert use_triton("auto", [cpu], compiled, "k") is False
    assert use_triton("auto", [cuda64], compiled, "k") is False   # float64: the exact reference
    assert use_triton("triton", [cuda64], compiled, "k") is True
    assert use_triton("torch", [cuda], compiled, "k") is False
    assert use_triton("triton", [cpu], interpreted, "k") is True
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton("triton", [cpu], compiled, "k")
    with pytest.raises(RuntimeError, match="one device"):
        use_triton("triton", [cpu, cuda], interpreted, "k")
