"""``gradnorm-engine score``: every image's gradient-norm score, written with its file name.

    gradnorm-engine score resnet18 --checkpoint model.pt --data train/ --score cross_entropy --out grand.csv
    gradnorm-engine score mypkg.nets:make --data train.zip --checkpoints e10.pt,e20.pt,e30.pt \\
        --lrs 0.1,0.1,0.01 --params layer4,fc --out self_influence.npz

With ``--checkpoint`` (or none) each row is the score of ``score_pool`` (``--score``, ``--norm``):
``--score cross_entropy`` against the image's class folder is GraNd's data-pruning score.
With ``--checkpoints a.pt,b.pt,... --lrs la,lb,...`` each row is TracIn's self-influence,
sum_i lr_i ||d loss(z; theta_i) / d theta||^2 (squared norms, summed over the checkpoints, on the
``--params`` chosen). Writes a CSV (position, file, label, score) or, for a path ending in .npz,
the arrays positions, files, labels, scores.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys

import numpy as np
import torch

from ..api import score_pool
from ..devices import resolve_device
from ..distributed import is_main_process
from ..errors import UsageError
from ..per_parameter import per_parameter_sqnorms, under_prefix
from ..reduction import NORMS
from ..scores import SCORES
from .image_pool import (CHECKPOINT_HELP, add_pool_arguments, build_model, check_out, check_pool_sizes,
                         engine_refusals, load_model_weights, open_pool, place_model, pool_loader, write_atomically)

HELP = "write every image's gradient-norm score (GraNd, any score) or TracIn self-influence to a CSV or npz"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_pool_arguments(p)
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    weights.add_argument("--checkpoints", help="comma-separated checkpoints: TracIn self-influence over them "
                                               "(needs --lrs)")
    p.add_argument("--lrs", help="comma-separated learning rates, one per --checkpoints entry")
    p.add_argument("--params", help="comma-separated parameter-name prefixes to measure (e.g. layer4,fc; "
                                    "default: every parameter)")
    p.add_argument("--score", choices=sorted(SCORES), default="entropy",
                   help="the loss whose gradient is measured (default: entropy; cross_entropy: against each "
                        "image's class folder, GraNd's score)")
    p.add_argument("--norm", choices=NORMS, default="frobenius",
                   help="the norm of one checkpoint's scores (default: frobenius); --checkpoints sums squared "
                        "frobenius norms")
    p.add_argument("--out", default="scores.csv", help="the file to write: .csv (default: scores.csv) or .npz")


def parse_checkpoints(args: argparse.Namespace) -> list[tuple[str | None, float]]:
    """[(checkpoint, learning rate)]: one entry (--checkpoint, rate 1) or the TracIn list."""
    if args.lrs and not args.checkpoints:
        raise UsageError("--lrs goes with --checkpoints (TracIn self-influence); drop it, or list the checkpoints")
    if not args.checkpoints:
        return [(args.checkpoint, 1.0)]
    paths = [c.strip() for c in args.checkpoints.split(",") if c.strip()]
    if not args.lrs:
        raise UsageError("--checkpoints needs --lrs: the learning rate each checkpoint was trained with, "
                         "e.g. --lrs 0.1,0.1,0.01")
    try:
        lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--lrs {args.lrs!r} is not a comma-separated list of numbers") from None
    if len(lrs) != len(paths):
        raise UsageError(f"--checkpoints lists {len(paths)} file(s) but --lrs {len(lrs)} rate(s); give one rate "
                         "per checkpoint")
    if any(not (lr > 0 and np.isfinite(lr)) for lr in lrs):
        raise UsageError(f"--lrs must be positive numbers, got {args.lrs}")
    return list(zip(paths, lrs))


def chosen_params(model: torch.nn.Module, spec: str | None) -> list[str] | None:
    """The parameter names under the --params prefixes (None: every parameter)."""
    if not spec:
        return None
    prefixes = [p.strip() for p in spec.split(",") if p.strip()]
    names = [n for n, _ in model.named_parameters()]
    chosen = [n for n in names if any(under_prefix(n, p) for p in prefixes)]
    unmatched = [p for p in prefixes if not any(under_prefix(n, p) for n in names)]
    if unmatched:
        shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        raise UsageError(f"--params {','.join(unmatched)} names no parameter of the model (its parameters: {shown})")
    return chosen


def run(args: argparse.Namespace) -> int:
    check_pool_sizes(args)
    checkpoints = parse_checkpoints(args)
    asked_device = resolve_device(args.device) if args.device else None
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 writes the file
        check_out(args.out)
    dataset = open_pool(args, "score")
    model = build_model(args.model, args.num_classes or len(dataset.classes))
    params = chosen_params(model, args.params)
    for path, _ in checkpoints:   # every file is read once before the long passes: a bad one fails first
        if path is not None:
            load_model_weights(model, path)
    if checkpoints[0][0] is None and is_main_process():
        print("gradnorm-engine score: no --checkpoint given: scoring the model's freshly initialised weights",
              file=sys.stderr)
    device = place_model(model, asked_device)
    names = [name for name, _ in dataset.samples]
    options = dict(score=args.score, backend=args.backend, device=device, params=params,
                   progress=not args.no_progress)
    with engine_refusals(names, len(dataset.classes)):
        if args.checkpoints:
            total = None
            for path, lr in checkpoints:
                load_model_weights(model, path)
                # one group of every measured parameter: [N, 1], the squared norm, gathered as one column
                sq, _ = per_parameter_sqnorms(model, pool_loader(args, dataset, device), group=lambda _name: "all",
                                              **options)
                total = lr * sq[:, 0] if total is None else total + lr * sq[:, 0]
            scores, what = total, "self_influence"
        else:
            scores = score_pool(model, pool_loader(args, dataset, device), norm=args.norm, **options)
            what = "score"
    if not is_main_process():
        return 0
    labels = [dataset.classes[label] for _, label in dataset.samples]
    write_scores(args.out, names, labels, scores.double().numpy(), what)
    print(f"wrote {len(names)} {what.replace('_', ' ')} values to {args.out}")
    return 0


def write_scores(path: str, files: list[str], labels: list[str], scores: np.ndarray, what: str) -> None:
    """One row per image in folder order: CSV (position, file, label, <what>) or npz arrays."""
    if path.endswith(".npz"):
        arrays = io.BytesIO()
        # plural names: np.savez takes its own first argument as "file"
        np.savez(arrays, positions=np.arange(len(files)), files=np.array(files), labels=np.array(labels),
                 scores=scores)
        write_atomically(path, arrays.getvalue())
        return
    table = io.StringIO(newline="")
    w = csv.writer(table)
    w.writerow(["position", "file", "label", what])
    for i, (name, label, s) in enumerate(zip(files, labels, scores.tolist())):
        w.writerow([i, name, label, f"{s:.9g}"])
    write_atomically(path, table.getvalue())
