"""What torch cannot run for a backend, said in one line with the backend or setting that works.

    known = vmap_limit(err)            # vmap's limits: None when the error is not one of them
    known = autograd_limit(err)        # limits of every backend (a reentrant checkpoint)
    if known is not None: raise known from err

The errors are recognised by torch's message and by where in the model they arose (the frames of
the traceback: a recurrent layer, torch.utils.checkpoint, Hugging Face code); the original error is
chained as the cause.
"""
from __future__ import annotations

from pathlib import PurePath

from ..memory import is_out_of_memory

WORKING = "use backend='auto' or 'hooks' (both exact)"

REENTRANT = ("the model uses torch.utils.checkpoint with use_reentrant=True, whose backward runs only under "
             ".backward() and not under torch.autograd.grad, which every backend needs (it leaves .grad untouched); "
             "pass use_reentrant=False to torch.utils.checkpoint (the same memory saving, and torch's recommended "
             "setting)")


def _frames(err: BaseException) -> list:
    frames, tb = [], err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _in(frame, where: str) -> bool:
    """Whether ``frame`` runs code under ``where`` ("torch/nn/modules/rnn.py", "transformers/")."""
    return "/" + where in PurePath(frame.f_code.co_filename).as_posix()


def autograd_limit(err: BaseException) -> RuntimeError | None:
    """A one-line error for what no backend can differentiate, or None."""
    message = str(err)
    if ("use_reentrant=True" in message and "incompatible with .grad()" in message) or \
            "Checkpointing is not compatible with .grad()" in message:
        return RuntimeError(REENTRANT)
    return None


def vmap_limit(err: BaseException) -> RuntimeError | None:
    """A one-line error for what torch.func.vmap(grad) cannot run (the other backends can), or None."""
    if is_out_of_memory(err):
        return None
    message, frames = str(err), _frames(err)
    if "mutate a captured Tensor" in message:
        return RuntimeError(
            "backend='vmap' cannot run this model: its forward updates a buffer or another tensor in place (a call "
            "counter, a cache), which torch.func's transforms refuse; use backend='hooks' (or 'auto') or 'loop'")
    if any(_in(f, "torch/utils/checkpoint.py") for f in frames):
        if "setup_context" in message or any(f.f_code.co_name == "checkpoint" and f.f_locals.get("use_reentrant")
                                             for f in frames if _in(f, "torch/utils/checkpoint.py")):
            return RuntimeError(REENTRANT)
        return RuntimeError("backend='vmap' cannot run this model: it uses torch.utils.checkpoint, whose saved-tensor "
                            f"hooks torch.func's transforms do not support; {WORKING}")
    layers = [type(f.f_locals["self"]).__name__ for f in frames
              if _in(f, "torch/nn/modules/rnn.py") and "self" in f.f_locals]
    if layers:
        return RuntimeError(f"backend='vmap' cannot run this model's nn.{layers[-1]}: torch.func.vmap has no batching "
                            f"rule for its fused recurrent kernel; {WORKING}")
    if "data-dependent control flow" in message or ".item()" in message:
        hf = any(_in(f, "transformers/") for f in frames)
        where = (" (Hugging Face models do when given an attention mask: their masking code calls .item())"
                 if hf else "")
        return RuntimeError(f"backend='vmap' cannot run this model: its forward reads a tensor's value in Python "
                            f"(.item(), `if tensor:`){where}, which torch.func.vmap cannot batch; {WORKING}")
    if "setup_context" in message:
        return RuntimeError("backend='vmap' cannot run this model: its forward calls a torch.autograd.Function "
                            f"without torch.func support (no setup_context staticmethod); {WORKING}")
    return None
