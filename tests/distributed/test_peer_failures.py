"""A peer rank that dies or exits: what the others raise, how fast, and that each rank keeps its exit code.

Two gloo ranks on CPU, spawned per scenario (the scenarios end a process, so they cannot share one
spawn with tests/distributed/test_sharded_scoring.py).
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gradnorm_engine import score_pool

TIMEOUT_S = 60        # GRADNORM_DISTRIBUTED_TIMEOUT in the ranks: far above what a dead peer should cost
SHORT_TIMEOUT_S = 3   # where the peer never arrives: the wait is the limit
EXIT_CODE = 7         # rank 0 exits with this after recording what it raised
DEADLINE_S = 120


class DiesOnRank1(Dataset):
    """Rank 1's process ends (as if killed) when it reads its first sample."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        if dist.get_rank() == 1:
            os._exit(3)
        return torch.full((6,), float(i))


def worker(rank: int, port: int, outdir: str, scenario: str) -> None:
    torch.set_num_threads(1)
    os.environ["GRADNORM_DISTRIBUTED_TIMEOUT"] = str(SHORT_TIMEOUT_S if scenario == "exits" else TIMEOUT_S)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if scenario == "exits" and rank == 1:
        return   # a rank that ends cleanly without making the call its peer makes
    model = nn.Linear(6, 3)
    if scenario == "dies":   # the engine's group exists already: the peer dies in the second call
        score_pool(model, DataLoader(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)), batch_size=4),
                   progress=False)
    start = time.monotonic()
    try:
        score_pool(model, DataLoader(DiesOnRank1(), batch_size=4), progress=False)
        got = ("no error",)
    except Exception as err:  # noqa: BLE001 - recorded for the test
        got = (type(err).__name__, str(err))
    torch.save({"raised": got, "seconds": time.monotonic() - start}, Path(outdir) / f"rank{rank}.pt")
    sys.exit(EXIT_CODE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(scenario: str, outdir: Path) -> tuple[dict, list]:
    ctx = mp.start_processes(worker, args=(free_port(), str(outdir), scenario), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    for p in ctx.processes:
        p.join(max(1.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in ctx.processes]
    for p in ctx.processes:
        if p.exitcode is None:
            p.kill()
    if None in codes:
        pytest.fail(f"the ranks did not finish in {DEADLINE_S} s (a hang): exit codes {codes}")
    if not (outdir / "rank0.pt").exists():
        pytest.fail(f"rank 0 ended before recording what it raised: exit codes {codes}")
    return torch.load(outdir / "rank0.pt", weights_only=False), codes


def test_a_dead_peer_is_reported_at_once_as_what_it_is_and_the_rank_keeps_its_exit_code(tmp_path):
    """It read 'after waiting up to 1800 s' though it came in seconds; the rank sometimes ended with
    SIGABRT (gloo's threads at exit) instead of its own exit code."""
    result, codes = run("dies", tmp_path)
    name, message = result["raised"]
    assert name == "DistributedScoringError", result
    assert result["seconds"] < 20
    assert "a peer rank closed its connection" in message and "died" in message, message
    assert f"waiting up to {TIMEOUT_S}" not in message and "\n" not in message, message
    assert codes == [EXIT_CODE, 3]


def test_a_peer_that_exits_without_the_call_is_named_after_the_limit_not_a_raw_store_error(tmp_path):
    """A raw DistStoreError ('wait timeout after 3000ms, keys: /default_pg/...') before."""
    result, codes = run("exits", tmp_path)
    name, message = result["raised"]
    assert name == "DistributedScoringError", result
    assert f"gave up after {SHORT_TIMEOUT_S} s" in message and "exited without making this call" in message, message
    assert "GRADNORM_DISTRIBUTED_TIMEOUT" in message and "\n" not in message, message
    assert codes == [EXIT_CODE, 0]
