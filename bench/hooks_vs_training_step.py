"""Throughput of the hooks backend against a training step of the same model (CPU by default,
--device cuda on a GPU): CIFAR ResNet-18, or any benchmark workload (--model vit, swin_t,
convnext_tiny, resnet50, bert, ...: gradnorm_engine.benchmark.workloads).

    python bench/hooks_vs_training_step.py [--batch 32] [--threads 2] [--repeats 7] [--loop-samples 8]
    python bench/hooks_vs_training_step.py --model vit --loop-samples 0 --repeats 9
    python bench/hooks_vs_training_step.py --device cuda --batch 256 [--autocast bf16] [--channels-last]

Compares, in one process and interleaved round by round (so that load from other processes
hits every method alike):
  fwd+bwd  one batched forward + backward of the summed entropy w.r.t. all parameters
           (a training step without the optimizer)
  hooks    HooksBackend.sqnorms: exact per-sample squared norms of every parameter tensor
  loop     the per-sample reference (one forward + backward per sample), on fewer samples
Prints samples/s (median and best round), the ratios the targets refer to (the median over rounds
of each round's ratio, which load from other processes hits least, the best rounds' ratio and the
CPU-time ratio), the load average before and after, and which parameters the hooks backend left
to its exact fallback.

On a machine shared with other jobs, wall time swings from round to round; the best round
approximates an idle machine, and CPU time (process_time, all threads) counts the work done
whatever the load, so both are reported. OpenMP's wait policy is left as the environment sets it
(the library default: idle threads spin a while before sleeping). On a machine shared with other
jobs, OMP_WAIT_POLICY=PASSIVE keeps waiting threads from stealing cores, at a price on an idle
one: every small operation then pays a thread wake-up, which costs the hooks backend's per-sample
loops far more than a training step's few large operations (bench/results/hooks-cpu.md, run 5).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from gradnorm_engine.backends.hooks import HooksBackend
from gradnorm_engine.backends.loop import LoopBackend
from gradnorm_engine.job import eval_mode
from gradnorm_engine.kernels import _dispatch
from gradnorm_engine.job import make_job
from resnet18_workload import resnet18_job

CIFAR = "cifar_resnet18"


def workload_job(name: str, device: torch.device, batch: int, *, autocast: str | None = None,
                 channels_last: bool = False):
    """(model, inputs, job) for ``name``: CIFAR ResNet-18 as the other hooks benchmarks build it, or
    a benchmark workload (seeded, eval mode, BatchNorm calibrated)."""
    if name == CIFAR:
        return resnet18_job(device, batch, autocast=autocast, channels_last=channels_last)
    from gradnorm_engine.benchmark.workloads import build_workload
    workload = build_workload(name, device, batch_size=batch, n_batches=1)
    model, x = workload.model, workload.batches[0]
    if channels_last and x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    job = make_job(model, score="entropy", params=None, logits_fn=None, device=device, autocast=autocast,
                   max_memory=None)
    return model, x, job


def timed(fn, device: torch.device) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process over all its threads, peak CUDA bytes or 0)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return time.perf_counter() - wall, time.process_time() - cpu, peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=CIFAR, help=f"{CIFAR} (default) or a benchmark workload: vit, swin_t, "
                    "convnext_tiny, resnet50, bert, ...")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--loop-samples", type=int, default=8, help="samples of the per-sample loop; 0 skips it")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", choices=["bf16", "fp16"], default=None)
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model, x, job = workload_job(args.model, device, args.batch, autocast=args.autocast,
                                 channels_last=args.channels_last)
    params = [p for _, p in job.params]
    load_before = os.getloadavg()

    with eval_mode(model), torch.enable_grad():
        hooks = HooksBackend(job)
        loop = LoopBackend(job)

        def fwd_bwd():
            torch.autograd.grad(job.losses(x).sum(), params)

        def run_hooks():
            hooks.sqnorms(x)

        def run_loop():
            loop.sqnorms(x[: args.loop_samples])

        with_loop = args.loop_samples > 0
        for fn in (fwd_bwd, run_hooks, run_loop) if with_loop else (fwd_bwd, run_hooks):  # warm-up, unclocked
            fn()
        times = {"fwd+bwd": [], "hooks": [], "loop": []} if with_loop else {"fwd+bwd": [], "hooks": []}
        for r in range(args.repeats):
            times["fwd+bwd"].append(timed(fwd_bwd, device))
            times["hooks"].append(timed(run_hooks, device))
            if with_loop and r < 3:
                times["loop"].append(timed(run_loop, device))
    load_after = os.getloadavg()

    samples = {"fwd+bwd": args.batch, "hooks": args.batch, "loop": min(args.loop_samples, args.batch)}
    rate = {k: (samples[k] / statistics.median(w for w, _, _ in v), samples[k] / min(w for w, _, _ in v),
                samples[k] / statistics.median(c for _, c, _ in v)) for k, v in times.items()}
    peak = {k: max(m for _, _, m in v) / 2**30 for k, v in times.items()}
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({args.threads} threads)")
    precision = f"{args.autocast} autocast" if args.autocast else "fp32"
    title = "CIFAR ResNet-18" if args.model == CIFAR else args.model
    print(f"# hooks backend, {where}, {title} {precision}"
          f"{', channels_last' if args.channels_last else ''}, batch {args.batch}")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.processor() or platform.machine()}, "
          f"os.cpu_count()={os.cpu_count()}, load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print()
    print("| method | samples/s wall (median) | samples/s wall (best round) | samples per CPU-second (median) "
          "| peak CUDA GiB | rounds |")
    print("|---|---|---|---|---|---|")
    for k, (med, best, cpu) in rate.items():
        print(f"| {k} | {med:.1f} | {best:.1f} | {cpu:.1f} | {peak[k]:.2f} | {len(times[k])} |")
    print()
    for other, target in (("fwd+bwd", "0.9x"), ("loop", "10x")) if with_loop else (("fwd+bwd", "0.9x"),):
        r = [rate["hooks"][i] / rate[other][i] for i in range(3)]
        rounds = len(times[other])
        # each round's own ratio (samples/s of hooks over the other's), paired in time
        per_round = statistics.median(samples["hooks"] / times["hooks"][i][0] / (samples[other] / times[other][i][0])
                                      for i in range(rounds))
        print(f"hooks / {other}: {per_round:.2f}x median of per-round ratios, {r[0]:.2f}x wall median, "
              f"{r[1]:.2f}x wall best, {r[2]:.2f}x CPU time (target >= {target})")
    fallback = getattr(hooks, "last_fallback", ())
    print(f"hooks' exact fallback: {len(fallback)} of {len(job.params)} parameter tensors"
          + (f" ({', '.join(fallback[:6])}{' ...' if len(fallback) > 6 else ''})" if fallback else ""))
    if device.type == "cuda":
        print(f"peak memory hooks / fwd+bwd: {peak['hooks'] / max(peak['fwd+bwd'], 1e-9):.2f}x (target <= 1.5x)")
    if _dispatch._FAILED:
        print(f"KERNELS THAT FELL BACK TO THEIR TORCH REFERENCE: {_dispatch._FAILED}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
