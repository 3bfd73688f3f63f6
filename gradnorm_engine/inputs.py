"""From what a DataLoader yields to the model's inputs, and from what a model returns to logits.

    reader = InputReader(model)               # how this pool's batches become model inputs
    x = reader.read(batch)                    # -> ModelInputs: positional and keyword tensors [B, ...]
    logits = default_logits(model(*x.args, **x.kwargs))

A batch may be
- a tensor: the model's one input;
- a tuple/list: its first ``num_inputs`` elements are the model's positional inputs (labels
  and anything after them are never passed);
- a mapping: the entries the model's ``forward`` takes by name are passed as keyword arguments
  (``input_ids``, ``attention_mask``, ``pixel_values`` ...; ``input_keys=`` names them,
  ``exclude_keys=`` leaves some out, labels are never passed). When ``forward`` takes none of
  the keys, the input is the entry at ``input_key`` or the first of ``DEFAULT_INPUT_KEYS``,
  passed positionally.
Every tensor passed is batched on dim 0, and the engine keeps a sample's tensors together
through chunking, sharding and every backend.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

DEFAULT_INPUT_KEYS = ("image", "input", "x", "pixel_values")
# Entries of a mapping batch that hold labels: never passed to the model.
LABEL_KEYS = ("labels", "label", "label_ids", "targets", "target", "y")
# Entries of a mapping batch that are further model inputs: when they are not passed (the
# forward does not take them by name, or input_key picks one other entry) the scores are
# those of the model without them, which the engine says (IgnoredInputWarning).
AUXILIARY_INPUT_KEYS = ("attention_mask", "token_type_ids", "position_ids", "pixel_mask", "mask",
                        "padding_mask", "key_padding_mask")


class IgnoredInputWarning(UserWarning):
    """A loader batch holds a further model input (an attention mask) that the engine does not pass."""


@dataclass(frozen=True)
class ModelInputs:
    """One batch of model inputs: positional and keyword tensors, every one batched on dim 0.

    The call is ``model(*args, **kwargs)``; slicing, splitting and concatenating act on every
    tensor at once, so a sample's tensors never part. ``targets`` [B, ...] are the samples'
    labels when a label-aware score reads them (never passed to the model).
    """

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: torch.Tensor | None = None

    @classmethod
    def of(cls, x: ModelInputs | torch.Tensor) -> ModelInputs:
        """``x`` as ModelInputs (a single tensor is the one positional input)."""
        return x if isinstance(x, ModelInputs) else cls((x,))

    def tensors(self) -> list[torch.Tensor]:
        """The model's input tensors (not the targets)."""
        return [*self.args, *self.kwargs.values()]

    def __len__(self) -> int:
        return int(self.tensors()[0].shape[0])

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device

    def signature(self) -> tuple:
        """What must agree for two batches to share a chunk: names, and each tensor's sample shape."""
        return (tuple(tuple(t.shape[1:]) for t in self.args),
                tuple((k, tuple(t.shape[1:])) for k, t in self.kwargs.items()),
                None if self.targets is None else tuple(self.targets.shape[1:]))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ModelInputs:
        return ModelInputs(tuple(fn(t) for t in self.args), {k: fn(t) for k, t in self.kwargs.items()},
                           None if self.targets is None else fn(self.targets))

    def __getitem__(self, index: slice) -> ModelInputs:
        if not isinstance(index, slice):
            raise TypeError("ModelInputs take slices of samples, e.g. x[:2]")
        return self.map(lambda t: t[index])

    def split(self, size: int) -> list[ModelInputs]:
        n = len(self)
        return [self[i:i + size] for i in range(0, n, size)]

    def to(self, device, non_blocking: bool = False) -> ModelInputs:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    @staticmethod
    def cat(parts: Sequence[ModelInputs]) -> ModelInputs:
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return ModelInputs(tuple(torch.cat([p.args[i] for p in parts]) for i in range(len(first.args))),
                           {k: torch.cat([p.kwargs[k] for p in parts]) for k in first.kwargs},
                           None if first.targets is None else torch.cat([p.targets for p in parts]))

    def describe(self) -> str:
        parts = [f"{tuple(t.shape)}" for t in self.args] + [f"{k}={tuple(t.shape)}" for k, t in self.kwargs.items()]
        return ", ".join(parts)


def forward_keywords(model: nn.Module) -> tuple[set[str], bool]:
    """The names ``model.forward`` takes as keyword arguments, and whether it takes nothing but
    ``*args``/``**kwargs`` (a generic wrapper, which is given every entry)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):   # a forward without a signature (a C extension): pass by name
        return set(), True
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    generic = not named and any(p.kind == p.VAR_KEYWORD for p in params)
    return named, generic


class InputReader:
    """How the batches of one pool become ``ModelInputs``, decided from the options and the model.

    ``input_key``: the one mapping entry that is the (positional) input. ``input_keys``: the
    mapping entries passed by name. ``exclude_keys``: entries never passed. ``num_inputs``: how
    many leading elements of a tuple batch are positional inputs. With ``needs_targets`` (a
    label-aware score) each batch's labels come too: ``label_key`` names them (a mapping's key,
    or a tuple's element index), by default the tuple element after the inputs or the first of
    ``LABEL_KEYS`` a mapping holds.
    """

    def __init__(self, model: nn.Module | None = None, *, input_key: str | None = None,
                 input_keys: Sequence[str] | None = None, exclude_keys: Sequence[str] = (), num_inputs: int = 1,
                 label_key: str | int | None = None, needs_targets: bool = False):
        if input_key is not None and input_keys is not None:
            raise ValueError("pass input_key (one entry, passed positionally) or input_keys (entries passed by "
                             "name), not both")
        if isinstance(input_keys, str) or isinstance(exclude_keys, str):
            raise TypeError("input_keys and exclude_keys take a list of names, e.g. input_keys=['input_ids']")
        labels = sorted(set(input_keys or ()) & set(LABEL_KEYS))
        if labels:
            raise ValueError(f"input_keys names {labels}, which hold labels: labels are never passed to the model")
        if not isinstance(num_inputs, int) or isinstance(num_inputs, bool) or num_inputs < 1:
            raise ValueError(f"num_inputs must be a positive int (how many leading tuple elements are inputs), "
                             f"got {num_inputs!r}")
        if label_key is not None and (isinstance(label_key, bool) or not isinstance(label_key, (str, int))):
            raise TypeError(f"label_key takes a mapping key (str) or a tuple index (int), got {label_key!r}")
        self.label_key = label_key
        self.needs_targets = needs_targets
        self.input_key = input_key
        self.input_keys = tuple(input_keys) if input_keys is not None else None
        self.exclude_keys = frozenset(exclude_keys)
        self.num_inputs = num_inputs
        self.named, self.generic = forward_keywords(model) if model is not None else (set(), False)

    def read(self, batch: Any) -> ModelInputs:
        """The model inputs of one loader batch (see the module docstring), and its labels when
        the score needs them."""
        inputs = self._inputs(batch)
        _check_leading_sizes(inputs)
        if not self.needs_targets:
            return inputs
        targets = _checked(self.targets(batch), "the labels of the loader batch")
        if targets.shape[0] != len(inputs):
            raise ValueError(f"the loader batch holds {len(inputs)} inputs but {targets.shape[0]} labels (leading, "
                             "dim 0 sizes); every tensor of a batch must hold one row per sample, its labels "
                             "included, so check the dataset's items and the collate_fn")
        return ModelInputs(inputs.args, inputs.kwargs, targets)

    def targets(self, batch: Any) -> torch.Tensor:
        """The labels inside one loader batch; a batch without them is refused by name."""
        fix = ("a label-aware score (cross_entropy, or a score taking (logits, targets)) needs each sample's label: "
               "yield (inputs, labels) or a mapping with a 'labels' entry, or name it with label_key=")
        if isinstance(batch, Mapping):
            key = self.label_key if self.label_key is not None else next((k for k in LABEL_KEYS if k in batch), None)
            if key is None or key not in batch:
                raise ValueError(f"the loader batch is a mapping with keys {sorted(map(str, batch))} and no labels"
                                 f"{'' if self.label_key is None else f' at label_key={self.label_key!r}'}; {fix}")
            return batch[key]
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
            index = self.label_key if isinstance(self.label_key, int) else self.num_inputs
            if isinstance(self.label_key, str) or not -len(batch) <= index < len(batch):
                raise ValueError(f"the loader batch is a {type(batch).__name__} of {len(batch)} element(s) and "
                                 f"holds no labels at index {index}; {fix}")
            return batch[index]
        raise ValueError(f"the loader batches are {type(batch).__name__}s, which hold no labels; {fix}")

    def _inputs(self, batch: Any) -> ModelInputs:
        if isinstance(batch, torch.Tensor):
            return ModelInputs((_checked(batch, "the loader batch"),))
        if isinstance(batch, Mapping):
            keys = self.keyword_keys(batch)
            if keys:
                return ModelInputs((), {k: _checked(batch[k], f"entry {k!r} of the loader batch") for k in keys})
            return ModelInputs((extract_input(batch, self.input_key),))
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= self.num_inputs > 1:
            return ModelInputs(tuple(_checked(batch[i], f"element {i} of the loader batch")
                                     for i in range(self.num_inputs)))
        if self.num_inputs > 1 and isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
            raise TypeError(f"num_inputs={self.num_inputs}, but the loader batch is a {type(batch).__name__} of "
                            f"{len(batch)} element(s)")
        return ModelInputs((extract_input(batch, self.input_key),))

    def keyword_keys(self, batch: Mapping) -> list[str]:
        """The entries of a mapping batch passed by name ([] when the model takes the input positionally)."""
        if self.input_key is not None:
            return []
        if self.input_keys is not None:
            missing = [k for k in self.input_keys if k not in batch]
            if missing:
                raise TypeError(f"input_keys names {missing}, which the loader batch does not hold (keys: "
                                f"{sorted(map(str, batch))})")
            return list(self.input_keys)
        return [k for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in LABEL_KEYS
                and k != self.label_key and k not in self.exclude_keys and (self.generic or k in self.named)]

    def unused(self, batch: Any) -> list[str]:
        """Entries of a mapping batch that look like model inputs and are not passed."""
        if not isinstance(batch, Mapping):
            return []
        passed = set(self.keyword_keys(batch)) or ({self.input_key} if self.input_key else set())
        if not passed:
            passed = {next((k for k in DEFAULT_INPUT_KEYS if k in batch), None)}
        candidates = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in passed
                      and k not in LABEL_KEYS and k != self.label_key and k not in self.exclude_keys]
        return [k for k in candidates if k in AUXILIARY_INPUT_KEYS or k in self.named]


def _check_leading_sizes(inputs: ModelInputs) -> None:
    """Every tensor passed to the model holds one row per sample: the same size on dim 0. A batch
    whose tensors disagree (an attention mask of another batch) would otherwise be scored as the
    first tensor's samples, or fail deep in a backend."""
    sizes = [int(t.shape[0]) for t in inputs.tensors()]
    if len(set(sizes)) <= 1:
        return
    names = [f"element {i}" for i in range(len(inputs.args))] + [repr(k) for k in inputs.kwargs]
    shown = ", ".join(f"{name} has {size}" for name, size in zip(names, sizes))
    raise ValueError(f"the tensors of a loader batch differ in their leading (dim 0) size: {shown}; every tensor "
                     "of a batch must hold one row per sample (dim 0 = the samples), so check the dataset's "
                     "items and the collate_fn")


def _checked(x: Any, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} is a {type(x).__name__}, not a tensor; give the DataLoader a transform or "
                        "collate_fn that yields tensors")
    if x.dim() == 0:
        raise TypeError(f"{what} is a 0-d tensor; a batch needs a leading sample dimension")
    return x


def extract_input(batch: Any, input_key: str | None = None) -> torch.Tensor:
    """The one model input inside a loader batch.

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
                f"{'the given input_key ' + repr(input_key) if input_key else 'one of ' + repr(DEFAULT_INPUT_KEYS)}"
                "; and the model's forward takes none of them by name. Pass input_key='<your key>' to say which "
                "entry holds the model input, or input_keys=[...] to pass entries by name"
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
    of a tuple/list, or ``output["logits"]`` for a mapping (a Hugging Face ``ModelOutput``
    included)."""
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
    if isinstance(logits, torch.Tensor) and not logits.is_floating_point():
        raise TypeError(
            f"logits must be floating-point, got dtype {logits.dtype} (shape {tuple(logits.shape)}): the scores "
            "take a softmax of them and differentiate it; the model must return floating-point logits, or pass "
            "logits_fn= to pick the floating-point logits from its output or convert them")
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
