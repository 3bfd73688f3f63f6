"""The analyses of docs/reproduction.md that `gradnorm-engine report` does not make.

    python scripts/reproduction_extras.py results/repro-cpu

Reads the run folder of `gradnorm-engine al` (config.json, results.jsonl, checkpoints/) and writes
into it:
- ablation.md: LPLgrad with its auxiliary model (lplgrad) against the same query without it
  (ent-gradnorm: cross-entropy training only), mean +- sample std per labeled-set size, and the gap;
- confidence.png: max-softmax confidence of the final LPLgrad model (trial 1) on the samples it
  was trained on (labeled) and on the rest of the pool (unlabeled);
- engine_speed.md: the query step's gradient-norm scoring with the engine's `hooks` backend
  against the per-sample loop of the reference code, on the run's model and images.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from gradnorm_engine import score_pool  # noqa: E402
from gradnorm_engine.al.run_folder import read_results  # noqa: E402
from gradnorm_engine.al.datasets import load_dataset  # noqa: E402
from gradnorm_engine.al.models import cifar_resnet18  # noqa: E402


def by_size(records: list[dict], strategy: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in records:
        if r["strategy"] == strategy:
            out.setdefault(r["labeled"], []).append(r["test_acc"])
    return out


def ablation_table(records: list[dict]) -> str:
    with_aux, without = by_size(records, "lplgrad"), by_size(records, "ent-gradnorm")
    lines = ["| labeled | LPLgrad (with auxiliary model) | without (ent-gradnorm) | gap (points) | trials |",
             "|---|---|---|---|---|"]
    for size in sorted(set(with_aux) & set(without)):
        a, b = np.array(with_aux[size]), np.array(without[size])
        lines.append(f"| {size:,} | {a.mean():.1f} +- {a.std(ddof=1):.1f} | {b.mean():.1f} +- {b.std(ddof=1):.1f} | "
                     f"{a.mean() - b.mean():+.1f} | {len(a)} / {len(b)} |")
    return "\n".join(lines) + "\n"


def load_run(run: str):
    config = json.load(open(os.path.join(run, "config.json")))
    d = config["data"]
    data = load_dataset(config["dataset"], root=d["root"], path=d["path"], train_root=d["train_root"],
                        test_path=d["test_path"], test_root=d["test_root"], image_size=d["image_size"])
    return config, data


def final_model(run: str, config: dict, data, strategy: str = "lplgrad", trial: int = 1):
    ckpt = torch.load(os.path.join(run, "checkpoints", strategy, f"trial{trial}.pt"), map_location="cpu",
                      weights_only=False)
    model = cifar_resnet18(num_classes=data.num_classes, in_channels=data.in_channels, width=config["width"])
    model.load_state_dict(ckpt["model"])
    # The checkpoint's labeled set already holds the last cycle's query; the model was trained
    # on the labeled set before it.
    last = ckpt["records"][-1]
    trained_on = sorted(set(ckpt["labeled"].tolist()) - set(last["queried"]))
    return model.eval(), torch.tensor(trained_on), ckpt["unlabeled"], last


@torch.no_grad()
def confidences(model, split, indices: torch.Tensor, batch: int = 500) -> torch.Tensor:
    out = []
    for part in indices.split(batch):
        x, _ = split.batch(part, "cpu", augment=False)
        out.append(model(x).softmax(-1).max(-1).values)
    return torch.cat(out)


def confidence_figure(run: str, model, data, labeled, unlabeled, last) -> str:
    gen = torch.Generator().manual_seed(0)
    pool_sample = unlabeled[torch.randperm(unlabeled.numel(), generator=gen)[:5000]]
    conf_l = confidences(model, data.train, labeled)
    conf_u = confidences(model, data.train, pool_sample)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    bins = np.linspace(0, 1, 26)
    ax.hist(conf_l.numpy(), bins=bins, alpha=0.6, density=True, label=f"labeled ({labeled.numel():,})")
    ax.hist(conf_u.numpy(), bins=bins, alpha=0.6, density=True, label=f"unlabeled (5,000 of {unlabeled.numel():,})")
    ax.set_xlabel("max softmax probability")
    ax.set_ylabel("density")
    ax.set_title(f"LPLgrad, trial 1, model of cycle {last['cycle']} ({last['labeled']:,} labeled)")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(run, "confidence.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return (f"mean confidence: labeled {conf_l.mean():.3f}, unlabeled {conf_u.mean():.3f}; "
            f"share above 0.9: labeled {(conf_l > 0.9).float().mean():.1%}, unlabeled {(conf_u > 0.9).float().mean():.1%}")


def engine_speed(model, data, config, n_fast: int = 1000, n_loop: int = 100) -> str:
    """Samples/s of the query's scoring: hooks (what the loop ran) against the per-sample loop."""
    gen = torch.Generator().manual_seed(1)
    idx = torch.randperm(len(data.train), generator=gen)[:n_fast]
    x, _ = data.train.batch(idx, "cpu", augment=False)
    rows = []
    fast_scores = None
    for backend, n in (("hooks", n_fast), ("vmap", n_loop), ("loop", n_loop)):
        xs = x[:n]
        loader = [xs[i:i + 100] for i in range(0, n, 100)]
        score_pool(model, [xs[:8]], backend=backend, norm=config["norm"], progress=False)  # warm-up
        t0 = time.perf_counter()
        s = score_pool(model, loader, backend=backend, norm=config["norm"], progress=False)
        dt = time.perf_counter() - t0
        if fast_scores is None:
            fast_scores = s
        err = float(((s - fast_scores[:n]).abs() / fast_scores[:n].abs()).max())
        rows.append((backend, n, n / dt, err))
    loop_rate = rows[-1][2]
    lines = ["| backend | samples | samples/s | x loop | max rel. diff vs hooks |", "|---|---|---|---|---|"]
    lines += [f"| {b} | {n:,} | {r:,.1f} | {r / loop_rate:.1f} | {e:.1e} |" for b, n, r, e in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="the folder of a `gradnorm-engine al` run")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    records = read_results(args.run)
    with open(os.path.join(args.run, "ablation.md"), "w") as f:
        f.write(ablation_table(records))
    config, data = load_run(args.run)
    model, labeled, unlabeled, last = final_model(args.run, config, data)
    summary = confidence_figure(args.run, model, data, labeled, unlabeled, last)
    with open(os.path.join(args.run, "confidence.md"), "w") as f:
        f.write(summary + "\n")
    with open(os.path.join(args.run, "engine_speed.md"), "w") as f:
        f.write(f"CPU, {args.threads} threads, the run's CIFAR ResNet-18 (width {config['width']}), "
                f"norm={config['norm']}\n\n" + engine_speed(model, data, config))
    for name in ("ablation.md", "confidence.md", "engine_speed.md"):
        print(f"== {name}\n" + open(os.path.join(args.run, name)).read())


if __name__ == "__main__":
    main()
