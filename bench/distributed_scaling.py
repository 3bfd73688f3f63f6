"""Sharded scoring on CPU: one fixed pool ranked by 1 process and by W gloo processes.

    .venv/bin/python bench/distributed_scaling.py --pool 1024 --world 2 --repeats 3

Everything runs inside the same W spawned processes (gloo over 127.0.0.1), interleaved round
by round so that load from other jobs on a shared machine hits every variant alike. Each
round, after one warm-up round outside the clock:
- ``1 process``: rank 0 alone runs rank_unlabeled(..., distributed=False) on the whole pool
  with ``--threads`` threads while the other ranks wait at a barrier;
- ``1 process, W x threads`` (with ``--with-threads``): the same, given the threads the W
  ranks use together;
- ``W ranks``: all ranks run rank_unlabeled (sharded); the time of the slowest rank.
Every run uses the same backend chunk size (``--chunk-size``, default 64): the engine's own
choice grows with the pool, and on CPU larger chunks cost more per sample, which would credit
the smaller per-rank pools with a speed-up that is not the sharding's.
Wall-clock seconds and CPU seconds (time.process_time, per process) are recorded; the CPU
seconds show how the work splits even when other jobs steal the cores.
Then the exchanges alone, for synthetic pools of 10^4..10^6 scores: the status exchange,
gather_top_k (what rank_unlabeled sends, local top-k included) and gather_scores (score_pool).

Prints a markdown report (also written to ``--out`` if given) with the command that made it.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from gradnorm_engine import rank_unlabeled
from gradnorm_engine.distributed.exchange import (RankStatus, ScoredBlock, control_group, exchange_status,
                                                  gather_scores, gather_top_k)
from gradnorm_engine.al.models import cifar_resnet18, small_cnn

MODELS = {
    "resnet18-w8": lambda: cifar_resnet18(num_classes=10, in_channels=3, width=8),
    "small-cnn": lambda: small_cnn(num_classes=10, in_channels=3, width=16),
}
EXCHANGE_POOLS = (10_000, 100_000, 1_000_000)


def make_pool(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (N, 3, 32, 32)


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name]()


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_rounds(args: argparse.Namespace) -> dict:
    """Interleaved rounds of the three variants; per variant a list of (wall, cpu) per round."""
    rank, world = dist.get_rank(), dist.get_world_size()
    group = control_group()
    model, pool = make_model(args.model), make_pool(args.pool)
    loader = DataLoader(TensorDataset(pool), batch_size=args.batch_size)
    options = {"k": args.k, "progress": False, "chunk_size": args.chunk_size or None}

    def alone(threads: int):
        torch.set_num_threads(threads)
        try:
            return timed(lambda: rank_unlabeled(model, loader, **options, distributed=False))
        finally:
            torch.set_num_threads(args.threads)

    def variants():
        dist.barrier(group=group)
        single = alone(args.threads) if rank == 0 else (0.0, 0.0)
        dist.barrier(group=group)
        wide = alone(args.threads * world) if rank == 0 and args.with_threads else (0.0, 0.0)
        dist.barrier(group=group)
        sharded = timed(lambda: rank_unlabeled(model, loader, **options))
        return {"single": single, "wide": wide, "sharded": sharded}

    variants()  # warm-up round
    rounds = [variants() for _ in range(args.repeats)]
    return {name: [r[name] for r in rounds] for name in rounds[0]}


def time_exchanges(k: int, repeats: int) -> dict:
    """Seconds per exchange for synthetic pools; ranks hold equal blocks of random scores."""
    group = control_group()
    world, out = dist.get_world_size(), {}
    for n in EXCHANGE_POOLS:
        count = n // world
        scores = torch.rand(count, generator=torch.Generator().manual_seed(dist.get_rank()))
        status = RankStatus(ok=True, count=count, backend="bench", dtype=str(scores.dtype))
        block = ScoredBlock(scores=scores, statuses=exchange_status(status, group), group=group,
                            dtype=scores.dtype, backend="bench")
        runs = {"status": lambda: exchange_status(status, group), "top_k": lambda: gather_top_k(block, k),
                "scores": lambda: gather_scores(block)}
        for what, fn in runs.items():
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                dist.barrier(group=group)
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            out[(n, what)] = times
    return out


def rank_worker(rank: int, world: int, port: int, args: argparse.Namespace, outdir: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rounds = time_rounds(args)
    exchanges = time_exchanges(args.k, max(args.repeats, 5))
    torch.save({"rounds": rounds, "exchanges": exchanges}, Path(outdir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(rank_worker, args=(args.world, free_port(), args, outdir), nprocs=args.world)
        return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(args.world)]


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", type=int, default=1024, help="pool size N (3x32x32 random images)")
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet18-w8")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64,
                        help="samples per backend chunk, the same for every run (0: the engine's own choice, "
                             "which depends on the pool size and so differs between 1 and W ranks)")
    parser.add_argument("--world", type=int, default=2, help="ranks for the sharded run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--with-threads", action="store_true",
                        help="also time one process with W x --threads threads (slow on an oversubscribed machine)")
    parser.add_argument("--out", help="also write the markdown report here")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    ranks = run_ranks(args)
    load_after = os.getloadavg()[0]
    w = args.world
    single_wall = [wall for wall, _ in ranks[0]["rounds"]["single"]]
    base = statistics.median(single_wall)

    def row(label: str, layout: str, name: str, sharded: bool) -> str:
        per_round = zip(*(r["rounds"][name] for r in ranks)) if sharded else ((x,) for x in ranks[0]["rounds"][name])
        walls, cpus = [], []
        for results in per_round:
            walls.append(max(wall for wall, _ in results))
            cpus.append(max(cpu for _, cpu in results))
        return (f"| {label} | {layout} | {summary(walls)} | {base / statistics.median(walls):.2f} | "
                f"{summary(cpus)} |")

    lines = [
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, 1-minute load average {load_before:.1f} "
        f"before and {load_after:.1f} after (other jobs share the CPUs), torch "
        f"{torch.__version__}, Python {platform.python_version()}. Pool: {args.pool} random 3x32x32 images, "
        f"model {args.model}, k = {args.k}, loader batch {args.batch_size}, chunk size "
        f"{args.chunk_size or 'auto'}. {args.repeats} interleaved rounds "
        "after one warm-up round; median (min-max) over rounds.",
        "",
        "| run | processes x threads | wall s | speed-up (wall) | CPU s of the busiest process |",
        "|---|---|---|---|---|",
        row("1 process", f"1 x {args.threads}", "single", False),
        *([row("1 process, more threads", f"1 x {args.threads * w}", "wide", False)] if args.with_threads else []),
        row(f"{w} ranks, gloo", f"{w} x {args.threads}", "sharded", True),
        "",
        f"Exchanges alone on {w} gloo ranks over 127.0.0.1 (median of the slowest rank, milliseconds):",
        "",
        f"| pool N | status | local top-k + merge (k = {args.k}) | all N scores (score_pool) |",
        "|---|---|---|---|",
    ]
    for n in EXCHANGE_POOLS:
        cells = []
        for what in ("status", "top_k", "scores"):
            runs = len(ranks[0]["exchanges"][(n, what)])
            per_run = [max(r["exchanges"][(n, what)][i] for r in ranks) for i in range(runs)]
            cells.append(f"{1e3 * statistics.median(per_run):.2f}")
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
