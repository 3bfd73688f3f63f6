"""From what a DataLoader yields to an input tensor, and from what a model returns to logits."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch

DEFAULT_INPUT_KEYS = ("image", "input", "x", "pixel_values")
# Entries of a mapping batch that are further model inputs, not labels: the engine passes the
# model one tensor, so a batch holding one of these is scored without it (see unused_model_inputs).
AUXILIARY_INPUT_KEYS = ("attention_mask", "token_type_ids", "position_ids", "pixel_mask", "mask",
                        "padding_mask", "key_padding_mask")


class IgnoredInputWarning(UserWarning):
    """A loader batch holds a further model input (an attention mask) that the engine does not pass."""


def unused_model_inputs(batch: Any, input_key: str | None = None) -> list[str]:
    """Keys of a mapping batch that look like further model inputs (``AUXILIARY_INPUT_KEYS``)."""
    if not isinstance(batch, Mapping):
        return []
    return [k for k in AUXILIARY_INPUT_KEYS if k in batch and k != input_key and isinstance(batch[k], torch.Tensor)]


def extract_input(batch: Any, input_key: str | None = None) -> torch.Tensor:
    """The model input inside one loader batch.

    A batch may be a tensor (the input itself), a tuple/list whose first element is the
    input (``(images, labels)``), or a mapping, read at ``input_key`` or else at the first
    of ``DEFAULT_INPUT_KEYS`` it holds. Labels are never used.
    """
    if isinstance(batch, torch.Tensor):
        x = batch
    elif isinstance(batch, Mapping):
        keys = (input_key,) if input_key is not None else DEFAULT_INPUT_KEYS
        for key in keys:
            if key in batch:
                x = batch[key]
                break
        else:
            raise TypeError(
                f"loader batch is a mapping with keys {sorted(map(str, batch))}, none of which is "
                f"{'the given input_key ' + repr(input_key) if input_key else 'one of ' + repr(DEFAULT_INPUT_KEYS)}; "
                "pass input_key='<your key>' to say which entry holds the model input"
            )
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) > 0:
        x = batch[0]
    else:
        raise TypeError(
            f"cannot find the model input in a loader batch of type {type(batch).__name__}: "
            "expected a tensor, a tuple/list whose first element is the input, or a mapping "
            "(use input_key= to name its entry)"
        )
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"the model input taken from the loader batch is a {type(x).__name__}, not a tensor; "
            "give the DataLoader a transform or collate_fn that yields tensors"
        )
    if x.dim() == 0:
        raise TypeError("the model input is a 0-d tensor; a batch needs a leading sample dimension")
    return x


def default_logits(output: Any) -> torch.Tensor:
    """Logits from a model's output: the output itself if it is a tensor, the first element
    of a tuple/list, or ``output["logits"]`` for a mapping."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        raise TypeError(
            f"model returned a mapping without a 'logits' entry (keys: {sorted(map(str, output))}); "
            "pass logits_fn= to say how to get logits from it"
        )
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot take logits from a model output of type {type(output).__name__}; "
        "pass logits_fn= to map the output to a [B, C] logits tensor"
    )


def resolve_logits_fn(logits_fn: Callable[[Any], torch.Tensor] | None) -> Callable[[Any], torch.Tensor]:
    return default_logits if logits_fn is None else logits_fn


def check_logits(logits, batch: int) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        hint = ("; the engine scores chunks of any size, one sample included (vmap and the loop always run "
                "one sample at a time): does the model squeeze the batch dim away (squeeze() rather than "
                "squeeze(-1))?" if batch == 1 and isinstance(logits, torch.Tensor) and logits.dim() == 1 else "")
        raise ValueError(
            f"logits must be a [B, C] tensor with B = {batch} (the batch), got {shape}; "
            f"pass logits_fn= to map the model output to per-sample class logits{hint}"
        )
    return logits


def check_loss(loss, batch: int) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.shape != (batch,):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"the score function must return one loss per sample, shape ({batch},), got {shape}")
    return loss
