"""Choosing between a Triton kernel and its torch reference, honestly.

``impl="torch"`` always runs the reference. ``impl="auto"`` runs the compiled Triton kernel when
every tensor is on CUDA and none is float64, the reference otherwise: float64 is for exactness
checks, where cuBLAS's float64 products are as good and no faster path matters; and when the
kernels were decorated for the interpreter, a correctness tool far slower than the reference.
``impl="triton"`` insists on the kernel: on CUDA tensors it compiles it; on CPU tensors it runs
only in Triton's interpreter. ``dispatch`` makes the whole choice for one call.

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` *decorates* a function (triton/runtime/
jit.py: the decorator returns an ``InterpretedFunction`` when the knob is on), i.e. when this
package is first imported. Setting the variable later changes nothing, so the check below asks
the decorated kernel object what it is instead of reading the environment.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

IMPLS = ("auto", "triton", "torch")

try:  # Triton is optional: every public function still works through its torch reference.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    TRITON_AVAILABLE = True
except Exception:  # pragma: no cover - depends on the installation
    TRITON_AVAILABLE = False


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated while TRITON_INTERPRET=1 (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


class KernelFallbackWarning(UserWarning):
    """A Triton kernel failed to compile or launch; its torch reference runs instead from now on."""


_FAILED: dict[str, str] = {}   # kernel name -> why it failed; "auto" then uses the reference


def run_with_fallback(impl: str, name: str, kernel_call: Callable, reference_call: Callable):
    """Run the Triton path; under impl="auto" a failure (a Triton too old for the kernel, a
    compiler bug on this card) warns once and runs the exact torch reference, now and later.
    impl="triton" and out-of-memory errors raise as they are."""
    try:
        return kernel_call()
    except Exception as err:  # noqa: BLE001 - any compiler or launch failure
        if impl == "triton" or is_out_of_memory(err):
            raise
        _FAILED[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        warnings.warn(f"{name}: the Triton kernel failed ({_FAILED[name]}); using its exact torch reference "
                      "instead (slower). Please report this with your triton and torch versions.",
                      KernelFallbackWarning, stacklevel=3)
        return reference_call()


def dispatch(impl: str, name: str, tensors: Sequence[torch.Tensor], kernel, kernel_call: Callable,
             reference_call: Callable):
    """One call of kernel ``name``: the reference where ``use_triton`` says so, else the kernel
    under ``run_with_fallback``."""
    if not use_triton(impl, tensors, kernel, name):
        return reference_call()
    return run_with_fallback(impl, name, kernel_call, reference_call)


def use_triton(impl: str, tensors: Sequence[torch.Tensor], kernel, name: str) -> bool:
    """Resolve ``impl`` for ``name``: True to launch ``kernel``, False to run the reference.

    Raises ValueError for an unknown ``impl`` and RuntimeError when ``impl="triton"`` cannot run.
    """
    if impl not in IMPLS:
        raise ValueError(f"{name}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        return (TRITON_AVAILABLE and kernel is not None and on_cuda and not is_interpreted(kernel)
                and not any(t.dtype == torch.float64 for t in tensors) and name not in _FAILED)
    # impl == "triton"
    if not TRITON_AVAILABLE or kernel is None:
        raise RuntimeError(f"{name}: impl='triton' needs the triton package; install it "
                           "(pip install triton) or pass impl='torch'")
    if on_cuda:
        return True
    if any(t.is_cuda for t in tensors):
        raise RuntimeError(f"{name}: tensors are on different devices; move them to one device")
    if not is_interpreted(kernel):
        raise RuntimeError(
            f"{name}: impl='triton' on CPU tensors runs only in Triton's interpreter, which is "
            "chosen when the kernels are decorated: set TRITON_INTERPRET=1 before "
            "gradnorm_engine is first imported, move the tensors to CUDA, or pass impl='torch'")
    return True


def accum_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype squared norms accumulate in, across the project: float64 when any input is
    float64 (exactness checks rely on it), float32 otherwise (bf16/fp16 inputs included)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def is_out_of_memory(err: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError. Defined
    here, in the lowest layer, because a kernel's failure to allocate must not count as a
    kernel that cannot run; the engine's memory module re-exports it."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
