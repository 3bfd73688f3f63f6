"""``gradnorm-engine rank``: rank an image folder (or a zip of one) with a trained classifier.

    gradnorm-engine rank resnet18 --checkpoint model.pt --data pool/ --k 1000 --out picks.csv
    gradnorm-engine rank mypkg.nets:make_model --data pool.zip --root pool --k 500
    torchrun --nproc-per-node 8 -m gradnorm_engine.cli rank resnet18 --data pool/ --k 1000

Writes picks.csv with one row per picked sample, best first: rank, position, file, score.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import os

import torch

from ..api import rank_unlabeled
from ..backends import backend_names
from ..distributed import broadcast_module, init_from_torchrun, is_main_process
from ..errors import UsageError
from ..image_folders import open_image_folder
from ..reduction import NORMS
from ..scores import SCORES

HELP = "rank an image folder or zip by per-sample gradient norm and write the top k to a CSV"

NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "none": None,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a torchvision model name (e.g. resnet18) or an importable module:factory")
    p.add_argument("--checkpoint", help="a state_dict file (torch.save), or a dict holding one under "
                                        "'model' or 'state_dict'")
    p.add_argument("--data", required=True, help="image folder in ImageFolder layout (<class>/<image>) or a zip of one")
    p.add_argument("--root", help="the folder inside --data that holds the class folders (e.g. cifar10/train)")
    p.add_argument("--k", type=int, required=True, help="how many samples to pick")
    p.add_argument("--out", default="picks.csv", help="CSV to write (default: picks.csv)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the number of class folders)")
    p.add_argument("--image-size", type=int, help="resize images to this size (default: keep)")
    p.add_argument("--normalize", choices=sorted(NORMALIZATIONS), default="imagenet",
                   help="per-channel normalisation the model was trained with (default: imagenet)")
    p.add_argument("--score", choices=sorted(SCORES), default="entropy")
    p.add_argument("--norm", choices=NORMS, default="frobenius")
    p.add_argument("--backend", choices=backend_names(), default="auto")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_model(spec: str, num_classes: int) -> torch.nn.Module:
    """A torchvision model name, or ``module:factory`` called with num_classes when it takes it."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise UsageError(f"cannot load model factory {spec!r} ({err}); give module:function importable "
                             "from this Python") from None
        try:
            return factory(num_classes=num_classes)
        except TypeError:
            return factory()
    import torchvision.models as tvm
    if spec not in tvm.list_models(module=tvm):
        raise UsageError(f"unknown torchvision model {spec!r}; use a name from torchvision.models.list_models() "
                         "or module:factory for your own model")
    return tvm.get_model(spec, weights=None, num_classes=num_classes)


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise UsageError(f"checkpoint {path} does not fit the model: {detail}") from None


def run(args: argparse.Namespace) -> int:
    import torchvision.transforms as T

    if args.k <= 0:
        raise UsageError(f"--k must be at least 1, got {args.k}")
    steps = [T.Resize((args.image_size, args.image_size))] if args.image_size else []
    steps.append(T.ToTensor())
    if NORMALIZATIONS[args.normalize]:
        steps.append(T.Normalize(*NORMALIZATIONS[args.normalize]))
    dataset = open_image_folder(args.data, root=args.root, transform=T.Compose(steps))
    if args.k > len(dataset):
        raise UsageError(f"--k {args.k} is larger than the pool ({len(dataset)} images)")
    model = build_model(args.model, args.num_classes or len(dataset.classes))
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    # Under torchrun every rank scores its own block of the pool; rank 0 writes the CSV.
    rank_device = init_from_torchrun()
    device = torch.device(args.device or rank_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    if rank_device is not None:
        broadcast_module(model)  # every rank scores with rank 0's weights
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    res = rank_unlabeled(model, loader, args.k, score=args.score, norm=args.norm, backend=args.backend,
                         device=device, progress=not args.no_progress)
    if not is_main_process():
        return 0
    names = [name for name, _ in dataset.samples]
    tmp = args.out + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "position", "file", "score"])
        for r, (pos, s) in enumerate(zip(res.indices.tolist(), res.scores.tolist()), start=1):
            w.writerow([r, pos, names[pos], f"{s:.9g}"])
    os.replace(tmp, args.out)
    print(f"scored {res.pool_size} images with backend={res.backend}, norm={res.norm}; "
          f"wrote the top {len(res)} to {args.out}")
    return 0
