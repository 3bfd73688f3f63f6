"""Helpers for code that runs on every rank: whether to shard, which rank writes, one model.

    if use_sharding(None): ...            # a default group of several ranks is initialised
    if is_main_process(): write files     # rank 0, or a process without a group
    broadcast_module(model)               # every rank now holds rank 0's weights
    state = on_main_process(read_it)      # rank 0 reads, every rank gets the result (or its error)
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .exchange import collective, control_group, picklable

T = TypeVar("T")


def use_sharding(distributed: bool | None) -> bool:
    """Whether a call shards the pool.

    ``None``: shard when a default process group is initialised with more than one rank.
    ``False``: never (each process scores the whole pool). ``True``: shard, and insist that a
    group is initialised.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
    if distributed is False:
        return False
    ready = dist.is_available() and dist.is_initialized()
    if distributed is True and not ready:
        raise RuntimeError("distributed=True, but torch.distributed has no initialised default process group; "
                           "launch with torchrun and call torch.distributed.init_process_group() first, "
                           "or leave distributed=None to score on this process alone")
    return ready and (distributed is True or dist.get_world_size() > 1)


def is_main_process() -> bool:
    """True on rank 0, and in a process without an initialised group: the one that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Overwrite every rank's parameters and buffers with rank ``src``'s, in place.

    For loops that train a replica of the model on every rank and then score under torchrun:
    GPU training is not bit-reproducible across processes, and ranks whose weights drifted
    apart would score their blocks with different models. A no-op without a group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            # CPU tensors go through the engine's gloo group: an NCCL default group refuses them.
            group = control_group() if tensor.device.type == "cpu" else None
            collective(lambda: dist.broadcast(tensor.data, src, group=group), "broadcasting the model")


def on_main_process(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 alone and return its result on every rank; if it raised, every rank
    raises that exception. For file work of loops that run on every rank (reading a checkpoint,
    checking an output folder): one process touches the files and no rank is left waiting on a
    peer that failed. Just ``fn()`` without a group. The result travels pickled, via gloo.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list = [None]
    own_error = None
    if dist.get_rank() == 0:
        try:
            value = fn()
            # Pickled once, here: what cannot travel fails before the broadcast, not inside it.
            box[0] = ("ok", pickle.dumps(value))
        except Exception as err:  # noqa: BLE001 - handed to every rank below
            own_error, box[0] = err, ("raised", _from_rank_0(err))
    collective(lambda: dist.broadcast_object_list(box, src=0, group=control_group()),
               "sharing rank 0's file work")
    if own_error is not None:
        raise own_error
    status, payload = box[0]
    if status == "raised":
        raise payload
    return value if dist.get_rank() == 0 else pickle.loads(payload)


def _from_rank_0(err: Exception) -> BaseException:
    """``err`` as it travels from rank 0: itself, or a RuntimeError naming rank 0 and the error."""
    travelling = picklable(err)
    return travelling if travelling is err else RuntimeError(f"rank 0: {type(err).__name__}: {err}")


def init_from_torchrun() -> torch.device | None:
    """Under torchrun (WORLD_SIZE > 1 in the environment) start the default process group, once,
    and return this rank's device (``cuda:LOCAL_RANK`` when CUDA is there, else the CPU);
    outside torchrun return None and start nothing. For command-line entry points."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device
