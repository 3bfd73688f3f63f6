"""BADGE's selection on a synthetic pool: time and peak memory of the factorised k-means++ seeding.

    python bench/badge_selection.py [--n 20000 --classes 100 --features 768 --k 1,10,100] [--device cpu]

The pool: features h [N, D] ~ N(0, 1) and probabilities p = softmax(2 z), z [N, C] ~ N(0, 1),
made before the clock starts. Timed: gradnorm_engine.badge.kmeans_pp_gradient_embeddings for each
k (median of --repeats; each k on fresh generators). Peak memory: the working memory of one
selection above what the pool itself takes (RSS high water on CPU, max_memory_allocated on
CUDA). For scale, the embeddings materialised would take N * C * D * 4 bytes (float32).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradnorm_engine.badge import kmeans_pp_gradient_embeddings
from gradnorm_engine.benchmark.timing import PeakMemory, synchronize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--features", type=int, default=768)
    p.add_argument("--k", default="1,10,100")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.n, args.features, generator=g).to(device)
    probs = torch.randn(args.n, args.classes, generator=g).mul(2).softmax(dim=1).to(device)
    materialised_gb = args.n * args.classes * args.features * 4 / 1e9
    print(f"pool: N={args.n}, C={args.classes}, D={args.features}, {device}, {torch.get_num_threads()} threads; "
          f"materialised float32 embeddings would take {materialised_gb:.1f} GB")
    print("| k | seconds (median) | seconds per pick | peak working memory (MiB) |")
    print("|---|---|---|---|")
    for k in (int(v) for v in args.k.split(",")):
        seconds = []
        peak = None
        for r in range(args.repeats):
            synchronize(device)
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                kmeans_pp_gradient_embeddings(h, probs, k, torch.Generator().manual_seed(r))
                synchronize(device)
                seconds.append(time.perf_counter() - t0)
            peak = mem.mb if peak is None else max(peak, mem.mb or 0)
        median = statistics.median(seconds)
        print(f"| {k} | {median:.3f} | {median / k:.4f} | {peak:.0f} ({mem.method}) |")


if __name__ == "__main__":
    main()
