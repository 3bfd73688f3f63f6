"""What travels between ranks, through one small gloo group the engine creates for itself.

CPU tensors, so the same code runs under NCCL and needs no CUDA device pinned per rank:
1. every rank's argument checks and a digest of its pool and options, before scoring;
2. a status per rank (ok or the error, how many samples it scored), always first after
   scoring, so a rank that raised makes every rank raise instead of leaving the others waiting;
3. then either each rank's scores, zero-padded to the longest block (score_pool: N values in
   all), or each rank's own top-k scores and pool positions (rank_unlabeled: at most k values
   and k positions per rank, whatever N is).

A rank that hangs or dies: an exchange waits at most ``GRADNORM_DISTRIBUTED_TIMEOUT`` seconds
(default 1800, torch's own default), then raises; a peer whose connection closed (it died, or
exited) is reported as soon as its connection drops, with the seconds it took. A failed exchange
closes the engine's group on this rank, and so does the end of the process: its gloo threads end
while the interpreter is whole, instead of sometimes aborting the process at exit. The next call
after a failure makes a new group.
"""
from __future__ import annotations

import atexit
import os
import pickle
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..ranking import best_positions, merge_top_k

TIMEOUT_ENV = "GRADNORM_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class DistributedScoringError(RuntimeError):
    """A rank failed (or stopped answering) during sharded scoring; raised on every rank.

    ``failures`` maps each failed rank to its message, e.g. ``{1: "ValueError: ..."}``;
    ``errors`` maps it to the exception itself where it could travel (else a RuntimeError with
    its text), so callers recognise a failure by its type.
    """

    def __init__(self, message: str, failures: dict[int, str] | None = None,
                 errors: dict[int, BaseException] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})
        self.errors = dict(errors or {})


def picklable(err: BaseException) -> BaseException:
    """``err`` itself if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(err).__name__}: {err}")


@dataclass
class RankStatus:
    """What each rank tells the others after scoring its block."""

    ok: bool
    count: int = 0          # samples scored
    backend: str = ""       # the backend that ran ("" for an empty block)
    dtype: str = ""         # score dtype, e.g. "torch.float32" ("" for an empty block)
    row_shape: tuple = ()   # the shape of one sample's result: () for a score, (G,) for G norms
    message: str = ""       # the error, when not ok
    error: BaseException | None = field(default=None, repr=False)   # the error itself, when not ok


@dataclass
class ScoredBlock:
    """This rank's scores and every rank's status, after a successful exchange."""

    scores: torch.Tensor         # [count] this rank's scores, in pool order
    statuses: list[RankStatus]   # one per rank, rank order
    group: object                # the gloo group for the exchanges
    dtype: torch.dtype           # the score dtype all ranks agree on
    backend: str
    row_shape: tuple = ()        # one sample's result: () for a score, (G,) for per-parameter norms

    @property
    def pool_size(self) -> int:
        return sum(s.count for s in self.statuses)

    @property
    def offset(self) -> int:
        """Pool position of this rank's first sample."""
        return sum(s.count for s in self.statuses[: dist.get_rank()])


def agree_before_scoring(agreement: str, failed: Exception | None, group) -> None:
    """Exchange each rank's argument checks and call digest; raise on every rank unless all
    passed with one digest. Blocks only partition the pool when every rank reads the same order
    (a random sampler or a dataset listed differently on some node would score some samples
    twice, others never), and the later exchanges need the same k everywhere."""
    mine = ("ok", agreement) if failed is None else ("failed", f"{type(failed).__name__}: {failed}")
    everyone: list = [None] * dist.get_world_size()
    collective(lambda: dist.all_gather_object(everyone, mine, group=group), "comparing the calls")
    if failed is not None:
        raise failed   # the single-process exception, on the rank that found it
    failures = {r: text for r, (state, text) in enumerate(everyone) if state == "failed"}
    if failures:
        listed = "; ".join(f"rank {r}: {m}" for r, m in failures.items())
        raise DistributedScoringError(f"sharded scoring refused on {len(failures)} of {len(everyone)} ranks: "
                                      f"{listed}", failures)
    digests = [text for _, text in everyone]
    if len(set(digests)) > 1:
        shown = "; ".join(f"rank {r}: {d}" for r, d in enumerate(digests))
        raise ValueError(
            f"the ranks read different pools or call with different options ({shown}); sharding needs the same "
            "dataset in the same loader order and the same options on every rank: use a fixed sampler (no random "
            "sampler), build the dataset identically everywhere, or pass distributed=False")


def exchange_status(status: RankStatus, group) -> list[RankStatus]:
    """Every rank's status, in rank order; raises on every rank if any rank failed."""
    statuses: list = [None] * dist.get_world_size()
    collective(lambda: dist.all_gather_object(statuses, status, group=group), "exchanging scoring status")
    failures = {r: s.message for r, s in enumerate(statuses) if not s.ok}
    if failures:
        listed = "; ".join(f"rank {r}: {m}" for r, m in failures.items())
        errors = {r: s.error for r, s in enumerate(statuses) if not s.ok and s.error is not None}
        raise DistributedScoringError(
            f"sharded scoring failed on {len(failures)} of {len(statuses)} ranks: {listed}", failures, errors)
    return statuses


def gather_scores(block: ScoredBlock) -> torch.Tensor:
    """Every rank's scores, concatenated in rank order = pool order.  -> [N, *row_shape] on every rank

    all_gather needs equal shapes, so each block is zero-padded to the longest and cut back.
    """
    width = max(s.count for s in block.statuses)
    mine = torch.zeros(width, *block.row_shape, dtype=block.dtype)
    mine[: block.scores.shape[0]] = block.scores.to(block.dtype)
    gathered = [torch.empty(width, *block.row_shape, dtype=block.dtype) for _ in block.statuses]
    collective(lambda: dist.all_gather(gathered, mine, group=block.group), "gathering the scores")
    return torch.cat([g[: s.count] for g, s in zip(gathered, block.statuses)])


def gather_top_k(block: ScoredBlock, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's top k from every rank's own top min(k, count).  -> (scores [k], positions [k])

    The global top-k lies inside the union of the per-rank top-k lists (a sample beaten by k
    samples of its own block is beaten by k samples of the pool), so merging those lists with
    the single-process rule gives the single-process answer.
    """
    own = block.scores.to(block.dtype)
    best = best_positions(own, k)
    width = min(k, max(s.count for s in block.statuses))
    top_scores = torch.zeros(width, dtype=block.dtype)
    top_positions = torch.zeros(width, dtype=torch.int64)
    top_scores[: best.numel()] = own[best]
    top_positions[: best.numel()] = best + block.offset
    all_scores = [torch.empty(width, dtype=block.dtype) for _ in block.statuses]
    all_positions = [torch.empty(width, dtype=torch.int64) for _ in block.statuses]

    def gather():
        dist.all_gather(all_scores, top_scores, group=block.group)
        dist.all_gather(all_positions, top_positions, group=block.group)

    collective(gather, "gathering the per-rank top-k")
    counts = [min(k, s.count) for s in block.statuses]
    return merge_top_k([t[:c] for t, c in zip(all_scores, counts)],
                       [t[:c] for t, c in zip(all_positions, counts)], k)


# --- the group and its timeout ---------------------------------------------------------------

_control: tuple[object, float, object] | None = None  # (default group, timeout, gloo group)


def exchange_timeout() -> float:
    """Seconds a rank waits for the others at an exchange (``GRADNORM_DISTRIBUTED_TIMEOUT``)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw}")
    return seconds


def control_group():
    """One gloo group over all ranks, made once per default group, for the engine's exchanges.

    gloo takes CPU tensors under any default backend (NCCL included), and its timeout turns a
    rank that never arrives into an error instead of a hang.
    """
    global _control
    world, timeout = dist.group.WORLD, exchange_timeout()
    if _control is None or _control[0] is not world or _control[1] != timeout:
        # every rank makes it at its first call: a rank that never makes the call is found here
        group = collective(lambda: dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout)),
                           "starting the engine's exchange group")
        _control = (world, timeout, group)
        _close_at_exit()
    return _control[2]


_closes_at_exit = False


def _close_at_exit() -> None:
    """Release the engine's group when the process ends, before the interpreter tears down: a gloo
    group whose peers have gone, left to the interpreter's teardown, sometimes aborts the process
    (SIGABRT, "terminate called without an active exception") instead of letting it end with its
    own exit code."""
    global _closes_at_exit
    if not _closes_at_exit:
        atexit.register(_close_control_group)
        _closes_at_exit = True


# What gloo and the store say when the peer at the other end of a connection is gone.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")


def collective(fn, what: str):
    """``fn()`` (an exchange between all ranks); a failure raises DistributedScoringError saying how
    long it took and what that means: a peer gone (at once) or no answer within the timeout."""
    start = time.monotonic()
    try:
        return fn()
    except Exception as err:
        seconds = time.monotonic() - start
        _close_control_group()
        raise DistributedScoringError(_exchange_failure(what, err, seconds)) from err


def _exchange_failure(what: str, err: Exception, seconds: float) -> str:
    limit = exchange_timeout()
    text = str(err).strip()
    cause = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"   # one line
    head = f"rank {dist.get_rank()}: {what}"
    if any(words in text for words in PEER_GONE):
        return (f"{head} failed after {seconds:.1f} s: a peer rank closed its connection, so it died or exited "
                f"without making this call; see its log ({cause})")
    if seconds >= 0.9 * limit:
        return (f"{head} gave up after {seconds:.0f} s, the limit ({TIMEOUT_ENV}={limit:g}), waiting for the other "
                "ranks: a rank hung, is still busy, or exited without making this call (every rank must make the "
                f"same calls); if ranks legitimately finish their blocks further apart, raise {TIMEOUT_ENV} "
                f"(seconds) ({cause})")
    return (f"{head} failed after {seconds:.1f} s, before the {limit:g} s limit ({cause}); a rank died or raised "
            "outside scoring")


def _close_control_group() -> None:
    """Forget the engine's group after a failed exchange and release it on this rank now: its peers
    are gone or out of step, and a broken gloo group left to the end of the process can abort it."""
    global _control
    if _control is None:
        return
    group, _control = _control[2], None
    try:
        dist.destroy_process_group(group)
    except Exception:  # noqa: BLE001 - best effort: the error that matters is the one being raised
        pass
