"""``gradnorm-engine al``: run the active-learning comparison of several strategies.

    gradnorm-engine al --dataset cifar10 --strategies lplgrad,entropy,random --preset paper --out runs/c10
    gradnorm-engine al --dataset digits --cycles 6 --out runs/d --resume      # continue, 2 more cycles
    gradnorm-engine al --dataset folder --data cifar10-jpeg.zip --train-root cifar10/train \
        --test-root cifar10/test --out runs/jpeg

Options left out come from the preset (``--preset quick`` by default; see gradnorm_engine.al.presets).
Writes DIR/results.jsonl (one record per strategy, trial and cycle), DIR/config.json and
DIR/checkpoints/; ``gradnorm-engine report DIR`` draws the figures.

Under torchrun every rank runs the loop (one GPU each) and the gradient-norm queries are
sharded across the ranks; rank 0 writes DIR and prints:

    torchrun --standalone --nproc_per_node=4 -m gradnorm_engine.cli al --dataset cifar10 --preset paper --out runs/c10
"""
from __future__ import annotations

import argparse

from ..al.datasets import dataset_names
from ..al.loop import GRADNORM_SCORES, ALConfig, run_active_learning
from ..al.presets import PRESETS, get_preset
from ..al.report import accuracy_table, write_report
from ..al.strategies import STRATEGIES
from ..distributed import init_from_torchrun, is_main_process
from ..errors import UsageError
from ..reduction import NORMS

HELP = "run pool-based active learning (LPLgrad and baselines) and record test accuracy per cycle"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(dataset_names())} (default: digits)")
    p.add_argument("--strategies", default="lplgrad,ent-gradnorm,entropy,random",
                   help=f"comma-separated, from {', '.join(STRATEGIES)} (default: lplgrad,ent-gradnorm,entropy,random)")
    p.add_argument("--preset", default="quick", help=f"settings to start from: {', '.join(PRESETS)} (default: quick)")
    for name, what in [("initial", "labeled samples before the first cycle"), ("budget", "samples queried per cycle"),
                       ("subset", "random unlabeled candidates scored per cycle"), ("cycles", "train+query cycles"),
                       ("trials", "repetitions with different seeds"), ("epochs", "training epochs per cycle"),
                       ("batch-size", "training batch size"), ("width", "CIFAR ResNet-18 base width (64: the paper's)"),
                       ("detach-epoch", "epoch from which LossNet's input features are detached")]:
        p.add_argument(f"--{name}", type=int, help=f"{what} (default: from the preset)")
    p.add_argument("--lr", type=float, help="SGD learning rate (default: from the preset)")
    p.add_argument("--milestones", help="comma-separated epochs where the learning rate drops x0.1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/al", help="run folder (default: runs/al)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished cycle")
    p.add_argument("--from-scratch", action="store_true",
                   help="re-initialise the model every cycle (default: warm start, as the reference code)")
    p.add_argument("--norm", choices=NORMS, default="tensor_sum",
                   help="gradient norm of lplgrad / ent-gradnorm (default: tensor_sum, the reference code's)")
    p.add_argument("--score", choices=GRADNORM_SCORES, default="entropy",
                   help="loss whose gradient norm lplgrad / ent-gradnorm take: the softmax entropy (default), or "
                        "categorical_entropy, the reference code's Categorical(probs=softmax).entropy() with its "
                        "probability clamp")
    p.add_argument("--backend", default="auto", help="engine backend for gradient norms (default: auto)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is best for "
                                               "small models on a busy machine)")
    data = p.add_argument_group("data")
    data.add_argument("--data-root", default="data", help="folder of the torchvision datasets (default: data)")
    data.add_argument("--download", action="store_true", help="download cifar10 / cifar100 / svhn if missing")
    data.add_argument("--data", help="image folder or zip for caltech101, cdd, folder")
    data.add_argument("--train-root", help="folder inside --data with the training class folders")
    data.add_argument("--test-data", help="separate image folder or zip for the test split")
    data.add_argument("--test-root", help="folder inside the test data with the test class folders")
    data.add_argument("--image-size", type=int, help="resize folder images to this size (default: 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="skip the figures and summary at the end")


def parse_int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"{option} takes comma-separated integers, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> ALConfig:
    preset = get_preset(args.dataset, args.preset, initial=args.initial, budget=args.budget, subset=args.subset,
                        cycles=args.cycles, trials=args.trials, epochs=args.epochs, lr=args.lr,
                        batch_size=args.batch_size, width=args.width, detach_epoch=args.detach_epoch,
                        milestones=parse_int_list(args.milestones, "--milestones"))
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    data_options = {"root": args.data_root, "download": args.download, "path": args.data,
                    "train_root": args.train_root, "test_path": args.test_data, "test_root": args.test_root,
                    "image_size": args.image_size}
    return ALConfig(dataset=args.dataset, strategies=strategies, preset=preset, out=args.out, seed=args.seed,
                    device=args.device, from_scratch=args.from_scratch, norm=args.norm, score=args.score,
                    backend=args.backend,
                    resume=args.resume, progress=not args.no_progress, data_options=data_options)


def run(args: argparse.Namespace) -> int:
    if args.dataset not in dataset_names():
        raise UsageError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(dataset_names())}")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    rank_device = init_from_torchrun()   # under torchrun: the process group and this rank's GPU
    if rank_device is not None and args.device is None:
        config.device = str(rank_device)
    records = run_active_learning(config)
    if not is_main_process():
        return 0
    print()
    print(accuracy_table(records, fmt="text"))
    if not args.no_report:
        paths = write_report(config.out)
        print(f"\nwrote {config.out}/results.jsonl and {paths['summary']}")
    return 0
