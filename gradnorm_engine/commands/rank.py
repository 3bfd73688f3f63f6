"""``gradnorm-engine rank``: rank an image folder (or a zip of one) with a trained classifier.

    gradnorm-engine rank resnet18 --checkpoint model.pt --data pool/ --k 1000 --out picks.csv
    gradnorm-engine rank mypkg.nets:make_model --data pool.zip --root pool --k 500
    torchrun --nproc-per-node 8 -m gradnorm_engine.cli rank resnet18 --data pool/ --k 1000

Writes picks.csv with one row per picked sample, best first: rank, position, file, score.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys

from ..api import rank_unlabeled
from ..devices import resolve_device
from ..distributed import is_main_process
from ..errors import UsageError
from ..reduction import NORMS
from ..scores import SCORES
from .image_pool import (CHECKPOINT_HELP, add_pool_arguments, build_model, check_out, check_pool_sizes,
                         engine_refusals, load_model_weights, open_pool, place_model, pool_loader, write_atomically)

HELP = "rank an image folder or zip by per-sample gradient norm and write the top k to a CSV"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_pool_arguments(p)
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--k", type=int, required=True, help="how many samples to pick")
    p.add_argument("--out", default="picks.csv", help="CSV to write (default: picks.csv)")
    p.add_argument("--score", choices=sorted(SCORES), default="entropy",
                   help="loss whose gradient norm ranks the images (default: entropy, the softmax entropy; "
                        "categorical_entropy: the LPLgrad reference code's clamped version; cross_entropy: "
                        "against each image's class folder)")
    p.add_argument("--norm", choices=NORMS, default="frobenius",
                   help="frobenius: sqrt of the sum of all squared gradient entries (default, the paper's text); "
                        "tensor_sum: sum of each parameter tensor's L2 norm (the reference code's, and the al "
                        "command's default)")


def check_sizes(args: argparse.Namespace) -> None:
    if args.k <= 0:
        raise UsageError(f"--k must be at least 1, got {args.k}")
    check_pool_sizes(args)


def run(args: argparse.Namespace) -> int:
    # Everything the user can get wrong is checked before the (long) scoring pass.
    check_sizes(args)
    asked_device = resolve_device(args.device) if args.device else None
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 writes the CSV
        check_out(args.out)
    dataset = open_pool(args, "rank")
    if args.k > len(dataset):
        raise UsageError(f"--k {args.k} is larger than the pool ({len(dataset)} images)")
    model = build_model(args.model, args.num_classes or len(dataset.classes))
    if args.checkpoint:
        load_model_weights(model, args.checkpoint)
    elif is_main_process():
        print("gradnorm-engine rank: no --checkpoint given: scoring the model's freshly initialised weights "
              "(pass the trained weights with --checkpoint for meaningful picks)", file=sys.stderr)
    # Under torchrun every rank scores its own block of the pool; rank 0 writes the CSV.
    device = place_model(model, asked_device)
    names = [name for name, _ in dataset.samples]
    with engine_refusals(names, len(dataset.classes)):
        res = rank_unlabeled(model, pool_loader(args, dataset, device), args.k, score=args.score, norm=args.norm,
                             backend=args.backend, device=device, progress=not args.no_progress)
    if not is_main_process():
        return 0

    table = io.StringIO(newline="")
    w = csv.writer(table)
    w.writerow(["rank", "position", "file", "score"])
    for r, (pos, s) in enumerate(zip(res.indices.tolist(), res.scores.tolist()), start=1):
        w.writerow([r, pos, names[pos], f"{s:.9g}"])
    write_atomically(args.out, table.getvalue())
    print(f"scored {res.pool_size} images with backend={res.backend}, norm={res.norm}; "
          f"wrote the top {len(res)} to {args.out}")
    return 0
