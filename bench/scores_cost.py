"""What the scores beyond the entropy cost, against the entropy score on the same model and pool.

    python bench/scores_cost.py [--width 16 --batch 32 --pool 128 --repeats 5 --threads 2 --loop-samples 4]

Model: CIFAR ResNet-18 (gradnorm_engine.al.models.cifar_resnet18, --width), 10 classes, eval
mode, random 3x32x32 inputs, backend "hooks", one chunk per --batch. Rows, interleaved round by
round in one process (load from other processes hits them alike), median seconds per sample:
  entropy        score_pool(score="entropy")              the reference cost: one pass
  cross_entropy  score_pool(score="cross_entropy")        label-aware, the same pass
  per_parameter  per_parameter_sqnorms(group="module")    the same pass, [N, modules]
  egl            expected_gradient_length                  one forward + C backward passes
  egl_top3       expected_gradient_length(top_m=3)        one forward + 3 backward passes
  egl_loop       a per-sample, per-class backward loop     the naive exact EGL (--loop-samples)
The EGL rows are reported next to C x the entropy row's time (what C separate passes cost).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gradnorm_engine import expected_gradient_length, per_parameter_sqnorms, score_pool
from gradnorm_engine.al.models import cifar_resnet18


def egl_loop(model, x) -> torch.Tensor:
    out = []
    params = list(model.parameters())
    for b in range(len(x)):
        logits = model(x[b:b + 1])
        p = logits.softmax(-1)[0].detach()
        total = 0.0
        for c in range(logits.shape[1]):
            grads = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([c])), params, retain_graph=True)
            total += float(p[c]) * float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        out.append(total)
    return torch.tensor(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pool", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loop-samples", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = cifar_resnet18(num_classes=10, width=args.width).eval()
    x = torch.randn(args.pool, 3, 32, 32)
    y = torch.randint(0, 10, (args.pool,))
    pool = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, args.pool, args.batch)]
    common = dict(backend="hooks", chunk_size=args.batch, progress=False)
    rows = {
        "entropy": (args.pool, lambda: score_pool(model, pool, **common)),
        "cross_entropy": (args.pool, lambda: score_pool(model, pool, score="cross_entropy", **common)),
        "per_parameter": (args.pool, lambda: per_parameter_sqnorms(model, pool, group="module", **common)),
        "egl": (args.pool, lambda: expected_gradient_length(model, pool, **common)),
        "egl_top3": (args.pool, lambda: expected_gradient_length(model, pool, top_m=3, **common)),
    }
    if args.loop_samples:
        rows["egl_loop"] = (args.loop_samples, lambda: egl_loop(model, x[:args.loop_samples]))
    for _, fn in rows.values():   # warm-up outside the clock (and the hooks self-check)
        fn()
    seconds = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, (n, fn) in rows.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append((time.perf_counter() - t0) / n)
    got = expected_gradient_length(model, [x[:args.loop_samples]], progress=False)
    want = egl_loop(model, x[:args.loop_samples])
    base = statistics.median(seconds["entropy"])
    print(f"CIFAR ResNet-18 width {args.width}, batch {args.batch}, pool {args.pool}, {args.threads} threads, "
          f"{args.repeats} rounds; EGL vs the loop: max rel err {float(((got - want).abs() / want).max()):.1e}")
    print("| row | ms per sample (median) | x entropy | note |")
    print("|---|---|---|---|")
    notes = {"egl": "C = 10 passes would be 10.0x", "egl_top3": "3 passes would be 3.0x",
             "egl_loop": f"on {args.loop_samples} samples"}
    for name in rows:
        med = statistics.median(seconds[name])
        print(f"| {name} | {med * 1e3:.2f} | {med / base:.2f}x | {notes.get(name, 'the same pass')} |")


if __name__ == "__main__":
    main()
