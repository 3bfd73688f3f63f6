"""Experiment settings per dataset: ``paper`` (the LPLgrad paper's) and ``quick`` (minutes on a CPU).

    preset = get_preset("cifar10", "paper")   # Preset(initial=1000, budget=1000, subset=10000, ...)

``paper`` follows the paper's Table II and text and the public reference code (high-budget
setting): SGD momentum 0.9, weight decay 5e-4, batch 128, LossNet features detached after 60 %
of the epochs (120 of 200).
- CIFAR-10: initial 1,000, +1,000 per cycle, 10 cycles (1k..10k labeled), subset 10,000 (the
  reference code's; Table II's high-budget subset is 25,000), lr 0.1, 200 epochs, x0.1 at 160.
- CIFAR-100: initial 2,500, +2,500 per cycle, 8 cycles (2.5k..20k), subset 25,000, lr 0.1, 200 epochs, x0.1 at 160.
- SVHN: initial 1,000, +1,000, 10 cycles, subset 25,000, lr 0.01, 200 epochs, x0.1 at 40.
- Caltech-101: initial 500, +500, 7 cycles (500..3.5k), subset 2,000, lr 0.01, 50 epochs, batch 80, x0.1 at 40.
- CDD: initial 500, +500, 5 cycles (500..2.5k), subset 1,000, lr 0.01, x0.1 at 40; the epoch count
  is not stated, 200 is assumed.
- digits (not in the paper): a CIFAR ResNet-18 of width 8 on the 16x16 digits.
Overriding ``epochs`` alone scales the milestones and the detach epoch with it.
Every preset runs 5 trials (``paper``) or 1 (``quick``). ``quick`` keeps the protocol but shrinks
the model width, epochs and set sizes so a run takes minutes on two CPU cores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import UsageError


@dataclass(frozen=True)
class Preset:
    initial: int
    budget: int
    subset: int
    cycles: int
    trials: int
    epochs: int
    lr: float
    milestones: tuple[int, ...]
    batch_size: int = 128
    detach_epoch: int | None = None   # None: 60 % of epochs
    width: int = 64                   # CIFAR ResNet-18 base width (64 = the paper's model)

    def resolved_detach_epoch(self) -> int:
        return self.detach_epoch if self.detach_epoch is not None else int(round(0.6 * self.epochs))


# The settings that count something: each must be at least 1.
COUNTS = ("initial", "budget", "subset", "cycles", "trials", "epochs", "batch_size", "width")


def check_settings(values: dict) -> None:
    """Counts of at least 1 and a positive, finite learning rate, for the keys ``values`` holds
    (a preset's fields or the overrides of one); else a UsageError naming the option."""
    for key in COUNTS:
        if key in values and values[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {values[key]}")
    if "lr" in values and not (values["lr"] > 0 and math.isfinite(values["lr"])):
        raise UsageError(f"--lr must be a positive number, got {values['lr']}")


PAPER: dict[str, Preset] = {
    "cifar10": Preset(1000, 1000, 10000, 10, 5, 200, 0.1, (160,), detach_epoch=120),
    "cifar100": Preset(2500, 2500, 25000, 8, 5, 200, 0.1, (160,), detach_epoch=120),
    "svhn": Preset(1000, 1000, 25000, 10, 5, 200, 0.01, (40,), detach_epoch=120),
    "caltech101": Preset(500, 500, 2000, 7, 5, 50, 0.01, (40,), batch_size=80, detach_epoch=30),
    "cdd": Preset(500, 500, 1000, 5, 5, 200, 0.01, (40,), detach_epoch=120),
    "folder": Preset(500, 500, 2000, 5, 5, 200, 0.01, (160,), detach_epoch=120),
    "digits": Preset(100, 100, 1000, 6, 5, 100, 0.05, (80,), batch_size=64, width=8),
}

QUICK: dict[str, Preset] = {
    "cifar10": Preset(500, 500, 2000, 3, 1, 10, 0.1, (8,), width=16),
    "cifar100": Preset(1000, 1000, 3000, 3, 1, 10, 0.1, (8,), width=16),
    "svhn": Preset(500, 500, 2000, 3, 1, 10, 0.01, (8,), width=16),
    "caltech101": Preset(200, 200, 1000, 3, 1, 10, 0.01, (8,), batch_size=80, width=16),
    "cdd": Preset(200, 200, 1000, 3, 1, 10, 0.01, (8,), width=16),
    "folder": Preset(200, 200, 1000, 3, 1, 10, 0.01, (8,), width=16),
    "digits": Preset(100, 100, 500, 4, 2, 20, 0.05, (15,), batch_size=64, width=8),
}

# `gradnorm-engine demo`: four strategies x 2 trials on digits in about a minute on two CPU cores.
DEMO = Preset(initial=60, budget=60, subset=400, cycles=4, trials=2, epochs=25, lr=0.05, milestones=(20,),
              batch_size=32, width=8)

PRESETS: dict[str, dict[str, Preset]] = {"paper": PAPER, "quick": QUICK}


def get_preset(dataset: str, name: str = "quick", **overrides) -> Preset:
    """The preset ``name`` for ``dataset``, with any non-None ``overrides`` applied."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    table = PRESETS[name]
    if dataset not in table:
        raise UsageError(f"no {name} preset for dataset {dataset!r}; known: {', '.join(table)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(changes) - set(Preset.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown preset fields {sorted(unknown)}")
    base = table[dataset]
    if "milestones" in changes:
        if isinstance(changes["milestones"], str):
            raise TypeError(f"milestones take a sequence of epochs, e.g. (80,), got the string {changes['milestones']!r}")
        changes["milestones"] = tuple(int(m) for m in changes["milestones"])
    check_settings(changes)
    if "epochs" in changes and changes["epochs"] != base.epochs:
        # Keep the schedule's shape when only the length changes: milestones and the detach
        # epoch scale with the epoch count.
        ratio = changes["epochs"] / base.epochs
        changes.setdefault("milestones", tuple(max(1, round(m * ratio)) for m in base.milestones))
        changes.setdefault("detach_epoch", None)
    return replace(base, **changes)
