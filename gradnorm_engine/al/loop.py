"""The pool-based active-learning loop, its records and its checkpoints.

    config = ALConfig(dataset="digits", strategies=["lplgrad", "random"], preset=get_preset("digits"),
                      out="runs/demo")
    records = run_active_learning(config)        # also written to runs/demo/results.jsonl

Protocol, per trial t and strategy s (the same initial labeled set and initial weights for every
strategy of a trial):
    L = ``initial`` random pool indices, U = the rest
    for cycle = 1 .. cycles:
        train on L (warm start from the previous cycle's weights, or from the initial weights
        with ``from_scratch``), evaluate test accuracy
        S = ``subset`` random members of U; picked = strategy.select(S, ``budget``)
        L <- L + picked, U <- U - picked; save a checkpoint; rewrite results.jsonl
Every cycle, the last included, ends with its query, so a run resumed with more cycles goes on
from the saved L and U as if it had never stopped.

The files in ``out`` are gradnorm_engine.al.run_folder's. A checkpoint is written before
results.jsonl, which is rebuilt from the checkpoints; a run killed at any moment loses at most
the cycle in progress.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..backends import check_backend_name
from ..devices import resolve_device
from ..distributed import broadcast_module, is_main_process, on_main_process
from ..errors import UsageError
from ..reduction import NORMS
from .datasets import ALDataset, ImageTensors, content_fingerprint, load_dataset
from .lossnet import LossNet, has_stage_taps, lossnet_for
from .models import cifar_resnet18
from .presets import Preset, check_settings
from .run_folder import (CONFIG, JSON_KIND_WORDS, atomic_torch_save, atomic_write_bytes, check_checkpoint_folders,
                         check_checkpoints_cover_results, check_writable, checkpoint_path, holds_run, is_json_kind,
                         load_all_records, load_trial_state, make_out_folder, read_config, remove_stale_temp_files,
                         write_results)
from .strategies import STRATEGIES, QueryContext, Strategy, make_strategy
from .trainer import TrainConfig, evaluate, place_split, train


# Settings a resumed run must share with the run it continues; cycles, trials and the
# strategy list may grow.
RESUME_KEYS = ("dataset", "seed", "initial", "budget", "subset", "epochs", "lr", "milestones", "batch_size",
               "detach_epoch", "width", "from_scratch", "norm", "score", "pool")
# Data options a resumed run must share too (paths to the data may move; what is read from them
# may not: the pool counts above and the content fingerprint catch other data with the same options).
RESUME_DATA_KEYS = ("train_root", "test_root", "image_size")
# What runs written before a key was saved used (they could use nothing else).
RESUME_DEFAULTS = {"score": "entropy"}
# The type of every setting config.json holds (ALConfig.settings, the pool and the fingerprint);
# every version has saved all of them but score, pool and fingerprint.
SETTING_TYPES = {"dataset": "string", "strategies": "strings", "seed": "integer", "initial": "integer",
                 "budget": "integer", "subset": "integer", "cycles": "integer", "trials": "integer",
                 "epochs": "integer", "lr": "number", "milestones": "integers", "batch_size": "integer",
                 "detach_epoch": "integer", "width": "integer", "from_scratch": "boolean", "norm": "string",
                 "score": "string", "backend": "string", "data": "object", "pool": "object", "fingerprint": "object"}
ALWAYS_SAVED = tuple(k for k in SETTING_TYPES if k not in ("score", "pool", "fingerprint"))

# Losses the gradient-norm strategies may differentiate: the softmax entropy, or the same with the
# public reference code's probability clamp (Categorical(probs=...).entropy()).
GRADNORM_SCORES = ("entropy", "categorical_entropy")

Hook = Callable[[str, dict], None]
ModelFactory = Callable[[ALDataset, Preset], nn.Module]


@dataclass
class ALConfig:
    dataset: str
    strategies: list[str]
    preset: Preset
    out: str
    seed: int = 0
    device: str | None = None
    from_scratch: bool = False
    norm: str = "tensor_sum"      # gradient-norm strategies: "tensor_sum" (reference code) or "frobenius"
    backend: str = "auto"         # engine backend for the gradient-norm strategies
    score: str = "entropy"        # their loss: "entropy", or "categorical_entropy" (the reference code's clamp)
    resume: bool = False
    progress: bool = True
    data_options: dict = field(default_factory=dict)  # passed to load_dataset (root, download, path, ...)

    def settings(self) -> dict:
        """The JSON-able settings saved in config.json."""
        p = self.preset
        return {"dataset": self.dataset, "strategies": list(self.strategies), "seed": self.seed,
                "initial": p.initial, "budget": p.budget, "subset": p.subset, "cycles": p.cycles,
                "trials": p.trials, "epochs": p.epochs, "lr": p.lr, "milestones": list(p.milestones),
                "batch_size": p.batch_size, "detach_epoch": p.resolved_detach_epoch(), "width": p.width,
                "from_scratch": self.from_scratch, "norm": self.norm, "score": self.score, "backend": self.backend,
                "data": {k: v for k, v in self.data_options.items() if k != "download"}}


def default_model(data: ALDataset, preset: Preset) -> nn.Module:
    """The paper's model: CIFAR ResNet-18 (3x3 stem, no max-pool), of width ``preset.width``."""
    return cifar_resnet18(num_classes=data.num_classes, in_channels=data.in_channels, width=preset.width)


# ---------------------------------------------------------------------------------------------
# Bookkeeping: pure functions on index tensors (property-tested)


def initial_split(pool_size: int, initial: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random labeled set of ``initial`` pool indices and the sorted rest.  -> (L [initial], U [N - initial])"""
    order = torch.randperm(pool_size, generator=generator)
    return order[:initial].clone(), order[initial:].sort().values


def draw_subset(unlabeled: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` distinct members of ``unlabeled``, uniformly at random (all of them if fewer)."""
    size = min(size, unlabeled.numel())
    return unlabeled[torch.randperm(unlabeled.numel(), generator=generator)[:size]]


def apply_query(labeled: torch.Tensor, unlabeled: torch.Tensor, picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``picked`` from U to L.  -> (L + picked in pick order, U - picked in U's order)

    Raises RuntimeError when ``picked`` repeats an index or holds one that is not in U (a
    strategy bug): nothing may be queried twice, lost, or be both labeled and unlabeled.
    """
    picked = torch.as_tensor(picked, dtype=torch.int64).flatten().cpu()
    if picked.unique().numel() != picked.numel():
        raise RuntimeError("the strategy picked the same pool index more than once")
    member = torch.isin(unlabeled, picked)
    if int(member.sum()) != picked.numel():
        raise RuntimeError("the strategy picked pool indices that are not in the unlabeled pool")
    return torch.cat([labeled, picked]), unlabeled[~member]


def check_partition(labeled: torch.Tensor, unlabeled: torch.Tensor, pool_size: int) -> None:
    """L and U are disjoint, duplicate-free, and together exactly 0..pool_size-1."""
    both = torch.cat([labeled, unlabeled])
    if both.numel() != pool_size or not torch.equal(both.sort().values, torch.arange(pool_size)):
        raise RuntimeError("labeled and unlabeled indices no longer partition the pool")


# ---------------------------------------------------------------------------------------------
# Seeds: every random stream is derived from (seed, trial), so runs are reproducible and a
# trial's strategies share their initial labeled set, initial weights and random streams.


def derive_seed(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _fresh_models(data: ALDataset, preset: Preset, factory: ModelFactory, seed: int, uses_lossnet: bool,
                  device: torch.device) -> tuple[nn.Module, LossNet | None]:
    """The trial's initial weights: the same for every strategy (seeded, global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(data, preset)
        lossnet = None
        if uses_lossnet:   # the model's stage taps were checked before the loop (_check_lossnet_fits)
            example = data.train.batch(torch.tensor([0]), "cpu")[0]
            lossnet = lossnet_for(model, example)
    model.to(device)
    if lossnet is not None:
        lossnet.to(device)
    return model, lossnet


def _check_lossnet_fits(data: ALDataset, preset: Preset, factory: ModelFactory, needing: list[str]) -> None:
    """Refuse LossNet strategies on a model without stage outputs before any strategy has run."""
    if not needing:
        return
    with torch.random.fork_rng(devices=[]):
        model = factory(data, preset)
    if not has_stage_taps(model):
        raise UsageError(f"{type(model).__name__} exposes no stage outputs, which LossNet needs for "
                         f"{', '.join(needing)}; drop those strategies or use a ResNet model")


# ---------------------------------------------------------------------------------------------
# The configuration: strategy options and the checks of a run's settings


def strategy_options(config: ALConfig, name: str) -> dict:
    """The options of ``config`` that strategy ``name`` takes (the gradient-norm ones take the
    engine's norm, backend and score; the others take none)."""
    offered = {"norm": config.norm, "backend": config.backend, "score": config.score}
    return {k: v for k, v in offered.items() if k in STRATEGIES[name].option_names}


def validate_names(config: ALConfig) -> None:
    """Mistakes found before any data is loaded -> UsageError naming the fix."""
    if not config.strategies:
        raise UsageError("no strategy given; pass --strategies with names from " + ", ".join(STRATEGIES))
    for name in config.strategies:
        if name not in STRATEGIES:
            raise UsageError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    if len(set(config.strategies)) != len(config.strategies):
        raise UsageError("a strategy is listed twice in --strategies")
    if config.norm not in NORMS:
        raise UsageError(f"unknown norm {config.norm!r}; choose {' or '.join(NORMS)}")
    if config.score not in GRADNORM_SCORES:
        raise UsageError(f"unknown score {config.score!r}; choose from {', '.join(GRADNORM_SCORES)}")
    try:
        check_backend_name(config.backend)
    except ValueError as err:
        raise UsageError(str(err)) from None


def validate(config: ALConfig, pool_size: int) -> None:
    """User mistakes in the protocol -> UsageError naming the fix."""
    validate_names(config)
    p = config.preset
    check_settings(dataclasses.asdict(p))
    if p.initial < 2:
        raise UsageError(f"--initial must be at least 2 (training needs two samples), got {p.initial}")
    if p.batch_size < 2:
        raise UsageError(f"--batch-size must be at least 2, got {p.batch_size}")
    if p.budget > p.subset:
        raise UsageError(f"--budget {p.budget} is larger than --subset {p.subset}; the budget is picked "
                         "from the subset, so use a budget of at most the subset size")
    if p.initial >= pool_size:
        raise UsageError(f"--initial {p.initial} leaves no unlabeled sample in the {pool_size}-sample pool; "
                         f"use at most {pool_size - 1}")
    # The last cycle's query sees the smallest unlabeled pool.
    last_pool = pool_size - p.initial - p.budget * (p.cycles - 1)
    if p.subset > last_pool:
        raise UsageError(
            f"--subset {p.subset} is larger than the unlabeled pool at the last cycle ({last_pool} of "
            f"{pool_size} samples after {p.initial} initial + {p.cycles - 1} x {p.budget} queried); "
            "lower --subset, --budget, --cycles or --initial")


# ---------------------------------------------------------------------------------------------
# The run folder's settings


def _prepare_out(config: ALConfig, data: ALDataset) -> dict:
    """Create ``config.out`` and write its config.json, or, on a resume, check the run there (its
    settings, data, files and folders) and remove its stale temporary files.  -> the settings
    written (on a resume: with the strategies, trials and cycles of both runs)"""
    make_out_folder(config.out)
    settings = config.settings()
    settings["pool"] = {"train": len(data.train), "test": len(data.test), "classes": list(data.classes)}
    settings["fingerprint"] = {"train": content_fingerprint(data.train), "test": content_fingerprint(data.test)}
    path = os.path.join(config.out, CONFIG)
    exists = holds_run(config.out)   # config.json, results.jsonl or checkpoints/
    if exists and not config.resume:
        raise UsageError(f"{config.out} already holds a run; pass --resume to continue it or choose another --out")
    if exists:   # (a resume of an empty folder is a new run)
        settings = _continued_run(config.out, read_config(config.out), settings)
    atomic_write_bytes(path, (json.dumps(settings, indent=2) + "\n").encode())
    return settings


def _continued_run(out: str, saved: dict | None, settings: dict) -> dict:
    """Check the run in ``out`` that a resume with ``settings`` continues (its config.json holds
    ``saved``): its settings, its data, what it will write and what its checkpoints/ holds; then
    remove its stale temporary files.  -> the settings of the continued run"""
    _check_saved_settings(os.path.join(out, CONFIG), saved)
    strategies, trials = _both_runs(saved, settings)
    check_writable(out, strategies, trials)
    check_checkpoint_folders(out, saved["strategies"], saved["trials"], list(STRATEGIES))
    check_checkpoints_cover_results(out)
    settings = _resumed_settings(out, saved, settings)
    remove_stale_temp_files(out, settings["strategies"])
    return settings


def _check_saved_settings(path: str, saved: dict | None) -> None:
    """The saved run's settings (config.json at ``path``) are there, whole and of their types;
    UsageError naming what is not (a resume must not guess them)."""
    fix = "restore the run's config.json, or start a new run in another --out"
    if saved is None:
        raise UsageError(f"--resume: {os.path.dirname(path)} holds a run but no {CONFIG}, so the run's settings "
                         f"are unknown and a resume could mix other settings into it; {fix}")
    missing = [k for k in ALWAYS_SAVED if k not in saved]
    if len(missing) == len(ALWAYS_SAVED):
        raise UsageError(f"--resume: {path} holds none of the run's settings; {fix}")
    if missing:
        raise UsageError(f"--resume: {path} lacks the run's {', '.join(missing)}; {fix}")
    for key, kind in SETTING_TYPES.items():
        if key in saved and not is_json_kind(saved[key], kind):
            shown = json.dumps(saved[key])
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise UsageError(f"--resume: {path} holds {key} = {shown}, not {JSON_KIND_WORDS[kind]}; {fix}")
    unknown = [name for name in saved["strategies"] if name not in STRATEGIES]
    if unknown:
        raise UsageError(f"--resume: {path} names strategies this version does not have "
                         f"({', '.join(map(repr, unknown))}); {fix}")


def _resumed_settings(out: str, saved: dict, settings: dict) -> dict:
    """The config.json of a resume of the run in ``out``, whose config.json holds ``saved``:
    ``settings`` with the strategies, trials and cycles of both runs. UsageError naming every
    setting (RESUME_KEYS, RESUME_DATA_KEYS) that differs from the saved run's, or the split whose
    content differs from the saved fingerprint's (runs written before it was saved have none)."""
    # Keys a run of an older version did not save: compared with the value that version
    # always used where there was one, not compared otherwise.
    saved = {**RESUME_DEFAULTS, **saved}
    different = [(k, saved[k], settings.get(k)) for k in RESUME_KEYS if k in saved and saved[k] != settings.get(k)]
    saved_data, data_now = saved.get("data", {}), settings["data"]
    different += [(f"data {k}", saved_data.get(k), data_now.get(k)) for k in RESUME_DATA_KEYS
                  if saved_data.get(k) != data_now.get(k)]
    if different:
        shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in different)
        raise UsageError(f"--resume with settings that differ from the run in {out} ({shown}); "
                         "use the same settings and data, or another --out")
    if "fingerprint" in saved:
        changed = [split for split in ("train", "test")
                   if saved["fingerprint"].get(split) != settings["fingerprint"][split]]
        if changed:
            raise UsageError(f"--resume with other data than the run in {out}: the {' and '.join(changed)} "
                             "images or labels differ from those the run was written with (the same counts and "
                             "classes, other content); give the run's own data, or start a new run in another --out")
    strategies, trials = _both_runs(saved, settings)
    return {**settings, "strategies": strategies, "trials": trials, "cycles": max(saved["cycles"], settings["cycles"])}


def _both_runs(saved: dict, settings: dict) -> tuple[list[str], int]:
    """The strategies (the saved run's first) and the trials a resume runs: those of both runs."""
    return list(dict.fromkeys(saved["strategies"] + settings["strategies"])), max(saved["trials"], settings["trials"])


def _ordered_records(all_records: dict[tuple[str, int], list[dict]], strategy_order: list[str]) -> list[dict]:
    """The records of every (strategy, trial), in file order: by trial, then by ``strategy_order``
    (strategies not in it last, by name), each run's cycles in order."""
    rank = {s: i for i, s in enumerate(strategy_order)}
    keys = sorted(all_records, key=lambda k: (k[1], rank.get(k[0], len(rank)), k[0]))
    return [r for k in keys for r in all_records[k]]


# ---------------------------------------------------------------------------------------------
# One (strategy, trial): what it carries from cycle to cycle, and its checkpoint


@dataclass
class TrialState:
    """What one (strategy, trial) carries from cycle to cycle: the weights, L and U, its two random
    streams, the cycles done (each ended with its query) and their records.

    Its checkpoint (``to_checkpoint``) also holds the global torch and CUDA random-number states,
    which ``fresh`` seeds and ``from_checkpoint`` restores.
    """

    model: nn.Module
    lossnet: LossNet | None
    labeled: torch.Tensor
    unlabeled: torch.Tensor
    train_generator: torch.Generator
    query_generator: torch.Generator
    cycle: int = 0
    records: list[dict] = field(default_factory=list)

    @classmethod
    def fresh(cls, model: nn.Module, lossnet: LossNet | None, pool_size: int, initial: int, seed: int,
              trial: int) -> TrialState:
        """No cycle done yet: the initial split of ``trial`` and its random streams, derived from
        (``seed``, ``trial``); seeds the global torch RNG."""
        labeled, unlabeled = initial_split(pool_size, initial, _generator(derive_seed(seed, trial, "initial")))
        # Shared by the trial's strategies (common random numbers): CE-only strategies
        # train identically in cycle 1 and differ only through what they query.
        train_generator = _generator(derive_seed(seed, trial, "train"))
        query_generator = _generator(derive_seed(seed, trial, "query"))
        torch.manual_seed(derive_seed(seed, trial, "torch"))
        return cls(model, lossnet, labeled, unlabeled, train_generator, query_generator)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, model: nn.Module, lossnet: LossNet | None,
                        device: torch.device) -> TrialState:
        """The state a checkpoint saved: its weights loaded into ``model`` (and ``lossnet``); sets
        the global torch RNG (and, on a GPU, the CUDA RNG when the checkpoint holds one)."""
        model.load_state_dict(checkpoint["model"])
        if lossnet is not None:
            lossnet.load_state_dict(checkpoint["lossnet"])
        train_generator, query_generator = torch.Generator(), torch.Generator()
        train_generator.set_state(checkpoint["train_generator"])
        query_generator.set_state(checkpoint["query_generator"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
        return cls(model, lossnet, checkpoint["labeled"], checkpoint["unlabeled"], train_generator, query_generator,
                   checkpoint["cycle"], list(checkpoint["records"]))

    def to_checkpoint(self, device: torch.device) -> dict:
        """The checkpoint dict: this state with the weights on the CPU, and the global RNG states."""
        return {
            "cycle": self.cycle, "labeled": self.labeled, "unlabeled": self.unlabeled,
            "model": _cpu_state(self.model),
            "lossnet": None if self.lossnet is None else _cpu_state(self.lossnet),
            "train_generator": self.train_generator.get_state(), "query_generator": self.query_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "records": self.records,
        }


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict, detached, on the CPU."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Run:
    """What every (strategy, trial) of one run_active_learning call shares."""

    config: ALConfig
    data: ALDataset
    strategies: dict[str, Strategy]
    model_factory: ModelFactory
    device: torch.device
    train_split: ImageTensors        # data.train and data.test, placed on the device
    test_split: ImageTensors
    train_config: TrainConfig
    all_records: dict[tuple[str, int], list[dict]]   # every (strategy, trial)'s records so far
    hook: Hook
    log: Callable[[str], None]
    progress: bool                   # show progress bars
    main: bool                       # the process that writes config.out

    def initial_models(self, trial: int, strategy: Strategy) -> tuple[nn.Module, LossNet | None]:
        """The initial weights of ``trial`` (and its LossNet where ``strategy`` trains one)."""
        seed = derive_seed(self.config.seed, trial, "init")
        return _fresh_models(self.data, self.config.preset, self.model_factory, seed, strategy.uses_lossnet, self.device)


class _Trained(NamedTuple):
    """A cycle's training: test accuracy and per-class test accuracy in percent, its seconds."""
    test_acc: float
    per_class_acc: list[float]
    seconds: float


class _Query(NamedTuple):
    """A cycle's query: the subset S it drew, the pool indices picked from S, its seconds."""
    subset: torch.Tensor
    picked: torch.Tensor
    seconds: float


def _open_run(config: ALConfig, data: ALDataset | None, model_factory: ModelFactory, hook: Hook | None,
              log: Callable[[str], None] | None) -> _Run:
    """Check ``config``, load the data (unless given), create or check ``config.out`` and, on a
    resume, read the records of its checkpoints; UsageError for any mistake, before training."""
    main = is_main_process()
    log = (log if main else None) or (lambda _msg: None)
    validate_names(config)
    if data is None:
        data = load_dataset(config.dataset, **config.data_options)
    validate(config, len(data.train))
    device = resolve_device(config.device)
    strategies = {name: make_strategy(name, **strategy_options(config, name)) for name in config.strategies}
    written = on_main_process(lambda: _prepare_out(config, data))
    train_split = place_split(data.train, device)
    test_split = place_split(data.test, device)
    all_records = on_main_process(lambda: load_all_records(config.out, written["strategies"], written["trials"])) \
        if config.resume else {}
    p = config.preset
    progress = config.progress and main
    train_config = TrainConfig(epochs=p.epochs, lr=p.lr, milestones=p.milestones, batch_size=p.batch_size,
                               detach_epoch=p.resolved_detach_epoch(), progress=progress)
    _check_lossnet_fits(data, p, model_factory, [n for n, s in strategies.items() if s.uses_lossnet])
    return _Run(config=config, data=data, strategies=strategies, model_factory=model_factory, device=device,
                train_split=train_split, test_split=test_split, train_config=train_config, all_records=all_records,
                hook=hook or (lambda _event, _info: None), log=log, progress=progress, main=main)


def _start_trial(run: _Run, name: str, strategy: Strategy, trial: int) -> TrialState:
    """(``name``, ``trial``)'s state: from its checkpoint on a resume that has one, else fresh."""
    model, lossnet = run.initial_models(trial, strategy)
    checkpoint = on_main_process(lambda: load_trial_state(run.config.out, name, trial)) if run.config.resume else None
    if checkpoint is not None:
        return TrialState.from_checkpoint(checkpoint, model, lossnet, run.device)
    return TrialState.fresh(model, lossnet, len(run.data.train), run.config.preset.initial, run.config.seed, trial)


def _run_cycle(run: _Run, state: TrialState, name: str, strategy: Strategy, trial: int, cycle: int) -> dict:
    """Cycle ``cycle`` of (``name``, ``trial``): train on L, evaluate, query, move the picks from U
    to L.  -> its record, also appended to ``state.records`` (``state.cycle`` becomes ``cycle``).
    Calls the hook with "trained" after the evaluation and "queried" after the bookkeeping."""
    info = {"strategy": name, "trial": trial, "cycle": cycle}
    trained = _train(run, state, name, strategy, trial, cycle)
    run.hook("trained", info)
    query = _query(run, state, name, strategy)
    trained_on = state.labeled
    state.labeled, state.unlabeled = apply_query(state.labeled, state.unlabeled, query.picked)
    check_partition(state.labeled, state.unlabeled, len(run.data.train))
    record = _record(run, name, strategy, trial, cycle, trained_on, trained, query)
    state.records.append(record)
    state.cycle = cycle
    run.hook("queried", info)
    return record


def _train(run: _Run, state: TrialState, name: str, strategy: Strategy, trial: int, cycle: int) -> _Trained:
    """Train ``state.model`` (and its LossNet) on L, warm or, with ``from_scratch`` after cycle 1,
    from the trial's initial weights; then evaluate it on the test split."""
    if run.config.from_scratch and cycle > 1:
        state.model, state.lossnet = run.initial_models(trial, strategy)
    start = time.perf_counter()
    train(state.model, run.train_split, state.labeled, run.train_config, device=run.device,
          lossnet=state.lossnet if strategy.uses_lossnet else None, generator=state.train_generator,
          desc=f"{name} t{trial} c{cycle} train")
    _sync(run.device)
    seconds = time.perf_counter() - start
    test_acc, per_class = evaluate(state.model, run.test_split, run.device, num_classes=run.data.num_classes)
    return _Trained(test_acc, per_class, seconds)


def _query(run: _Run, state: TrialState, name: str, strategy: Strategy) -> _Query:
    """Draw the subset S from U and let ``strategy`` pick ``budget`` members of it. RuntimeError
    when it returns anything else (a strategy bug)."""
    p = run.config.preset
    start = time.perf_counter()
    # Under torchrun every rank trains its own replica; GPU training is not
    # bit-reproducible, so all ranks query with rank 0's weights (no-op otherwise).
    broadcast_module(state.model)
    if state.lossnet is not None:
        broadcast_module(state.lossnet)
    subset = draw_subset(state.unlabeled, p.subset, state.query_generator)
    context = QueryContext(model=state.model, data=run.train_split, labeled=state.labeled, subset=subset,
                           device=run.device, lossnet=state.lossnet, generator=state.query_generator,
                           progress=run.progress)
    picked = torch.as_tensor(strategy.select(context, p.budget), dtype=torch.int64).cpu()
    _sync(run.device)
    seconds = time.perf_counter() - start
    if picked.numel() != p.budget or not bool(torch.isin(picked, subset).all()):
        raise RuntimeError(f"strategy {name} returned {picked.numel()} indices, not {p.budget} "
                           "members of the subset")
    return _Query(subset, picked, seconds)


def _record(run: _Run, name: str, strategy: Strategy, trial: int, cycle: int, trained_on: torch.Tensor,
            trained: _Trained, query: _Query) -> dict:
    """The results.jsonl record of a cycle that trained on L = ``trained_on``: the gradient-norm
    strategies add their norm, score and backend (Strategy.record_fields); cycle 1 adds the initial
    labeled set."""
    config = run.config
    record = {"strategy": name, "trial": trial, "cycle": cycle, "labeled": int(trained_on.numel()),
              "test_acc": trained.test_acc, "per_class_acc": trained.per_class_acc, "train_s": trained.seconds,
              "query_s": query.seconds, "queried": query.picked.tolist(), "dataset": config.dataset,
              "seed": config.seed, "subset": int(query.subset.numel()), "epochs": config.preset.epochs,
              "device": run.device.type}
    record |= strategy.record_fields()
    if cycle == 1:
        record["initial_indices"] = trained_on.tolist()
    return record


def _save(run: _Run, state: TrialState, name: str, trial: int) -> None:
    """Write (``name``, ``trial``)'s checkpoint atomically, then results.jsonl from every run's
    records (on the main process alone); calls the hook with "saved" and then "written"."""
    info = {"strategy": name, "trial": trial, "cycle": state.cycle}
    if run.main:
        atomic_torch_save(state.to_checkpoint(run.device), checkpoint_path(run.config.out, name, trial))
    run.hook("saved", info)
    run.all_records[(name, trial)] = state.records
    if run.main:
        write_results(run.config.out, _ordered_records(run.all_records, run.config.strategies))
    run.hook("written", info)


def _log_line(record: dict) -> str:
    """One line on a cycle done: who, how many labeled, test accuracy, seconds."""
    r = record
    return (f"{r['strategy']:>13} trial {r['trial']} cycle {r['cycle']}: {r['labeled']:>6} labeled  "
            f"test acc {r['test_acc']:6.2f} %  train {r['train_s']:7.1f} s  query {r['query_s']:6.2f} s")


def _sync(device: torch.device) -> None:
    """Wait for the GPU's queued work (so timings count it); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_active_learning(config: ALConfig, *, data: ALDataset | None = None,
                        model_factory: ModelFactory = default_model, hook: Hook | None = None,
                        log: Callable[[str], None] | None = print) -> list[dict]:
    """Run (or, with ``config.resume``, continue) every (trial, strategy) of ``config``.

    ``hook(event, info)`` is called at "trained", "queried", "saved" and "written" of every cycle
    (tests use it to simulate a kill). Returns all records of ``config.out`` in file order.

    Under torchrun (a default process group with several ranks) every rank runs the loop and
    shares the queries' scoring; rank 0 alone reads and writes ``config.out`` (checkpoints read
    on a resume reach the other ranks through the group, so the folder need not be shared),
    logs and shows progress bars.
    """
    run = _open_run(config, data, model_factory, hook, log)
    p = config.preset
    for trial in range(1, p.trials + 1):
        for name, strategy in run.strategies.items():
            state = _start_trial(run, name, strategy, trial)
            for cycle in range(state.cycle + 1, p.cycles + 1):
                record = _run_cycle(run, state, name, strategy, trial, cycle)
                _save(run, state, name, trial)
                run.log(_log_line(record))

    records = _ordered_records(run.all_records, config.strategies)
    if run.main:
        write_results(config.out, records)
    return records
