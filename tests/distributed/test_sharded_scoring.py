"""Sharded scoring under torch.distributed: gloo on CPU, 2 and 3 processes spawned by the test.

Each spawn runs every check once per rank (process start-up is the cost, not the checks); the
ranks save what each call returned or raised, and the tests below compare that with the
single-process answer computed here, in the parent, where no process group exists.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, TensorDataset

from gradnorm_engine import per_parameter_sqnorms, rank_unlabeled, score_pool, top_k
from gradnorm_engine.distributed import (DistributedScoringError, broadcast_module, is_main_process, loader_order,
                                         shard_bounds, shard_loader, use_sharding)
from gradnorm_engine.ranking import merge_top_k
from tests.token_models import MaskedBag, PaddedMean, TokenPool, bucketed_batches, pad_collate

N = 23           # pool size, divisible by neither 2 nor 3
K = 15           # more than one rank's block (12 of 23 on 2 ranks, 8 on 3)
FAIL_AT = 17     # the failing dataset raises at this position (rank 1's block on 2 ranks, rank 2's on 3)
SPAWN_DEADLINE_S = 120


# --- the pool, model and datasets (module level: spawned processes import them) ---------------

def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5))


def make_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 6, generator=g)
    # Equal samples in different ranks' blocks: equal scores, so the tie rule is exercised.
    x[15] = x[3]
    x[20] = x[3]
    return x


def pool_loader(batch_size: int = 4, **kw) -> DataLoader:
    x = make_inputs()
    return DataLoader(TensorDataset(x, torch.zeros(N, dtype=torch.long)), batch_size=batch_size, **kw)


class RecordingDataset(Dataset):
    """Remembers which positions this process read (loader with num_workers=0)."""

    def __init__(self, x: torch.Tensor):
        self.x, self.read = x, []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.x[i]


class FailingDataset(Dataset):
    def __init__(self, x: torch.Tensor, bad: int):
        self.x, self.bad = x, bad

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.bad:
            raise OSError(f"cannot decode sample {i}")
        return self.x[i]


class StalledDataset(Dataset):
    """Rank ``stalled_rank`` stops answering until ``release`` exists: a rank that hangs."""

    def __init__(self, x: torch.Tensor, stalled_rank: int, release: Path):
        self.x, self.stalled_rank, self.release = x, stalled_rank, release

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        deadline = time.monotonic() + 60
        while dist.get_rank() == self.stalled_rank and not self.release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.x[i]


class FileList(Dataset):
    """An image-folder-like pool: ``samples`` lists (path, label) as torchvision's ImageFolder does."""

    def __init__(self, root: str, order: list[int]):
        self.x = make_inputs()
        self.samples = [(f"{root}/class{i % 2}/img{i:02d}.png", i % 2) for i in order]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.x[int(self.samples[i][0][-6:-4])]


def file_list_loader(root: str, order: list[int]) -> DataLoader:
    return DataLoader(FileList(root, order), batch_size=4)


class Stream(IterableDataset):
    def __iter__(self):
        return iter(make_inputs())


def prebatched_loader() -> DataLoader:
    """batch_size=None: each dataset item is already a batch of 3 samples (24 in all)."""
    g = torch.Generator().manual_seed(2)
    return DataLoader(list(torch.randn(8, 3, 6, generator=g)), batch_size=None)


def reordered_loader() -> DataLoader:
    """A custom sequential order over part of the dataset: pool position p = p-th index read."""
    order = list(range(N - 1, -1, -2)) + [4, 0, 2]
    return DataLoader(TensorDataset(make_inputs()), batch_size=3, sampler=order)


def batch_sampler_loader() -> DataLoader:
    batches = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12, 13], list(range(14, N))]
    return DataLoader(TensorDataset(make_inputs()), batch_sampler=batches)


def token_model() -> nn.Module:
    torch.manual_seed(0)
    return MaskedBag()


def token_loader() -> DataLoader:
    return DataLoader(TokenPool(n=N), batch_size=4, collate_fn=pad_collate)


def padded_mean_model() -> nn.Module:
    torch.manual_seed(0)
    return PaddedMean()


def padded_loader(batch_size: int = 5) -> DataLoader:
    """Batches padded to their longest sample, of a size that no rank's block start is a multiple of."""
    return DataLoader(TokenPool(n=N), batch_size=batch_size, collate_fn=pad_collate)


def bucketed_loader() -> DataLoader:
    """A length-bucketing batch sampler with the padding collate: each batch padded to its own longest."""
    pool = TokenPool(n=N)
    return DataLoader(pool, batch_sampler=bucketed_batches(pool), collate_fn=pad_collate)


def rank_tuple(res) -> tuple:
    return res.indices, res.scores, res.pool_size, res.backend, res.norm


# --- what every rank runs --------------------------------------------------------------------

def replica_with_drift() -> nn.Module:
    """The same small model on every rank, its weights and running stats shifted by the rank."""
    torch.manual_seed(0)
    replica = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    shift = dist.get_rank() if dist.is_initialized() else 0
    with torch.no_grad():
        for t in [*replica.parameters(), *replica.buffers()]:
            t.add_(shift)
    return replica


def broadcast_from_rank0() -> dict:
    replica = replica_with_drift()
    broadcast_module(replica)
    return replica.state_dict()


def toy_al_dataset():
    from gradnorm_engine.al.datasets import ALDataset, ImageTensors

    g = torch.Generator().manual_seed(0)

    def split(n):
        return ImageTensors(torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8),
                            torch.randint(0, 3, (n,), generator=g), torch.tensor([0.5]), torch.tensor([0.25]))
    return ALDataset("toy", split(61), split(20), ["a", "b", "c"])


def toy_al_model(data, preset):
    from gradnorm_engine.al.models import small_cnn

    return small_cnn(num_classes=3, in_channels=1, width=4)


def run_al_loop(out: str, cycles: int = 2, resume: bool = False) -> list:
    """``cycles`` cycles of the active-learning loop with Ent-GradNorm queries; the picked indices."""
    from gradnorm_engine.al.loop import ALConfig, run_active_learning
    from gradnorm_engine.al.presets import Preset

    preset = Preset(initial=10, budget=7, subset=31, cycles=cycles, trials=1, epochs=2, lr=0.05, milestones=(9,),
                    batch_size=8)
    config = ALConfig(dataset="toy", strategies=["ent-gradnorm"], preset=preset, out=out, device="cpu",
                      progress=False, resume=resume)
    records = run_active_learning(config, data=toy_al_dataset(), model_factory=toy_al_model, log=None)
    return [r["queried"] for r in records]


def al_two_then_three_cycles(out: str) -> tuple:
    """Two cycles, then resumed to three; the picks of each run."""
    return run_al_loop(out, cycles=2), run_al_loop(out, cycles=3, resume=True)


def al_under_torchrun(outdir: str) -> dict:
    """The loop on every rank. Rank 0's folder is the run's; the other ranks are handed a path that
    does not exist (as on another node): the loop must neither write there nor need to read it,
    also when it resumes. Then a fresh run into rank 0's used folder: a mistake found by rank 0."""
    rank = dist.get_rank()
    out = Path(outdir) / ("al" if rank == 0 else f"al-rank{rank}-never-created")
    first, resumed = al_two_then_three_cycles(str(out))
    try:
        run_al_loop(str(out))
        again = "no error"
    except Exception as err:
        again = type(err).__name__
    lines = (out / "results.jsonl").read_text().splitlines() if rank == 0 else None
    return {"first": first, "resumed": resumed, "folder_exists": out.exists(), "result_lines": lines,
            "run_into_used_folder": again}


def squared_logits(logits: torch.Tensor) -> torch.Tensor:
    """A score whose gradient is exactly 0 where the logits are: 0 for a zero input and a zero bias."""
    return logits.pow(2).sum(dim=1)


def zero_score_warnings() -> tuple:
    """ZeroScoreWarnings (score_pool, rank_unlabeled) for a pool whose first half scores exactly 0
    (one rank's whole block: no warning, the pool's ranking is not its order) and for a pool that
    scores 0 throughout (every rank warns, once per call)."""
    import warnings

    from gradnorm_engine.errors import ZeroScoreWarning
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    nn.init.zeros_(lin.bias)
    half = torch.randn(12, 4)
    half[:6] = 0
    counts = []
    for x in (half, torch.zeros(12, 4)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            score_pool(lin, x, score=squared_logits, progress=False)
            rank_unlabeled(lin, x, 2, score=squared_logits, progress=False)
        counts.append(sum(issubclass(w.category, ZeroScoreWarning) for w in record))
    return tuple(counts)


def failure_details(model: nn.Module) -> tuple:
    """(ranks in .failures, the chained cause's type or None) of a call where one rank fails."""
    try:
        score_pool(model, DataLoader(FailingDataset(make_inputs(), FAIL_AT), batch_size=4), progress=False)
    except DistributedScoringError as err:
        return sorted(err.failures), type(err.__cause__).__name__ if err.__cause__ else None
    return ("no error",)


def run_checks(outdir: str) -> dict:
    """Call the API many ways; record each return value or raised (type, message)."""
    model = make_model()
    recording = RecordingDataset(make_inputs())
    checks = {
        "score_pool": lambda: score_pool(model, pool_loader(), progress=False),
        "score_pool_tensor_sum": lambda: score_pool(model, pool_loader(batch_size=5), norm="tensor_sum",
                                                    backend="loop", progress=False),
        "rank_k": lambda: rank_tuple(rank_unlabeled(model, pool_loader(), K, progress=False)),
        "rank_all": lambda: rank_tuple(rank_unlabeled(model, pool_loader(), N, progress=False)),
        "rank_1": lambda: rank_tuple(rank_unlabeled(model, pool_loader(), 1, progress=False)),
        "rank_ddp": lambda: rank_tuple(rank_unlabeled(nn.parallel.DistributedDataParallel(model),
                                                      pool_loader(), K, progress=False)),
        "rank_reordered": lambda: rank_tuple(rank_unlabeled(model, reordered_loader(), 7, progress=False)),
        "score_batch_sampler": lambda: score_pool(model, batch_sampler_loader(), progress=False),
        "score_prebatched": lambda: score_pool(model, prebatched_loader(), progress=False),
        # a Dataset given as the pool: read in order in the engine's batches, sharded like a DataLoader
        "dataset_pool": lambda: score_pool(model, pool_loader().dataset, progress=False),
        "score_reads": lambda: (score_pool(model, DataLoader(recording, batch_size=4), progress=False),
                                sorted(recording.read)),
        "opt_out": lambda: (score_pool(model, DataLoader(recording, batch_size=4), progress=False,
                                       distributed=False), rank_tuple(rank_unlabeled(
                                           model, pool_loader(), K, progress=False, distributed=False))),
        "failing_rank": lambda: score_pool(model, DataLoader(FailingDataset(make_inputs(), FAIL_AT), batch_size=4),
                                           progress=False),
        "failing_rank_topk": lambda: rank_unlabeled(
            model, DataLoader(FailingDataset(make_inputs(), FAIL_AT), batch_size=4), 3, progress=False),
        "failure_details": lambda: failure_details(model),
        "zero_score_warnings": zero_score_warnings,
        "after_failure": lambda: score_pool(model, pool_loader(), progress=False),
        "tiny_pool": lambda: (score_pool(model, DataLoader(make_inputs()[:2], batch_size=4), chunk_size=1,
                                         progress=False),
                              rank_tuple(rank_unlabeled(model, DataLoader(make_inputs()[:2]), 2, chunk_size=1,
                                                        progress=False))),
        "k_too_large": lambda: rank_unlabeled(model, pool_loader(), N + 1, progress=False),
        "iterable": lambda: score_pool(model, DataLoader(Stream(), batch_size=4), progress=False),
        "shuffled": lambda: score_pool(model, pool_loader(shuffle=True), progress=False),
        "orders_differ": lambda: score_pool(model, pool_loader(sampler=torch.randperm(
            N, generator=torch.Generator().manual_seed(dist.get_rank())).tolist()), progress=False),
        # the same length and order, other content: a tensor shifted on ranks > 0, files listed in another order
        "contents_differ": lambda: score_pool(model, DataLoader(TensorDataset(make_inputs() + (dist.get_rank() > 0)),
                                                                batch_size=4), progress=False),
        "listing_differs": lambda: score_pool(model, file_list_loader(
            "/data/pool", list(range(N))[::-1 if dist.get_rank() else 1]), progress=False),
        # the same files mounted at another place on every node: the same pool
        "roots_differ": lambda: score_pool(model, file_list_loader(f"/mnt/node{dist.get_rank()}/pool",
                                                                   list(range(N))), progress=False),
        "norm_differs": lambda: score_pool(model, pool_loader(), norm="tensor_sum" if dist.get_rank() else "frobenius",
                                           progress=False),
        "broadcast": broadcast_from_rank0,
        "main_process": is_main_process,
        "al_loop": lambda: al_under_torchrun(outdir),
        # a mistake on one rank only: every rank raises, and the next call is not out of step
        "one_rank_refused": lambda: score_pool(model, pool_loader(drop_last=dist.get_rank() == 1), progress=False),
        "after_refusal": lambda: score_pool(model, pool_loader(), progress=False),
        "k_differs": lambda: rank_unlabeled(model, pool_loader(), 3 + dist.get_rank(), progress=False),
        "k_bad_on_one_rank": lambda: rank_unlabeled(model, pool_loader(), 0 if dist.get_rank() else 3, progress=False),
        # with a chunk size, blocks start at its multiples: a single process's chunks exactly
        "aligned_chunks": lambda: score_pool(model, pool_loader(), chunk_size=5, progress=False),
        "multi_input": lambda: rank_tuple(rank_unlabeled(token_model(), token_loader(), 6, chunk_size=2,
                                                         progress=False)),
        "per_parameter": lambda: per_parameter_sqnorms(model, pool_loader(), group="module", chunk_size=5,
                                                       progress=False),
        # a model that reads its padding: every rank must batch its samples as one process does
        "padding_read": lambda: score_pool(padded_mean_model(), padded_loader(), chunk_size=1, progress=False),
        "padding_bucketed": lambda: score_pool(padded_mean_model(), bucketed_loader(), chunk_size=1,
                                               progress=False),
        "main_unpicklable": main_process_unpicklable,
        "bad_backend": lambda: score_pool(model, pool_loader(), backend="nope", progress=False),
    }
    results = {}
    for name, call in checks.items():
        try:
            results[name] = call()
        except Exception as err:
            results[name] = ("raised", type(err).__name__, str(err))
    return results


def main_process_unpicklable() -> tuple:
    """on_main_process whose result cannot travel: every rank raises at once, none waits."""
    from gradnorm_engine.distributed import on_main_process

    start = time.monotonic()
    try:
        on_main_process(lambda: (lambda: 1))   # a lambda does not pickle
        return ("no error",)
    except Exception as err:
        return type(err).__name__, time.monotonic() - start


def run_stall(outdir: str) -> dict:
    """Rank 1 hangs until rank 0 has given up: every rank must raise, none may hang.

    Runs last: after a timeout the ranks no longer agree on where they are.
    """
    os.environ["GRADNORM_DISTRIBUTED_TIMEOUT"] = "1"
    release = Path(outdir) / "rank0-gave-up"
    loader = DataLoader(StalledDataset(make_inputs(), stalled_rank=1, release=release), batch_size=4)
    start = time.monotonic()
    try:
        out = score_pool(make_model(), loader, progress=False)
    except Exception as err:
        out = ("raised", type(err).__name__, str(err))
    seconds = time.monotonic() - start
    if dist.get_rank() == 0:
        release.touch()
    return {"stall": out, "seconds": seconds}


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = run_checks(outdir) | run_stall(outdir)
    torch.save(results, Path(outdir) / f"rank{rank}.pt")
    # No destroy_process_group(): after the stall check the peers may be gone already.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, outdir: Path) -> list[dict]:
    """Run every check on ``world`` gloo ranks; every rank's results, in rank order."""
    ctx = mp.start_processes(worker, args=(world, free_port(), str(outdir)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish in {SPAWN_DEADLINE_S} s (a hang)")
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


# --- single-process references (computed here, no process group) ------------------------------

@pytest.fixture(scope="module")
def reference() -> dict:
    model = make_model()
    return {
        "score_pool": score_pool(model, pool_loader(), progress=False),
        "score_pool_tensor_sum": score_pool(model, pool_loader(batch_size=5), norm="tensor_sum", backend="loop",
                                            progress=False),
        "rank_k": rank_tuple(rank_unlabeled(model, pool_loader(), K, progress=False)),
        "rank_all": rank_tuple(rank_unlabeled(model, pool_loader(), N, progress=False)),
        "rank_1": rank_tuple(rank_unlabeled(model, pool_loader(), 1, progress=False)),
        "rank_reordered": rank_tuple(rank_unlabeled(model, reordered_loader(), 7, progress=False)),
        "score_batch_sampler": score_pool(model, batch_sampler_loader(), progress=False),
        "score_prebatched": score_pool(model, prebatched_loader(), progress=False),
        "dataset_pool": score_pool(model, pool_loader(), progress=False),
        "roots_differ": score_pool(model, file_list_loader("/data/pool", list(range(N))), progress=False),
        "aligned_chunks": score_pool(model, pool_loader(), chunk_size=5, progress=False),
        "multi_input": score_pool(token_model(), token_loader(), chunk_size=2, progress=False),
        "per_parameter": per_parameter_sqnorms(model, pool_loader(), group="module", chunk_size=5, progress=False),
        "padding_read": score_pool(padded_mean_model(), padded_loader(), chunk_size=1, progress=False),
        "padding_bucketed": score_pool(padded_mean_model(), bucketed_loader(), chunk_size=1, progress=False),
        "tiny_pool": (score_pool(model, DataLoader(make_inputs()[:2], batch_size=4), chunk_size=1, progress=False),
                      rank_tuple(rank_unlabeled(model, DataLoader(make_inputs()[:2]), 2, chunk_size=1,
                                                progress=False))),
    }


@pytest.fixture(scope="module")
def al_reference(tmp_path_factory) -> list:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: the same float reductions in training
    try:
        return al_two_then_three_cycles(str(tmp_path_factory.mktemp("al-single") / "run"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory) -> list[dict]:
    return spawn(request.param, tmp_path_factory.mktemp(f"world{request.param}"))


def assert_same(got, want, what: str) -> None:
    """Exact equality, recursing into tuples; tensors must match in dtype and every bit."""
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), f"{what}: got {got!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{what}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{what}: got {got!r}"
        assert got.dtype == want.dtype and torch.equal(got, want), f"{what}: {got} != {want}"
    else:
        assert got == want, f"{what}: {got!r} != {want!r}"


# --- across ranks ------------------------------------------------------------------------------

@pytest.mark.parametrize("check", ["score_pool", "score_pool_tensor_sum", "rank_k", "rank_all", "rank_1",
                                   "rank_reordered", "score_batch_sampler", "score_prebatched", "tiny_pool",
                                   "aligned_chunks", "per_parameter", "dataset_pool", "roots_differ"])
def test_every_rank_returns_the_single_process_answer(ranks, reference, check):
    for r, results in enumerate(ranks):
        assert_same(results[check], reference[check], f"rank {r} of {len(ranks)}, {check}")


def test_a_padded_pool_of_several_inputs_is_ranked_as_on_one_process(ranks, reference):
    """Mapping batches (ids + mask) padded per batch: every rank reads whole batches of the loader, so
    the padding is one process's; the chunks may differ (a chunk ends where shapes change), so the
    scores agree to rounding, the ranking exactly."""
    want = reference["multi_input"]
    order = torch.argsort(want, descending=True, stable=True)[:6]
    for r, results in enumerate(ranks):
        indices, scores, pool_size, _, _ = results["multi_input"]
        assert pool_size == want.numel() and torch.equal(indices, order), f"rank {r}"
        torch.testing.assert_close(scores, want[order], rtol=1e-5, atol=0)


@pytest.mark.parametrize("check", ["padding_read", "padding_bucketed"])
def test_a_model_reading_its_padding_scores_as_on_one_process(ranks, reference, check):
    """A collate that pads each batch to its longest sample: a sample's inputs depend on its batch, so
    every rank must read whole batches of the single-process loader (plain or a custom batch sampler),
    not re-batch its block from wherever the block starts."""
    want = reference[check]
    for r, results in enumerate(ranks):
        assert_same(results[check], want, f"rank {r} of {len(ranks)}, {check}")


def test_ties_across_blocks_break_by_lower_position(ranks, reference):
    scores = reference["score_pool"]
    assert (scores == scores[3]).nonzero().flatten().tolist() == [3, 15, 20]  # equal samples, three blocks
    order = reference["rank_all"][0].tolist()
    assert [i for i in order if i in (3, 15, 20)] == [3, 15, 20]
    for results in ranks:
        assert_same(results["rank_all"], reference["rank_all"], "full ranking")


def test_broadcast_gives_every_rank_rank0s_weights_and_buffers(ranks):
    want = replica_with_drift().state_dict()   # rank 0's replica: no drift (built here, no group)
    for r, results in enumerate(ranks):
        got = results["broadcast"]
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), f"rank {r}: {name}"
    assert [results["main_process"] for results in ranks] == [True] + [False] * (len(ranks) - 1)


def test_ddp_wrapped_model_scores_its_module(ranks, reference):
    for results in ranks:
        assert_same(results["rank_ddp"], reference["rank_k"], "DDP-wrapped model")


def test_each_rank_reads_only_its_own_block(ranks, reference):
    world = len(ranks)
    blocks = [results["score_reads"][1] for results in ranks]
    assert blocks == [list(range(*shard_bounds(N, r, world))) for r in range(world)]
    assert sorted(i for b in blocks for i in b) == list(range(N))  # none twice, none skipped
    for results in ranks:
        assert_same(results["score_reads"][0], reference["score_pool"], "scores of the recorded pool")


def test_distributed_false_scores_the_whole_pool_on_every_rank(ranks, reference):
    for results in ranks:
        scores, ranked = results["opt_out"]
        assert_same(scores, reference["score_pool"], "opt-out scores")
        assert_same(ranked, reference["rank_k"], "opt-out ranking")


def test_the_zero_score_warning_is_decided_on_the_whole_pool_on_every_rank(ranks):
    """A rank whose block scores 0 while others do not warned alone that the ranking was the pool
    order; now no rank warns then, and every rank warns once per call when the whole pool is 0."""
    for r, results in enumerate(ranks):
        assert results["zero_score_warnings"] == (0, 2), f"rank {r} of {len(ranks)}"


@pytest.mark.parametrize("check", ["failing_rank", "failing_rank_topk"])
def test_a_failing_rank_makes_every_rank_raise_its_message(ranks, check):
    world = len(ranks)
    culprit = next(r for r in range(world) if FAIL_AT in range(*shard_bounds(N, r, world)))
    for r, results in enumerate(ranks):
        kind, name, message = results[check]
        assert (kind, name) == ("raised", "DistributedScoringError"), f"rank {r}: {results[check]}"
        assert f"1 of {world} ranks: rank {culprit}: OSError: cannot decode sample {FAIL_AT}" in message


def test_the_al_loop_under_torchrun_picks_as_one_process_and_rank0_alone_touches_files(ranks, al_reference):
    first, resumed = al_reference
    assert len(first) == 2 and len(resumed) == 3 and resumed[:2] == first
    for r, results in enumerate(ranks):
        got = results["al_loop"]
        assert isinstance(got, dict), f"rank {r} of {len(ranks)}: {got}"
        assert got["first"] == first and got["resumed"] == resumed, f"rank {r} of {len(ranks)}"
        assert got["folder_exists"] == (r == 0), f"rank {r} of {len(ranks)}"
        # rank 0's own check of its folder stops every rank, none is left waiting
        assert got["run_into_used_folder"] == "UsageError", f"rank {r} of {len(ranks)}"
    assert len(ranks[0]["al_loop"]["result_lines"]) == 3


def test_a_mistake_on_one_rank_stops_every_rank_and_the_next_call_is_in_step(ranks, reference):
    for r, results in enumerate(ranks):
        got = results["one_rank_refused"]
        if r == 1:
            assert got[:2] == ("raised", "ValueError") and "drop_last" in got[2]
        else:
            assert got[:2] == ("raised", "DistributedScoringError") and "rank 1: ValueError" in got[2], got
        assert_same(results["after_refusal"], reference["score_pool"], f"rank {r}: the call after")


def test_ranks_asking_for_different_k_are_refused_on_every_rank(ranks):
    for r, results in enumerate(ranks):
        got = results["k_differs"]
        assert got[:2] == ("raised", "ValueError") and "k=3" in got[2] and "k=4" in got[2], got
        bad = results["k_bad_on_one_rank"]
        assert bad[:2] == (("raised", "ValueError") if r else ("raised", "DistributedScoringError")), bad


def test_a_bad_backend_name_is_the_single_process_error_on_every_rank(ranks):
    for results in ranks:
        got = results["bad_backend"]
        assert got[:2] == ("raised", "ValueError") and "unknown backend 'nope'" in got[2], got


def test_a_main_process_result_that_cannot_travel_raises_everywhere_at_once(ranks):
    for results in ranks:
        name, seconds = results["main_unpicklable"]
        assert name != "no error" and seconds < 10


def test_the_failing_rank_chains_its_original_exception(ranks):
    world = len(ranks)
    culprit = next(r for r in range(world) if FAIL_AT in range(*shard_bounds(N, r, world)))
    for r, results in enumerate(ranks):
        assert results["failure_details"] == ([culprit], "OSError" if r == culprit else None)


def test_the_group_still_works_after_a_failure(ranks, reference):
    for results in ranks:
        assert_same(results["after_failure"], reference["score_pool"], "scores after a failed call")


@pytest.mark.parametrize("check, error, words", [
    ("k_too_large", "ValueError", f"larger than the pool ({N} samples)"),
    ("iterable", "TypeError", "distributed=False"),
    ("shuffled", "ValueError", "shuffle=False"),
    ("orders_differ", "ValueError", "the ranks read different pools"),
    ("contents_differ", "ValueError", "the ranks read different pools"),
    ("listing_differs", "ValueError", "the ranks read different pools"),
    ("norm_differs", "ValueError", "call with different options"),
])
def test_user_errors_raise_the_same_on_every_rank(ranks, check, error, words):
    for results in ranks:
        assert results[check][:2] == ("raised", error)
        assert words in results[check][2]


def test_ranks_with_different_norms_are_refused_naming_both(ranks):
    for results in ranks:
        got = results["norm_differs"]
        assert got[:2] == ("raised", "ValueError") and "norm=frobenius" in got[2] and "norm=tensor_sum" in got[2], got


def test_a_stalled_rank_times_out_instead_of_hanging(ranks):
    for r, results in enumerate(ranks):
        assert results["stall"][:2] == ("raised", "DistributedScoringError"), f"rank {r}: {results['stall']}"
    assert "GRADNORM_DISTRIBUTED_TIMEOUT" in ranks[0]["stall"][2]
    assert ranks[0]["seconds"] < 30  # rank 0 gave up after its 1 s timeout, not torch's default 30 min


# --- the pieces, in this process ---------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 23, 24])
def test_shard_bounds_cover_the_pool_in_order(n, world):
    blocks = [shard_bounds(n, r, world) for r in range(world)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))  # contiguous, in rank order
    sizes = [stop - start for start, stop in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_merge_of_per_rank_top_k_equals_top_k_of_the_pool():
    g = torch.Generator().manual_seed(3)
    for trial in range(50):
        n = int(torch.randint(1, 40, (1,), generator=g))
        scores = torch.randint(0, 6, (n,), generator=g).float()  # many ties
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        world = int(torch.randint(1, 6, (1,), generator=g))
        parts_s, parts_p = [], []
        for r in range(world):
            start, stop = shard_bounds(n, r, world)
            local = top_k(scores[start:stop], min(k, stop - start)) if stop > start else None
            parts_s.append(local.scores if local else scores[:0])
            parts_p.append(local.indices + start if local else torch.zeros(0, dtype=torch.long))
        merged_s, merged_p = merge_top_k(parts_s, parts_p, k)
        want = top_k(scores, k)
        assert torch.equal(merged_p, want.indices) and torch.equal(merged_s, want.scores), trial


def test_shard_loader_keeps_the_loader_settings():
    def collate(batch):
        return torch.stack([b[0] for b in batch]) * 2

    loader = pool_loader(batch_size=5, collate_fn=collate, num_workers=2, prefetch_factor=3, pin_memory=False,
                         persistent_workers=True, timeout=7)
    block, start, stop = shard_loader(loader, 1, 3)
    assert (start, stop) == (8, 16)
    assert list(block.sampler) == list(range(8, 16))
    assert (block.batch_size, block.collate_fn, block.num_workers, block.prefetch_factor, block.timeout,
            block.persistent_workers, block.dataset) == (5, collate, 2, 3, 7, True, loader.dataset)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 30])
@pytest.mark.parametrize("make", [padded_loader, bucketed_loader])
def test_whole_batch_blocks_are_the_loaders_batches_in_order(make, world):
    loader = make()
    want = [list(b) for b in loader.batch_sampler]
    got, stop = [], 0
    for rank in range(world):
        block, start, end = shard_loader(loader, rank, world, whole_batches=True)
        batches = [list(b) for b in block.batch_sampler]
        assert start == stop and end - start == sum(map(len, batches)), (rank, start, end)
        got += batches
        stop = end
    assert got == want and stop == N


def test_shard_loader_follows_custom_orders():
    assert list(loader_order(reordered_loader())) == reordered_loader().sampler
    assert list(loader_order(batch_sampler_loader())) == list(range(N))
    block, start, stop = shard_loader(batch_sampler_loader(), 0, 2)
    assert isinstance(block.batch_sampler, BatchSampler) and block.batch_sampler.batch_size == 9
    assert [i for b in block.batch_sampler for i in b] == list(range(12))


def test_shard_loader_refuses_what_it_cannot_split():
    with pytest.raises(TypeError, match="distributed=False"):
        shard_loader([torch.zeros(2, 6)], 0, 2)
    with pytest.raises(TypeError, match="map-style dataset"):
        shard_loader(DataLoader(Stream(), batch_size=4), 0, 2)


def test_without_a_process_group_nothing_is_sharded():
    assert not dist.is_initialized()
    assert use_sharding(None) is False and use_sharding(False) is False
    assert is_main_process()
    assert issubclass(DistributedScoringError, RuntimeError)
    broadcast_module(make_model())  # a no-op without a group
    with pytest.raises(RuntimeError, match="init_process_group"):
        score_pool(make_model(), pool_loader(), progress=False, distributed=True)
    with pytest.raises(TypeError, match="None, True or False"):
        use_sharding("yes")
