"""Compile every kernel for an NVIDIA GPU ahead of time, without a GPU.

Triton's interpreter (how CI runs the kernels on CPU) executes the kernels' maths with numpy and
skips the compiler, so a kernel can pass every interpreter test and still fail to compile for a
real card. This module runs the real pipeline (Triton IR -> LLVM -> PTX -> ptxas cubin) for a
chosen target and dtype, with the block sizes the launchers use at CIFAR ResNet-18 shapes.

    python -m gradnorm_engine.kernels.compile_check [--arch 90] [KERNEL ...]

It must run with TRITON_INTERPRET unset: kernels decorated under the interpreter cannot compile.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import os
import subprocess
import sys
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Argument types per storage dtype: (pointer type of the inputs, accumulator type name, tl types).
_DTYPES = {
    "fp32": ("fp32", "fp32", tl.float32, tl.float32),
    "bf16": ("bf16", "fp32", tl.bfloat16, tl.float32),
    "fp16": ("fp16", "fp32", tl.float16, tl.float32),
    "fp64": ("fp64", "fp64", tl.float64, tl.float64),
}


def _module(name: str):
    # The package re-exports each launcher under its module's name, so import the module itself.
    return importlib.import_module(f"gradnorm_engine.kernels.{name}")


def _jobs(dtype: str):
    """(kernel name, jit function, signature, constexprs) for one storage dtype."""
    ptr, acc, tl_in, tl_acc = _DTYPES[dtype]
    pss = _module("per_sample_sumsq")
    lin = _module("linear_weight_grad")
    conv = _module("conv2d_weight_grad")
    i64_tables = {n: "*i64" for n in ("ptrs", "batch_strides", "elem_strides", "numels",
                                       "item_tensor", "item_start")}
    yield ("per_sample_sumsq", pss._per_sample_sumsq_kernel,
           {**i64_tables, "partials": f"*{acc}", "n_items": "i32", "item_offset": "i32"},
           {"DTYPE": tl_in, "ACC": tl_acc, "BLOCK": pss.BLOCK, "ITERS": pss.ITERS})
    yield ("per_sample_sumsq", pss._segment_sum_kernel,
           {"partials": f"*{acc}", "seg_start": "*i64", "seg_end": "*i64", "out": f"*{acc}",
            "n_items": "i32", "n_seg": "i32"},
           {"BLOCK": pss.SEGMENT_BLOCK})
    bn = _module("batch_norm_grad")
    yield ("batch_norm_grad", bn._batch_norm_grad_sqnorm_kernel,
           {"x": f"*{ptr}", "g": f"*{ptr}", "mean": f"*{acc}", "inv_std": f"*{acc}",
            "partial_w": f"*{acc}", "partial_b": f"*{acc}",
            **{n: "i32" for n in ("C", "L", "sxb", "sxc", "sxl", "sgb", "sgc", "sgl", "n_blocks")}},
           {"ACC": tl_acc, "BC": 8, "BL": 256})
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    yield ("linear_weight_grad", lin._linear_weight_grad_sqnorm_kernel,
           {"a": f"*{ptr}", "g": f"*{ptr}", "partials": f"*{acc}",
            **ints("T", "D", "P", "sab", "sat", "sad", "sgb", "sgt", "sgp", "n_tiles_d", "n_tiles")},
           {"DOT": tl_in, "ACC": tl_acc, "BP": 64, "BD": 64, "BT": 32})
    for (k, s, p), (tap_major, one_tap) in itertools.product(((3, 1, 1), (1, 2, 0)),
                                                              ((False, False), (True, False), (True, True))):
        # the 3x3 convs and the strided 1x1 shortcuts; NCHW, channels_last, one tap per tile
        yield ("conv2d_weight_grad", conv._conv2d_weight_grad_sqnorm_kernel,
               {"x": f"*{ptr}", "go": f"*{ptr}", "partials": f"*{acc}",
                **ints("H", "W", "Wo", "L", "Cg", "Og", "K", "n_tiles_o", "n_tiles_k", "n_tiles",
                       "sxb", "sxc", "sxh", "sxw", "sgb", "sgc", "sgh", "sgw")},
               {"KH": k, "KW": k, "SH": s, "SW": s, "PH": p, "PW": p, "DH": 1, "DW": 1,
                "DOT": tl_in, "ACC": tl_acc, "TAP_MAJOR": tap_major, "ONE_TAP": one_tap,
                "BO": 64, "BK": 64, "BL": 64})


def compile_all(arch: int = 90, kernels=None, dtypes=("fp32", "bf16", "fp64"), log=print) -> int:
    """Compile the selected kernels to cubins for sm_<arch>; returns the number compiled."""
    target = GPUTarget("cuda", arch, 32)
    done = 0
    for dtype in dtypes:
        for name, fn, signature, constexprs in _jobs(dtype):
            if kernels and name not in kernels:
                continue
            if type(fn).__name__ == "InterpretedFunction":
                raise RuntimeError("kernels were decorated under TRITON_INTERPRET=1; "
                                   "run the compile check with TRITON_INTERPRET unset")
            start = time.perf_counter()
            compiled = triton.compile(ASTSource(fn, {**signature, **{k: "constexpr" for k in constexprs}},
                                                constexprs), target=target)
            assert compiled.asm.get("cubin"), f"{fn.__name__} produced no cubin"
            log(f"{fn.__name__:36s} {dtype:5s} sm_{arch}: ok ({time.perf_counter() - start:.1f} s)")
            done += 1
    return done


def compile_in_subprocess(kernels, arch: int = 90, dtypes: str = "fp32,bf16,fp64",
                          timeout: float = 300) -> subprocess.CompletedProcess:
    """Run this check in a fresh interpreter with TRITON_INTERPRET unset (usable from tests)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", __name__, *kernels, "--arch", str(arch), "--dtypes", dtypes]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernels", nargs="*", help="per_sample_sumsq, linear_weight_grad, conv2d_weight_grad, batch_norm_grad")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--dtypes", default="fp32,bf16,fp64")
    args = parser.parse_args(argv)
    compile_all(args.arch, set(args.kernels), tuple(args.dtypes.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
