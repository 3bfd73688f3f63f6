"""Time each fused kernel against its torch reference at CIFAR ResNet-18 shapes.

    python bench/bench_kernels.py                       # GPU: B=256 convs/BN, B=64 sumsq, fp32 + bf16
    python bench/bench_kernels.py --batch 8 --sumsq-batch 2 --repeats 5   # CPU: references only

On CUDA every row times the Triton kernel (impl="triton") and the reference (impl="torch") with
``triton.testing.do_bench`` (warm-up outside the clock, L2 flushed, median with 20th/80th
percentiles), checks the kernel against a float64 reference and a second run (bitwise equal),
and measures the peak extra memory of one call. On CPU the kernels would only run in Triton's
interpreter, which says nothing about speed, so only the references are timed
(``time.perf_counter`` medians). Shapes come from the repository's own ``cifar_resnet18``.
Prints a table and writes JSON (``--json``, default bench/results/kernels-<device>.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from gradnorm_engine.kernels import (batch_norm_grad_sqnorm, conv2d_weight_grad_sqnorm, linear_weight_grad_sqnorm,
                                    per_sample_sumsq)
from gradnorm_engine.kernels.conv2d_weight_grad import _conv2d_weight_grad_sqnorm_triton
from gradnorm_engine.al.models import cifar_resnet18
from gradnorm_engine.norms.conv import conv_weight_sqnorm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Sequence-linear shapes (T, d, p) for the linear kernel beside the ResNet's classifier.
SEQUENCE_LINEARS = [("seq-linear T=64 256->256", 64, 256, 256), ("seq-linear T=64 256->1024", 64, 256, 1024)]


def resnet18_conv_geometries():
    """Unique (name, C, H, W, O, kernel, stride, padding, dilation, groups) of CIFAR ResNet-18."""
    model = cifar_resnet18()
    seen, rows, handles = set(), [], []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            def hook(mod, inp, _out, name=name):
                C, H, W = inp[0].shape[1:]
                key = (C, H, W, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                       mod.dilation, mod.groups)
                if key not in seen:
                    seen.add(key)
                    rows.append((name, *key))
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return rows


def resnet18_param_shapes():
    return [tuple(p.shape) for p in cifar_resnet18().parameters()]


class Timer:
    """Median and spread of one call, in milliseconds, on the tensors' device."""

    def __init__(self, device: torch.device, repeats: int, with_kernels: bool):
        self.device, self.repeats, self.with_kernels = device, repeats, with_kernels

    def __call__(self, fn):
        if self.device.type == "cuda":
            from triton.testing import do_bench
            med, lo, hi = do_bench(fn, warmup=25, rep=max(50, 10 * self.repeats), quantiles=[0.5, 0.2, 0.8])
            return med, lo, hi
        fn()  # warm-up outside the clock
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        return statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5]


def peak_extra_mib(fn, device) -> float | None:
    """Peak memory allocated by one call beyond what was live before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def compare(name, run, truth, device, timer, extra=None):
    """One table row: reference and (on CUDA) kernel timings, error, determinism, memory."""
    row = {"case": name, **(extra or {})}
    row["torch_ms"] = timer(lambda: run("torch"))
    row["torch_extra_mib"] = peak_extra_mib(lambda: run("torch"), device)
    if device.type == "cuda" or timer.with_kernels:
        first, second = run("triton"), run("triton")
        row["deterministic"] = bool(torch.equal(first, second))
        exact = truth()
        row["max_rel_err"] = float(((first.double() - exact).abs() / exact.abs().clamp_min(1e-300)).max())
        row["triton_ms"] = timer(lambda: run("triton"))
        row["triton_extra_mib"] = peak_extra_mib(lambda: run("triton"), device)
        row["speedup"] = row["torch_ms"][0] / row["triton_ms"][0]
    return row


def bench_conv(args, device, timer, dtype_name):
    dtype = DTYPES[dtype_name]
    rows = []
    for name, C, H, W, O, k, s, p, d, g in resnet18_conv_geometries():
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(args.batch, C, H, W, device=device, generator=gen).to(dtype)
        Ho = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        Wo = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        gy = torch.randn(args.batch, O, Ho, Wo, device=device, generator=gen).to(dtype)
        if args.channels_last:
            x, gy = x.to(memory_format=torch.channels_last), gy.to(memory_format=torch.channels_last)
        run = lambda impl: conv2d_weight_grad_sqnorm(x, gy, k, s, p, d, g, impl=impl)  # noqa: E731
        truth = lambda: conv2d_weight_grad_sqnorm(x.double(), gy.double(), k, s, p, d, g, impl="torch")  # noqa: E731
        geometry = f"{C}x{H}x{W}->{O}x{Ho}x{Wo} k{k[0]}x{k[1]} s{s[0]}"
        row = compare(f"conv {name}", run, truth, device, timer,
                      {"kernel": "conv2d_weight_grad_sqnorm", "dtype": dtype_name, "batch": args.batch,
                       "shape": geometry, "channels_last": args.channels_last})
        if device.type == "cuda":  # the alternatives a rule could use, and a training step's cost
            if x.stride(1) != 1:  # the kernel on x as given, without the channels_last copy
                row["triton_as_given_ms"] = timer(lambda: _conv2d_weight_grad_sqnorm_triton(
                    x, gy, k, s, p, d, g, relayout=False))
            layer = torch.nn.Conv2d(C, O, k, s, p, d, g, bias=False).to(device, dtype)
            row["gram_ms"] = timer(lambda: conv_weight_sqnorm(layer, x, gy, form="gram"))
            row["batched_wgrad_ms"] = timer(lambda: torch.ops.aten.convolution_backward(
                gy, x, layer.weight, None, list(s), list(p), list(d), False, [0, 0], g, [False, True, False]))
        rows.append(row)
        del x, gy
    return rows


def bench_linear(args, device, timer, dtype_name):
    dtype = DTYPES[dtype_name]
    shapes = [("linear (classifier) T=1 512->10", 1, 512, 10), *SEQUENCE_LINEARS]
    rows = []
    for name, T, d, p in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(args.batch, T, d, device=device, generator=gen).to(dtype)
        g = torch.randn(args.batch, T, p, device=device, generator=gen).to(dtype)
        run = lambda impl: linear_weight_grad_sqnorm(a, g, impl=impl)  # noqa: E731
        truth = lambda: linear_weight_grad_sqnorm(a.double(), g.double(), impl="torch")  # noqa: E731
        rows.append(compare(name, run, truth, device, timer,
                            {"kernel": "linear_weight_grad_sqnorm", "dtype": dtype_name, "batch": args.batch,
                             "shape": f"T={T} d={d} p={p}"}))
    return rows


def bench_bn(args, device, timer, dtype_name):
    """The BatchNorm rule's one-pass kernel at the four BatchNorm input shapes of CIFAR ResNet-18."""
    dtype = DTYPES[dtype_name]
    rows = []
    for C, H in ((64, 32), (128, 16), (256, 8), (512, 4)):
        gen = torch.Generator(device=device).manual_seed(0)
        x = (torch.randn(args.batch, C, H, H, device=device, generator=gen) + 1).to(dtype)
        gy = torch.randn(args.batch, C, H, H, device=device, generator=gen).to(dtype)
        if args.channels_last:
            x, gy = x.to(memory_format=torch.channels_last), gy.to(memory_format=torch.channels_last)
        mean = torch.randn(C, device=device, generator=gen)
        inv_std = torch.rand(C, device=device, generator=gen) + 0.5
        run = lambda impl: torch.stack(batch_norm_grad_sqnorm(x, gy, mean, inv_std, impl=impl))  # noqa: E731
        truth = lambda: torch.stack(batch_norm_grad_sqnorm(  # noqa: E731
            x.double(), gy.double(), mean.double(), inv_std.double(), impl="torch"))
        rows.append(compare(f"batch_norm {C}x{H}x{H}", run, truth, device, timer,
                            {"kernel": "batch_norm_grad_sqnorm", "dtype": dtype_name, "batch": args.batch,
                             "shape": f"{C}x{H}x{H}", "channels_last": args.channels_last}))
        del x, gy
    return rows


def copy_bandwidth_gbs(numel, dtype, device, timer) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time) at the same footprint."""
    src = torch.empty(numel, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))[0]
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def bench_sumsq(args, device, timer, dtype_name):
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(args.sumsq_batch, *shape, device=device, generator=gen).to(dtype)
             for shape in resnet18_param_shapes()]
    nbytes = sum(t.numel() * t.element_size() for t in grads)
    run = lambda impl: per_sample_sumsq(grads, per_tensor=True, impl=impl)  # noqa: E731
    truth = lambda: per_sample_sumsq([t.double() for t in grads], per_tensor=True, impl="torch")  # noqa: E731
    row = compare(f"per_sample_sumsq ResNet-18 grads ({len(grads)} tensors)", run, truth, device, timer,
                  {"kernel": "per_sample_sumsq", "dtype": dtype_name, "batch": args.sumsq_batch,
                   "shape": f"{nbytes / 2**30:.2f} GiB"})
    row["torch_gbs"] = nbytes / (row["torch_ms"][0] * 1e-3) / 1e9
    if "triton_ms" in row:
        row["triton_gbs"] = nbytes / (row["triton_ms"][0] * 1e-3) / 1e9
    if device.type == "cuda":
        row["copy_gbs"] = copy_bandwidth_gbs(nbytes // grads[0].element_size(), dtype, device, timer)
        row["fraction_of_copy_bw"] = row["triton_gbs"] / row["copy_gbs"]
    del grads
    return [row]


def _fmt_ms(t):
    return "-" if t is None else f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"


def print_table(rows):
    header = (f"{'kernel case':44s} {'dtype':5s} {'B':>4s}  {'torch ms (p20,p80)':>26s}  "
              f"{'triton ms (p20,p80)':>26s} {'speedup':>7s} {'rel err':>8s} {'det':>4s} "
              f"{'MiB torch/triton':>17s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        mem = "-" if r.get("torch_extra_mib") is None else (
            f"{r['torch_extra_mib']:.0f}/{r.get('triton_extra_mib', float('nan')):.0f}")
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-"
        det = {True: "yes", False: "NO"}.get(r.get("deterministic"), "-")
        print(f"{r['case'][:44]:44s} {r['dtype']:5s} {r['batch']:4d}  {_fmt_ms(r['torch_ms']):>26s}  "
              f"{_fmt_ms(r.get('triton_ms')):>26s} {speed:>7s} {err:>8s} {det:>4s} {mem:>17s}")
        if "batched_wgrad_ms" in r:
            print(f"    {r['shape']}: Gram form {_fmt_ms(r['gram_ms'])} ms; the batch's summed weight "
                  f"gradient (cuDNN, a training step's share) {_fmt_ms(r['batched_wgrad_ms'])} ms")
            if "triton_as_given_ms" in r:
                print(f"    kernel on the NCHW input as given (no channels_last copy): "
                      f"{_fmt_ms(r['triton_as_given_ms'])} ms")
        if "fraction_of_copy_bw" in r:
            print(f"    per_sample_sumsq: {r['triton_gbs']:.0f} GB/s read = {100 * r['fraction_of_copy_bw']:.0f}% "
                  f"of copy bandwidth {r['copy_gbs']:.0f} GB/s (torch reference {r['torch_gbs']:.0f} GB/s)")
        elif "torch_gbs" in r:
            print(f"    per_sample_sumsq reference: {r['torch_gbs']:.1f} GB/s read")
    if any(r.get("deterministic") is False for r in rows):
        print("WARNING: a kernel gave different results on two identical calls")


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256 if cuda else 8, help="B for conv/linear rows")
    parser.add_argument("--sumsq-batch", type=int, default=64 if cuda else 2, help="B for per_sample_sumsq")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    parser.add_argument("--kernels", default="conv,bn,linear,sumsq", help="comma list of conv, bn, linear, sumsq")
    parser.add_argument("--channels-last", action="store_true", help="conv rows in channels_last layout")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per row on CPU (GPU: do_bench)")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU: also run the kernels in Triton's interpreter (needs TRITON_INTERPRET=1; "
                             "checks this script's kernel rows on tiny batches, says nothing about speed)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (1 keeps timings stable on a shared machine)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the rows")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(args.threads)
    timer = Timer(device, args.repeats, with_kernels=cuda or args.interpret)
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                             f"{torch.get_num_threads()} threads)"
    print(f"device: {device_name}; torch {torch.__version__}"
          + ("" if cuda or args.interpret else "; no GPU: only the torch references are timed")
          + ("; kernels in Triton's INTERPRETER (timings meaningless)" if args.interpret and not cuda else ""))
    benches = {"conv": bench_conv, "bn": bench_bn, "linear": bench_linear, "sumsq": bench_sumsq}
    rows = []
    for dtype_name in args.dtypes.split(","):
        for kernel in args.kernels.split(","):
            rows += benches[kernel](args, device, timer, dtype_name)
            if cuda:
                torch.cuda.empty_cache()
    print_table(rows)

    out = args.json or Path(__file__).parent / "results" / f"kernels-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "device": device_name, "torch": torch.__version__, "rows": rows}
    try:
        import triton
        record["triton"] = triton.__version__
    except ImportError:
        pass
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
