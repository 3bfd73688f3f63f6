"""What the commands that score an image folder share: the model named on the command line,
its checkpoint, the folder (or zip) as a pool, and the engine's refusals in the command's terms.

    add_pool_arguments(parser)
    dataset = open_pool(args, "rank"); model = build_model(args.model, len(dataset.classes))
    load_model_weights(model, path); device = place_model(model, asked_device)
    with engine_refusals(files): ... score_pool(model, pool_loader(args, dataset, device), ...)
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterator, Mapping

import torch
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from ..backends import backend_names
from ..devices import resolve_device
from ..distributed import DistributedScoringError, broadcast_module, init_from_torchrun
from ..errors import LabelError, NonFiniteScoreError, SampleShapeError, SingleLogitError, UsageError
from ..extras import require
from ..al.run_folder import atomic_write_bytes
from ..torch_files import load_torch_file

NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "none": None,
}


def add_pool_arguments(p: argparse.ArgumentParser) -> None:
    """The model, the folder and how to read and score it: what rank and score both take."""
    p.add_argument("model", help="a torchvision model name (e.g. resnet18) or an importable module:factory")
    p.add_argument("--data", required=True, help="image folder in ImageFolder layout (<class>/<image>) or a zip of one")
    p.add_argument("--root", help="the folder inside --data that holds the class folders (e.g. cifar10/train)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the number of class folders)")
    p.add_argument("--image-size", type=int, help="resize images to this size (default: keep)")
    p.add_argument("--normalize", choices=sorted(NORMALIZATIONS), default="imagenet",
                   help="per-channel normalisation the model was trained with (default: imagenet)")
    p.add_argument("--backend", choices=backend_names(), default="auto",
                   help="how the norms are computed (default: auto, the fastest exact one)")
    p.add_argument("--batch-size", type=int, default=128, help="images per loader batch (default: 128; the "
                   "scores do not depend on it)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


CHECKPOINT_HELP = "a state_dict file (torch.save), or a dict holding one under 'model' or 'state_dict'"


def check_pool_sizes(args: argparse.Namespace) -> None:
    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 (load in this process) or more, got {args.workers}")
    if args.num_classes is not None and args.num_classes <= 0:
        raise UsageError(f"--num-classes must be at least 1, got {args.num_classes}")
    if args.image_size is not None and args.image_size <= 0:
        raise UsageError(f"--image-size must be at least 1 pixel, got {args.image_size}")


def open_pool(args: argparse.Namespace, command: str):
    """The image folder (or zip) of ``--data``, read as the model expects (size, normalisation)."""
    T = require("torchvision.transforms", extra="al", feature=f"gradnorm-engine {command}")
    from ..al.image_folders import open_image_folder   # Pillow, from the al extra: imported when used

    steps = [T.Resize((args.image_size, args.image_size))] if args.image_size else []
    steps.append(T.ToTensor())
    if NORMALIZATIONS[args.normalize]:
        steps.append(T.Normalize(*NORMALIZATIONS[args.normalize]))
    return open_image_folder(args.data, root=args.root, transform=T.Compose(steps))


def pool_loader(args: argparse.Namespace, dataset, device: torch.device) -> torch.utils.data.DataLoader:
    """The pool in folder order, an unreadable image or mixed sizes named in one line."""
    where = f"{args.data}{':' + args.root if args.root else ''}"
    return torch.utils.data.DataLoader(ReadableImages(dataset, where), batch_size=args.batch_size, shuffle=False,
                                       num_workers=args.workers, collate_fn=collate_images,
                                       pin_memory=device.type == "cuda")


def place_model(model: torch.nn.Module, asked_device: torch.device | None) -> torch.device:
    """The model on its device; under torchrun every rank on its own, holding rank 0's weights."""
    rank_device = init_from_torchrun()
    device = asked_device or rank_device or resolve_device(None)
    model.to(device)
    if rank_device is not None:
        broadcast_module(model)  # every rank scores with rank 0's weights
    return device


@contextlib.contextmanager
def engine_refusals(files: list[str], classes: int | None = None) -> Iterator[None]:
    """The engine's refusals of the data or the model as one-line UsageErrors in the command's terms
    (``classes``: how many class folders the pool has)."""
    try:
        yield
    except SampleShapeError as err:   # sizes that differ between batches (collate_images: within one)
        raise UsageError(f"the images have different sizes ({err}); pass --image-size N to resize every "
                         "image to N x N") from None
    except LabelError as err:   # class folders beyond the model's logits (--score cross_entropy)
        raise class_mismatch(err, classes) from None
    except MODEL_FAULTS as err:   # the model's outputs cannot be scored
        raise unrankable_outputs(err, files) from None
    except DistributedScoringError as err:   # under torchrun: a rank's data error, reported to all
        # a failure that is the data's or the model's fault, on every rank that failed: one line, exit 2
        if err.failures and len(err.errors) == len(err.failures) and \
                all(isinstance(e, (UsageError, SampleShapeError, LabelError, *MODEL_FAULTS)) for e in err.errors.values()):
            rank, message = next(iter(err.failures.items()))
            if isinstance(err.errors[rank], MODEL_FAULTS):   # its positions count within the rank's block
                message = str(unrankable_outputs(err.errors[rank], None))
            elif isinstance(err.errors[rank], LabelError):
                message = str(class_mismatch(err.errors[rank], classes))
            raise UsageError(f"rank {rank}: {message}") from None
        raise


def write_atomically(path: str, data: str | bytes) -> None:
    """``data`` (text as UTF-8) to ``path`` as the AL system writes its run files: a reader, or a
    crash, sees the old file or the new one, never half (al.run_folder.atomic_write_bytes)."""
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def build_model(spec: str, num_classes: int) -> torch.nn.Module:
    """A torchvision model name, or ``module:factory`` called with num_classes when it takes it."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())   # as `python -m` does: factories of the project at hand
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise UsageError(f"cannot load model factory {spec!r} ({err}); give module:function importable "
                             "from this Python") from None
        model = call_factory(factory, spec, num_classes)
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"model factory {spec} returned {type(model).__name__}, not a torch.nn.Module; "
                             "make it return the model")
        return model
    tvm = require("torchvision.models", extra="al", feature="gradnorm-engine rank")
    if spec not in tvm.list_models(module=tvm):
        raise UsageError(f"unknown torchvision model {spec!r}; use a name from torchvision.models.list_models() "
                         "or module:factory for your own model")
    return tvm.get_model(spec, weights=None, num_classes=num_classes)


def call_factory(factory, spec: str, num_classes: int):
    """``factory(num_classes=...)`` when its signature takes num_classes, else ``factory()``; called once.

    Arguments the signature cannot take are a UsageError; a TypeError raised inside the factory's
    body is the factory's own and propagates unchanged.
    """
    if not callable(factory):
        raise UsageError(f"model factory {spec} is a {type(factory).__name__}, not a callable; "
                         "give module:function that returns the model")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a callable without a readable signature (C code): call it bare
        return factory()
    params = signature.parameters.values()
    takes_num_classes = any(p.kind == p.VAR_KEYWORD or (p.name == "num_classes" and p.kind != p.POSITIONAL_ONLY)
                            for p in params)
    kwargs = {"num_classes": num_classes} if takes_num_classes else {}
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        call = f"{spec.partition(':')[2]}({'num_classes=N' if kwargs else ''})"
        raise UsageError(f"model factory {spec} cannot be called as {call} ({err}); it takes {signature}: "
                         "give the other parameters defaults or wrap it in a function that takes only "
                         "num_classes") from None
    return factory(**kwargs)


CHECKPOINT_FIX = "save it with torch.save(model.state_dict(), path)"


def load_model_weights(model: torch.nn.Module, path: str) -> None:
    """Load the state_dict in ``path`` (or the one it holds under model / state_dict) into ``model``;
    UsageError, one line naming the file, when it cannot be read or does not fit."""
    state = load_torch_file(path, what="checkpoint", fix=CHECKPOINT_FIX, weights_only=True)
    if isinstance(state, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise UsageError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict (a dict of parameter "
                         f"names to tensors); {CHECKPOINT_FIX}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = " ".join(lines[1:3] or lines[:1])
        raise UsageError(f"checkpoint {path} does not fit the model: {detail}") from None


MODEL_FAULTS = (SingleLogitError, NonFiniteScoreError)


def class_mismatch(err: Exception, classes: int | None) -> UsageError:
    """cross_entropy's refusal of labels past the model's logits, in the command's terms."""
    logits = re.search(r"of the model's (\d+) logits", str(err))
    counts = (f"the folder has {classes} class folders but the model gives {logits.group(1)} logits"
              if classes is not None and logits else f"the class folders do not fit the model's logits ({err})")
    return UsageError(f"{counts}, so --score cross_entropy has no logit for some images' class; pass --num-classes "
                      "with the folder's class count (and a --checkpoint trained on these classes), or score "
                      "without labels (--score entropy)")


def unrankable_outputs(err: Exception, files: list[str] | None) -> UsageError:
    """The engine's refusal of the model's outputs, as advice in the command's terms (the library's
    own names ``logits_fn=`` and ``score=``, which the command does not take)."""
    if isinstance(err, SingleLogitError):
        return UsageError("the model gives a single logit per image: a softmax over one class is constant, so every "
                          "score would be 0; rank a classifier with one logit per class (--num-classes 2 or more), "
                          "or, for a binary classifier with one logit z, a module:factory whose model returns "
                          "torch.cat([torch.zeros_like(z), z], dim=1)")
    positions = list(getattr(err, "positions", ()))
    shown = ""
    if files is not None and positions:
        shown = ": " + ", ".join(files[p] for p in positions[:5]) + (" ..." if len(positions) > 5 else "")
    count = f"{len(positions)} image(s)" if positions else "some images"
    return UsageError(f"{count} got a NaN or infinite score (NaN or Inf in the model's logits){shown}; check the "
                      "weights given with --checkpoint (a diverged training run?) and that --normalize is the "
                      "normalisation the model was trained with")


class DataError(UsageError):
    """A UsageError raised while a batch is loaded, possibly in a DataLoader worker process.

    The DataLoader re-raises a worker's exception in the main process as ``type(msg)`` with the
    worker's whole traceback as ``msg``; this keeps the original one-line message instead.
    """

    def __init__(self, message: str):
        if message.startswith("Caught ") and "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]  # "<module>.DataError: <the one-line message>"
            message = last.partition(": ")[2] or last
        super().__init__(message)


class ReadableImages(Dataset):
    """The image folder, with an unreadable image reported as a DataError naming its file."""

    def __init__(self, dataset, where: str):
        self.dataset, self.where = dataset, where

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except OSError as err:  # PIL's UnidentifiedImageError is an OSError too
            name = self.dataset.samples[index][0]
            # PIL names a zip member's buffer (<_io.BytesIO ...>), not the file: say it in words.
            from PIL import UnidentifiedImageError   # the folder reads images with PIL: it is there
            reason = "not a format PIL can decode" if isinstance(err, UnidentifiedImageError) else err
            raise DataError(f"{self.where}: {name} is not a readable image ({reason}); remove it or fix "
                            "the folder") from err


def collate_images(batch):
    """default_collate, after checking that the images of the batch have one size."""
    shapes = sorted({tuple(image.shape) for image, _ in batch if isinstance(image, torch.Tensor)})
    if len(shapes) > 1:
        a, b = ("x".join(map(str, shape)) for shape in shapes[:2])
        raise DataError(f"the images have different sizes ({a} and {b}); pass --image-size N to resize "
                        "every image to N x N")
    return default_collate(batch)


def check_out(path: str) -> None:
    """--out can be written: its folder exists and is writable, and it is not itself a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--out {path} is a folder; give a file name, e.g. {os.path.join(path, 'picks.csv')}")
    if not os.path.exists(folder):
        raise UsageError(f"--out {path}: folder {folder} does not exist; create it first or pick another path")
    if not os.path.isdir(folder):
        raise UsageError(f"--out {path}: {folder} is a file, not a folder; pick another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: folder {folder} is not writable; pick another path")
