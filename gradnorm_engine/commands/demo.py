"""``gradnorm-engine demo``: the engine and the LPLgrad loop on scikit-learn's digits, no download.

1. Engine check: a small CNN trained on 200 labeled digits ranks the rest of the pool with
   ``rank_unlabeled``; prints the top picks and, for every backend, samples/s next to the
   per-sample loop and the largest relative difference from the loop's scores.
2. Active learning: lplgrad, ent-gradnorm, entropy and random on the digits (CIFAR ResNet-18 of
   width 8, 16x16 images), 2 trials x 4 cycles; prints the accuracy table and writes
   results.jsonl, curves.png (mean and band over trials), times.png, per_class.png, summary.md
   into --out.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import replace

import torch

from ..al.datasets import load_digits
from ..al.loop import ALConfig, run_active_learning, validate
from ..al.models import small_cnn
from ..al.presets import DEMO
from ..al.report import accuracy_table, time_table, write_report
from ..al.run_folder import CHECKPOINTS, CONFIG, RESULTS, make_out_folder
from ..al.trainer import TrainConfig, evaluate, train
from ..api import rank_unlabeled, score_pool
from ..backends import BACKENDS
from ..devices import resolve_device
from ..errors import UsageError

HELP = "engine check and a 4-strategy active-learning comparison on the bundled digits (no download)"

DEMO_STRATEGIES = ("lplgrad", "ent-gradnorm", "entropy", "random")
MARKER = "DEMO"  # marks a folder the demo wrote, so a rerun may clear it
CHECK_LABELED = 200
LOOP_SAMPLES = 200  # the per-sample loop is timed (and compared) on this many pool samples


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="output folder (default: runs/demo)")
    p.add_argument("--trials", type=int, default=DEMO.trials, help=f"trials (default: {DEMO.trials})")
    p.add_argument("--cycles", type=int, default=DEMO.cycles, help=f"cycles (default: {DEMO.cycles})")
    p.add_argument("--epochs", type=int, default=DEMO.epochs, help=f"epochs per cycle (default: {DEMO.epochs})")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default: 1: the demo's models are tiny, and one thread does "
                        "not stall on OpenMP spin-waits when other processes share the cores)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--skip-engine-check", action="store_true", help="only run the active-learning comparison")


def engine_check(data, device: torch.device, progress: bool) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.train), generator=g)
    labeled, pool = order[:CHECK_LABELED], order[CHECK_LABELED:].sort().values
    model = small_cnn(num_classes=data.num_classes, in_channels=data.in_channels)
    train(model, data.train, labeled, TrainConfig(epochs=30, lr=0.1, milestones=(24,), batch_size=32,
                                                   progress=progress), device=device, generator=g)
    acc, _ = evaluate(model, data.test, device, num_classes=data.num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"== engine check: small CNN ({n_params:,} parameters) trained on {CHECK_LABELED} labeled digits, "
          f"test accuracy {acc:.1f} %")

    res = rank_unlabeled(model, data.train.loader(pool, device), k=10, progress=progress)
    print(f"top 10 of {res.pool_size:,} unlabeled samples by ||dH(x)/dtheta|| ({res.norm}, backend {res.backend}):")
    print("  rank  pool index  label     score")
    for r, (i, s) in enumerate(zip(res.indices.tolist(), res.scores.tolist()), 1):
        print(f"  {r:>4}  {int(pool[i]):>10}  {int(data.train.labels[pool[i]]):>5}  {s:8.4f}")

    head = pool[:LOOP_SAMPLES]
    rows = []
    reference = None
    for name in ["loop", *[b for b in BACKENDS if b != "loop"]]:
        indices = head if name == "loop" else pool
        try:
            # Warm-up outside the clock (first-call tracing and allocation).
            score_pool(model, data.train.loader(pool[:16], device), backend=name, progress=False)
            start = time.perf_counter()
            scores = score_pool(model, data.train.loader(indices, device), backend=name, progress=progress)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rate = len(indices) / (time.perf_counter() - start)
        except Exception as err:  # a backend that cannot handle this model is reported, not fatal
            rows.append((name, None, None, f"{type(err).__name__}: {err}"[:60]))
            continue
        if name == "loop":
            reference = scores.double()
        diff = float(((scores[:LOOP_SAMPLES].double() - reference).abs() / reference.abs().clamp_min(1e-12)).max())
        rows.append((name, rate, diff, ""))
    loop_rate = rows[0][1]
    print(f"\nbackends (samples/s on {device.type}; loop timed on {LOOP_SAMPLES} samples, others on all "
          f"{len(pool):,}):")
    print(f"  {'backend':<8} {'samples/s':>10} {'x loop':>7} {'max rel. diff vs loop':>22}")
    for name, rate, diff, note in rows:
        if rate is None:
            print(f"  {name:<8} {'n/a':>10} {'':>7} {'':>22}  {note}")
        else:
            print(f"  {name:<8} {rate:>10,.0f} {rate / loop_rate:>7.1f} {diff:>22.1e}")
    print()


def _clear_previous_demo(out: str) -> None:
    leftovers = [n for n in (RESULTS, CONFIG, CHECKPOINTS) if os.path.exists(os.path.join(out, n))]
    if not leftovers:
        return
    if not os.path.exists(os.path.join(out, MARKER)):
        raise UsageError(f"{out} holds an active-learning run that the demo did not write; choose another --out")
    for name in leftovers:
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, started)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace, started: float) -> int:
    device = resolve_device(args.device)
    data = load_digits()
    preset = replace(DEMO, trials=args.trials, cycles=args.cycles, epochs=args.epochs)
    config = ALConfig(dataset="digits", strategies=list(DEMO_STRATEGIES), preset=preset, out=args.out,
                      device=args.device, progress=args.progress)
    validate(config, len(data.train))   # mistakes first, before minutes of work
    make_out_folder(args.out)
    if not args.skip_engine_check:
        engine_check(data, device, args.progress)

    _clear_previous_demo(args.out)
    with open(os.path.join(args.out, MARKER), "w") as f:
        f.write("written by `gradnorm-engine demo`; a rerun replaces this folder's results\n")
    print(f"== active learning on digits ({len(data.train):,} pool / {len(data.test)} test, 16x16): "
          f"CIFAR ResNet-18 width {preset.width}, {preset.initial} initial + {preset.budget} per cycle from a "
          f"{preset.subset}-sample subset, {preset.cycles} cycles, {preset.epochs} epochs, {preset.trials} trials")
    records = run_active_learning(config, data=data)
    paths = write_report(args.out)
    print("\ntest accuracy (%) by labeled-set size, mean +- std over trials:")
    print(accuracy_table(records, fmt="text"))
    print("\n" + time_table(records))
    print(f"\nwrote {os.path.join(args.out, RESULTS)}, {paths['curves']}, {paths['summary']} "
          f"in {time.perf_counter() - started:.0f} s")
    return 0
