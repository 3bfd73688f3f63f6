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

import torch
from torch import nn

from ..backends import check_backend_name
from ..devices import resolve_device
from ..distributed import broadcast_module, is_main_process, on_main_process
from ..errors import UsageError
from ..reduction import NORMS
from .datasets import ALDataset, load_dataset
from .lossnet import LossNet, has_stage_taps, lossnet_for
from .models import cifar_resnet18
from .presets import Preset, check_settings
from .run_folder import (CONFIG, RESULTS, atomic_torch_save, atomic_write_bytes, check_checkpoints_cover_results,
                         checkpoint_path, load_all_records, load_trial_state, make_out_folder, write_results)
from .strategies import STRATEGIES, QueryContext, make_strategy
from .trainer import TrainConfig, evaluate, place_split, train


# Settings a resumed run must share with the run it continues; cycles, trials and the
# strategy list may grow.
RESUME_KEYS = ("dataset", "seed", "initial", "budget", "subset", "epochs", "lr", "milestones", "batch_size",
               "detach_epoch", "width", "from_scratch", "norm", "score", "pool")
# Data options a resumed run must share too (paths to the data may move; what is read from them
# may not: the pool fact above catches a different folder with the same options).
RESUME_DATA_KEYS = ("train_root", "test_root", "image_size")
# What runs written before a key was saved used (they could use nothing else).
RESUME_DEFAULTS = {"score": "entropy"}

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
# The loop


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


def _prepare_out(config: ALConfig, data: ALDataset) -> None:
    """Create ``config.out`` and write its config.json, or check it against the run there."""
    make_out_folder(config.out)
    settings = config.settings()
    settings["pool"] = {"train": len(data.train), "test": len(data.test), "classes": list(data.classes)}
    path = os.path.join(config.out, CONFIG)
    exists = os.path.exists(path) or os.path.exists(os.path.join(config.out, RESULTS))
    if exists and not config.resume:
        raise UsageError(f"{config.out} already holds a run; pass --resume to continue it or choose another --out")
    if config.resume:
        check_checkpoints_cover_results(config.out)
    if config.resume and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        # Keys a run of an older version did not save: compared with the value that version
        # always used where there was one, not compared otherwise.
        saved = {**RESUME_DEFAULTS, **saved}
        different = [(k, saved[k], settings.get(k)) for k in RESUME_KEYS if k in saved and saved[k] != settings.get(k)]
        saved_data, data_now = saved.get("data", {}), settings["data"]
        different += [(f"data {k}", saved_data.get(k), data_now.get(k)) for k in RESUME_DATA_KEYS
                      if saved_data.get(k) != data_now.get(k)]
        if different:
            shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in different)
            raise UsageError(f"--resume with settings that differ from the run in {config.out} ({shown}); "
                             "use the same settings and data, or another --out")
        settings["strategies"] = list(dict.fromkeys(saved.get("strategies", []) + settings["strategies"]))
        settings["trials"] = max(saved.get("trials", 0), settings["trials"])
        settings["cycles"] = max(saved.get("cycles", 0), settings["cycles"])
    atomic_write_bytes(path, (json.dumps(settings, indent=2) + "\n").encode())


def _ordered_records(all_records: dict[tuple[str, int], list[dict]], strategy_order: list[str]) -> list[dict]:
    rank = {s: i for i, s in enumerate(strategy_order)}
    keys = sorted(all_records, key=lambda k: (k[1], rank.get(k[0], len(rank)), k[0]))
    return [r for k in keys for r in all_records[k]]


def _sync(device: torch.device) -> None:
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
    main = is_main_process()
    log = (log if main else None) or (lambda _msg: None)
    progress = config.progress and main
    validate_names(config)
    if data is None:
        data = load_dataset(config.dataset, **config.data_options)
    pool_size = len(data.train)
    validate(config, pool_size)
    device = resolve_device(config.device)
    strategies = {name: make_strategy(name, **strategy_options(config, name)) for name in config.strategies}
    on_main_process(lambda: _prepare_out(config, data))
    train_split = place_split(data.train, device)
    test_split = place_split(data.test, device)
    all_records = on_main_process(lambda: load_all_records(config.out)) if config.resume else {}
    hook = hook or (lambda _event, _info: None)
    p = config.preset
    train_config = TrainConfig(epochs=p.epochs, lr=p.lr, milestones=p.milestones, batch_size=p.batch_size,
                               detach_epoch=p.resolved_detach_epoch(), progress=progress)

    _check_lossnet_fits(data, p, model_factory, [n for n, s in strategies.items() if s.uses_lossnet])
    for trial in range(1, p.trials + 1):
        for name, strategy in strategies.items():
            path = checkpoint_path(config.out, name, trial)
            init_seed = derive_seed(config.seed, trial, "init")
            model, lossnet = _fresh_models(data, p, model_factory, init_seed, strategy.uses_lossnet, device)
            state = on_main_process(lambda: load_trial_state(path)) if config.resume else None
            if state is not None:
                model.load_state_dict(state["model"])
                if lossnet is not None:
                    lossnet.load_state_dict(state["lossnet"])
                labeled, unlabeled = state["labeled"], state["unlabeled"]
                train_generator, query_generator = torch.Generator(), torch.Generator()
                train_generator.set_state(state["train_generator"])
                query_generator.set_state(state["query_generator"])
                torch.set_rng_state(state["torch_rng"])
                if device.type == "cuda" and state.get("cuda_rng") is not None:
                    torch.cuda.set_rng_state(state["cuda_rng"], device)
                done, records = state["cycle"], list(state["records"])
            else:
                labeled, unlabeled = initial_split(pool_size, p.initial, _generator(derive_seed(config.seed, trial, "initial")))
                # Shared by the trial's strategies (common random numbers): CE-only strategies
                # train identically in cycle 1 and differ only through what they query.
                train_generator = _generator(derive_seed(config.seed, trial, "train"))
                query_generator = _generator(derive_seed(config.seed, trial, "query"))
                torch.manual_seed(derive_seed(config.seed, trial, "torch"))
                done, records = 0, []
            if done >= p.cycles:
                continue

            for cycle in range(done + 1, p.cycles + 1):
                info = {"strategy": name, "trial": trial, "cycle": cycle}
                if config.from_scratch and cycle > 1:
                    model, lossnet = _fresh_models(data, p, model_factory, init_seed, strategy.uses_lossnet, device)
                start = time.perf_counter()
                train(model, train_split, labeled, train_config, device=device,
                      lossnet=lossnet if strategy.uses_lossnet else None, generator=train_generator,
                      desc=f"{name} t{trial} c{cycle} train")
                _sync(device)
                train_s = time.perf_counter() - start
                test_acc, per_class = evaluate(model, test_split, device, num_classes=data.num_classes)
                hook("trained", info)

                start = time.perf_counter()
                # Under torchrun every rank trains its own replica; GPU training is not
                # bit-reproducible, so all ranks query with rank 0's weights (no-op otherwise).
                broadcast_module(model)
                if lossnet is not None:
                    broadcast_module(lossnet)
                subset = draw_subset(unlabeled, p.subset, query_generator)
                context = QueryContext(model=model, data=train_split, labeled=labeled, subset=subset, device=device,
                                       lossnet=lossnet, generator=query_generator, progress=progress)
                picked = torch.as_tensor(strategy.select(context, p.budget), dtype=torch.int64).cpu()
                _sync(device)
                query_s = time.perf_counter() - start
                if picked.numel() != p.budget or not bool(torch.isin(picked, subset).all()):
                    raise RuntimeError(f"strategy {name} returned {picked.numel()} indices, not {p.budget} "
                                       "members of the subset")
                trained_on = labeled.numel()
                labeled, unlabeled = apply_query(labeled, unlabeled, picked)
                check_partition(labeled, unlabeled, pool_size)
                record = {"strategy": name, "trial": trial, "cycle": cycle, "labeled": int(trained_on),
                          "test_acc": test_acc, "per_class_acc": per_class, "train_s": train_s, "query_s": query_s,
                          "queried": picked.tolist(), "dataset": config.dataset, "seed": config.seed,
                          "subset": int(subset.numel()), "epochs": p.epochs, "device": device.type}
                if getattr(strategy, "last_backend", None):
                    record |= {"norm": config.norm, "score": config.score, "backend": strategy.last_backend}
                if cycle == 1:
                    record["initial_indices"] = labeled[:trained_on].tolist()
                records.append(record)
                hook("queried", info)

                state = {
                    "cycle": cycle, "labeled": labeled, "unlabeled": unlabeled,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "lossnet": None if lossnet is None else {k: v.detach().cpu() for k, v in lossnet.state_dict().items()},
                    "train_generator": train_generator.get_state(), "query_generator": query_generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "records": records,
                }
                if main:
                    atomic_torch_save(state, path)
                hook("saved", info)
                all_records[(name, trial)] = records
                if main:
                    write_results(config.out, _ordered_records(all_records, config.strategies))
                hook("written", info)
                log(f"{name:>13} trial {trial} cycle {cycle}: {trained_on:>6} labeled  test acc {test_acc:6.2f} %  "
                    f"train {train_s:7.1f} s  query {query_s:6.2f} s")

    records = _ordered_records(all_records, config.strategies)
    if main:
        write_results(config.out, records)
    return records

