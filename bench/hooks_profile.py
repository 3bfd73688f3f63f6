"""Where the hooks backend spends its time on CIFAR ResNet-18, next to a training step's parts.

    python bench/hooks_profile.py --device cuda --batch 256 [--autocast bf16] [--channels-last]
    python bench/hooks_profile.py --batch 8 --repeats 2          # CPU plumbing check

Prints, per batch (median of --repeats timed calls, one process):
  forward            the model's forward and the entropy
  fwd+bwd (input)    forward + backward to the input only: no parameter gradient at all, the
                     least any method that needs the layer-output gradients can spend
  fwd+bwd (params)   forward + backward to every parameter: a training step without optimizer
  hooks              HooksBackend.sqnorms, exact per-sample squared norms of every parameter
and then the time of each layer's norm rule inside the hooks run (summed over the layer's calls,
timed with CUDA events, so the rest of the backward is not serialised), grouped by layer type
and form. On CUDA it also prints torch.profiler's top kernels of one hooks call.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from gradnorm_engine.backends.hooks import HooksBackend
from gradnorm_engine.job import eval_mode
from gradnorm_engine.kernels import _dispatch
from gradnorm_engine.norms.conv import choose_conv_form
from resnet18_workload import resnet18_job


class RuleClock:
    """Wraps every rule of a HooksBackend to time it per layer (CUDA events or perf_counter)."""

    def __init__(self, hooks: HooksBackend, names: dict, device: torch.device):
        self.device = device
        self.pending: list[tuple[str, object, object]] = []
        self.totals: dict[str, list[float]] = collections.defaultdict(list)
        self.kind: dict[str, str] = {}
        wrapped = []
        for module, rule, mine in hooks.ruled:
            wrapped.append((module, self._wrap(names[module], module, rule), mine))
        hooks.ruled[:] = wrapped

    def _wrap(self, name, module, rule):
        def timed_rule(layer, inputs, grad_outputs):
            if name not in self.kind:
                self.kind[name] = describe(layer, inputs, grad_outputs)
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = rule(layer, inputs, grad_outputs)
                end.record()
                self.pending.append((name, start, end))
            else:
                t0 = time.perf_counter()
                out = rule(layer, inputs, grad_outputs)
                self.pending.append((name, t0, time.perf_counter()))
            return out
        return timed_rule

    def collect(self) -> None:
        """Close one call: add each layer's time (ms) of the pending events."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        per_call: dict[str, float] = collections.defaultdict(float)
        for name, a, b in self.pending:
            per_call[name] += a.elapsed_time(b) if self.device.type == "cuda" else (b - a) * 1e3
        for name, ms in per_call.items():
            self.totals[name].append(ms)
        self.pending.clear()


def describe(layer, inputs, grad_outputs) -> str:
    """'Conv2d 3x3 s1 materialise (T=1024, O=64, K=576)' and the like."""
    kind = type(layer).__name__
    if isinstance(layer, torch.nn.Conv2d):
        g = grad_outputs[0]
        positions = g.shape[2] * g.shape[3]
        k = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        o = layer.out_channels // layer.groups
        form = choose_conv_form(layer, inputs[0].shape, g.shape, g.device.type)
        return f"{kind} {layer.kernel_size[0]}x{layer.kernel_size[1]} s{layer.stride[0]} {form} (T={positions}, O={o}, K={k})"
    return kind


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--autocast", choices=["bf16", "fp16"], default=None)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--width", type=int, default=64, help="ResNet stage width (64: the real model)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    model, x, job = resnet18_job(device, args.batch, autocast=args.autocast, channels_last=args.channels_last,
                                 width=args.width)
    params = [p for _, p in job.params]
    names = {m: n for n, m in model.named_modules()}

    with eval_mode(model), torch.enable_grad():
        hooks = HooksBackend(job)
        clock = RuleClock(hooks, names, device)
        x_in = x.detach().requires_grad_(True)

        def forward():
            with torch.no_grad():
                job.losses(x)

        def bwd_input():
            for p in params:
                p.requires_grad_(False)
            try:
                torch.autograd.grad(job.losses(x_in).sum(), [x_in])
            finally:
                for p in params:
                    p.requires_grad_(True)

        def bwd_params():
            torch.autograd.grad(job.losses(x).sum(), params)

        def run_hooks():
            hooks.sqnorms(x)

        rows = {"forward (no grad)": median_ms(forward, device, args.repeats),
                "fwd+bwd to the input": median_ms(bwd_input, device, args.repeats),
                "fwd+bwd to all params (training step)": median_ms(bwd_params, device, args.repeats)}
        clock.pending.clear()
        run_hooks()                      # warm-up (and the one-off check against the loop)
        clock.pending.clear()
        hook_times = []
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            run_hooks()
            sync(device)
            hook_times.append((time.perf_counter() - t0) * 1e3)
            clock.collect()
        rows["hooks (all rules, exact)"] = statistics.median(hook_times)

        precision = f"{args.autocast} autocast" if args.autocast else "fp32 (TF32 off)"
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"# hooks profile: {where}, CIFAR ResNet-18 (width {args.width}), {precision}"
              f"{', channels_last' if args.channels_last else ''}, batch {args.batch}, torch {torch.__version__}")
        print()
        print("| phase | ms per batch (median) | samples/s |")
        print("|---|---|---|")
        for k, ms in rows.items():
            print(f"| {k} | {ms:.2f} | {args.batch / ms * 1e3:,.0f} |")
        print()
        per_layer = {n: statistics.median(v) for n, v in clock.totals.items()}
        total = sum(per_layer.values())
        print(f"rules inside hooks: {total:.2f} ms per batch in all"
              f" ({'CUDA events' if device.type == 'cuda' else 'perf_counter'})")
        groups: dict[str, list[float]] = collections.defaultdict(list)
        for n, ms in per_layer.items():
            groups[clock.kind[n]].append(ms)
        print()
        print("| rule (layer type, form, shape) | layers | ms per batch |")
        print("|---|---|---|")
        for kind, v in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
            print(f"| {kind} | {len(v)} | {sum(v):.2f} |")

        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run_hooks()
                sync(device)
            busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
            print()
            print(f"torch.profiler, one hooks call: the GPU is busy {busy:.2f} ms of the "
                  f"{rows['hooks (all rules, exact)']:.2f} ms a call takes; top kernels by CUDA time:")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
            # Where a call is CPU-bound (GPU busy well under the wall time): the host-side costs.
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run_hooks()
                sync(device)
            print("torch.profiler, one hooks call, top operators by self CPU time:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))
    if _dispatch._FAILED:
        print(f"KERNELS THAT FELL BACK TO THEIR TORCH REFERENCE: {_dispatch._FAILED}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
