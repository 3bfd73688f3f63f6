"""How far fp32 scores land from float64, and how much of that the engine adds to the batched forward.

    python bench/precision_fp32.py                                   # both models, every backend
    python bench/precision_fp32.py --model torchvision --pool 300 --chunk 64 --norm tensor_sum

Data: scikit-learn's 8x8 digits (bundled, no download), upsampled to --size x --size (bilinear,
default 16) and standardised, one channel (--channels 3 repeats it three times). Models, trained
--epochs epochs on --train digits (BatchNorm learns its running statistics), then scored in eval
mode on --pool other digits:
  torchvision  torchvision.models.resnet18(num_classes=10), its 7x7 stem conv taking --channels
               channels (everything else as torchvision builds it: stride-2 stem, max-pool)
  cifar        gradnorm_engine.al.models.cifar_resnet18(in_channels=--channels, width=--width)

Per sample, the score is the gradient norm of the softmax entropy (``--norm``), computed by:
  float64     the model in float64, one sample at a time (the truth the others are held to)
  loop fp32   one fp32 forward + backward per sample (what a user's own check runs)
  batched     the same fp32 batched forward as the engine (the pool in the engine's chunks),
  reference   then for each sample b autograd.grad(loss_b) through that batch's graph: in eval
              mode that is sample b's exact gradient through the batched kernels; squares summed
              in float64
  engine      score_pool(model, loader, backend=..., chunk_size=--chunk) in fp32
The table gives each one's relative error |s - s64| / s64 over the pool (p50, p99, max), the
engine against (a) and against (c), the largest error as a share of the pool's largest score (the
measure tests/ use), and how many of float64's top tenth each keeps. The engine adds error of its
own where its column exceeds the batched reference's; --where lists the parameters whose
per-sample squared norms differ most between the engine and the batched reference (as a share of
the sample's total). Below the table: where the worst samples' scores lie in the pool, the fp32
loop with only the entropy in float64, the backends of --float64 run in float64, and how far each
forward's logits are from float64's. The
vmap backend runs kernels of its own (its logits differ from the batched forward's about as much
as batch 1's do), so its "engine vs (a)" holds its own forward and backward as well.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

# The checkout this script lives in, not whichever gradnorm_engine is installed: ``python
# bench/...`` puts bench/ first on sys.path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, vmap  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import gradnorm_engine  # noqa: E402
from gradnorm_engine import score_pool  # noqa: E402
from gradnorm_engine.backends import BACKENDS  # noqa: E402
from gradnorm_engine.job import eval_mode, make_job  # noqa: E402
from gradnorm_engine.reduction import reduce_sqnorms  # noqa: E402
from gradnorm_engine.scores import resolve_score  # noqa: E402

MODELS = ("torchvision", "cifar")
BACKEND_NAMES = ("hooks", "vmap", "loop")


def digits(size: int, channels: int, n_train: int, n_pool: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train inputs [n_train, channels, size, size], their labels, pool inputs [n_pool, channels, size, size])."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    if n_train + n_pool > len(X):
        raise SystemExit(f"--train + --pool must be at most {len(X)} (the digits data set)")
    x = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - x.mean()) / x.std()).repeat(1, channels, 1, 1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], torch.tensor(y)[order]
    return x[:n_train], y[:n_train], x[n_train:n_train + n_pool].contiguous()


def build_model(name: str, width: int, channels: int) -> nn.Module:
    if name == "torchvision":
        from torchvision.models import resnet18

        model = resnet18(num_classes=10)
        if channels != 3:
            model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return model
    from gradnorm_engine.al.models import cifar_resnet18

    return cifar_resnet18(num_classes=10, in_channels=channels, width=width)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> float:
    """A few epochs of Adam; -> the last epoch's training accuracy."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    correct = 0
    for _ in range(epochs):
        correct = 0
        for xb, yb in DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True,
                                 generator=torch.Generator().manual_seed(1)):
            optimizer.zero_grad()
            out = model(xb)
            F.cross_entropy(out, yb).backward()
            optimizer.step()
            correct += int((out.argmax(1) == yb).sum())
    model.eval()
    return correct / len(x)


def per_sample_loop(model: nn.Module, x: torch.Tensor, loss_fn) -> torch.Tensor:
    """One forward + backward per sample (batch 1) in the model's dtype.  -> [N, P] float64"""
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.zeros(len(x), len(params), dtype=torch.float64)
    for i in range(len(x)):
        loss = loss_fn(model(x[i:i + 1]))[0]
        for j, g in enumerate(torch.autograd.grad(loss, params)):
            out[i, j] = g.double().pow(2).sum()
    return out


def batched_reference(model: nn.Module, x: torch.Tensor, loss_fn, chunk: int) -> torch.Tensor:
    """The engine's batched forward, chunk by chunk, and each sample's gradient through it.  -> [N, P]"""
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.zeros(len(x), len(params), dtype=torch.float64)
    for start in range(0, len(x), chunk):
        xb = x[start:start + chunk].clone()   # own memory, as the engine's chunks
        losses = loss_fn(model(xb))
        for b in range(len(xb)):
            grads = torch.autograd.grad(losses[b], params, retain_graph=b + 1 < len(xb))
            for j, g in enumerate(grads):
                out[start + b, j] = g.double().pow(2).sum()
    return out


@torch.no_grad()
def logit_errors(model: nn.Module, model64: nn.Module, x: torch.Tensor, chunk: int) -> dict[str, float]:
    """How far each forward's logits are from float64's, as a share of the largest: the batched forward
    (in chunks), one sample at a time, and vmap's (which folds the samples into its own kernels)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    one = lambda xi: functional_call(model, (params, buffers), (xi.unsqueeze(0),))[0]  # noqa: E731
    outs = {"batched": torch.cat([model(x[s:s + chunk].clone()) for s in range(0, len(x), chunk)]),
            "batch-1": torch.cat([model(x[i:i + 1]) for i in range(len(x))]),
            "vmap": torch.cat([vmap(one)(x[s:s + chunk].clone()) for s in range(0, len(x), chunk)])}
    truth = model64(x.double())
    scale = truth.abs().max()
    errors = {k: float((v.double() - truth).abs().max() / scale) for k, v in outs.items()}
    errors["vmap vs batched"] = float((outs["vmap"] - outs["batched"]).abs().max() / scale)
    return errors


def engine_sqnorms(model: nn.Module, x: torch.Tensor, backend: str, chunk: int) -> torch.Tensor:
    """The backend's per-parameter squared norms, chunk by chunk as score_pool runs it.  -> [N, P]"""
    job = make_job(model, score="entropy", params=None, logits_fn=None, device=None, autocast=None,
                   max_memory=None, options={"chunk_size": chunk})
    parts = []
    with eval_mode(model), torch.enable_grad():
        engine = BACKENDS[backend](job)
        try:
            for start in range(0, len(x), chunk):
                parts.append(engine.sqnorms(x[start:start + chunk].clone()).double())
        finally:
            engine.close()
    return torch.cat(parts)


def rel_err(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    return ((scores.double() - truth).abs() / truth).float()


def of_largest(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """max |s - s64| / max s64: the error on the scale of the samples a ranking picks (as tests/ measure)."""
    return float((scores.double() - truth).abs().max() / truth.max())


def top_overlap(scores: torch.Tensor, truth: torch.Tensor, k: int) -> str:
    """How many of float64's top k the scores also rank in their top k."""
    same = set(scores.double().topk(k).indices.tolist()) & set(truth.topk(k).indices.tolist())
    return f"{len(same)}/{k}"


def stats(err: torch.Tensor) -> str:
    q = torch.quantile(err, torch.tensor([0.5, 0.99]))
    return f"{q[0]:.2e} / {q[1]:.2e} / {err.max():.2e}"


def measure(args, model_name: str) -> None:
    torch.manual_seed(0)
    x_train, y_train, pool = digits(args.size, args.channels, args.train, args.pool)
    model = build_model(model_name, args.width, args.channels)
    accuracy = train(model, x_train, y_train, args.epochs)
    loss_fn = resolve_score("entropy")
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    t0 = time.perf_counter()
    model64 = copy.deepcopy(model).double().eval()
    truth_sq = per_sample_loop(model64, pool.double(), loss_fn)
    truth = reduce_sqnorms(truth_sq, args.norm)
    loop_sq = per_sample_loop(model, pool, loss_fn)
    # the same loop with only the entropy (logits [1, C] -> loss) in float64: how much of the
    # error is the loss's own fp32 rounding rather than the network's
    loss64_sq = per_sample_loop(model, pool, lambda logits: loss_fn(logits.double()))
    batched_sq = batched_reference(model, pool, loss_fn, args.chunk)
    forward_errors = logit_errors(model, model64, pool, args.chunk)
    seconds = time.perf_counter() - t0

    pixels = f"{args.channels}x{args.size}x{args.size}"
    title = model_name if model_name == "torchvision" else f"cifar (width {args.width})"
    print(f"\n### {title}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"inputs {pixels}, train accuracy {accuracy:.2f} after {args.epochs} epochs, "
          f"pool {args.pool}, chunk {args.chunk}, norm {args.norm}\n")
    print("| backend | (a) batched fp32 reference p50 / p99 / max | (b) engine p50 / p99 / max "
          "| (c) batch-1 fp32 loop p50 / p99 / max | engine vs (a) p50 / p99 / max | engine vs (c) p50 / p99 / max "
          "| max error / largest score "
          "(a) / (b) / (c) | top-k of float64 kept (b) / (c) |")
    print("|---|---|---|---|---|---|---|---|")
    loop_scores = reduce_sqnorms(loop_sq, args.norm)
    loop_err = rel_err(loop_scores, truth)
    k = max(1, args.pool // 10)
    kept = lambda scores: f"{top_overlap(scores, truth, k)} / {top_overlap(loop_scores, truth, k)}"  # noqa: E731
    of_top = lambda scores, ref: (f"{of_largest(ref, truth):.1e} / " if ref is not None else "- / ") + \
        f"{of_largest(scores, truth):.1e} / {of_largest(loop_scores, truth):.1e}"  # noqa: E731
    where = {}
    for backend in args.backends:
        t1 = time.perf_counter()
        loader = DataLoader(TensorDataset(pool), batch_size=args.chunk)
        scores = score_pool(model, loader, backend=backend, norm=args.norm, chunk_size=args.chunk, progress=False)
        engine_err = rel_err(scores, truth)
        seconds += time.perf_counter() - t1
        if backend == "loop":   # batch 1 by construction: its reference is (c)
            ref = reduce_sqnorms(loop_sq, args.norm)
            cells = ["n/a (batch 1)", stats(engine_err), stats(loop_err), stats(rel_err(scores, ref)),
                     stats(rel_err(scores, loop_scores.double())), of_top(scores, None), kept(scores)]
        else:
            ref = reduce_sqnorms(batched_sq, args.norm)
            cells = [stats(rel_err(ref, truth)), stats(engine_err), stats(loop_err), stats(rel_err(scores, ref)),
                     stats(rel_err(scores, loop_scores.double())), of_top(scores, ref), kept(scores)]
            if args.where:
                where[backend] = engine_sqnorms(model, pool, backend, args.chunk)
        print(f"| {backend} | " + " | ".join(cells) + " |")
    # where the error is: the samples whose fp32 loop error is in the pool's worst 1%
    worst = loop_err >= torch.quantile(loop_err, 0.99)
    print(f"\nThe {int(worst.sum())} samples with the largest batch-1 loop errors ({loop_err[worst].min():.1e} and "
          f"more) have float64 scores {truth[worst].min() / truth.median():.1e} to "
          f"{truth[worst].max() / truth.median():.1e} times the pool's median score "
          f"(the pool's smallest: {truth.min() / truth.median():.1e}).")
    print("The batch-1 fp32 loop with only the entropy in float64 (of its fp32 logits): p50 / p99 / max "
          f"{stats(rel_err(reduce_sqnorms(loss64_sq, args.norm), truth))}.")
    for backend in args.float64:
        scores64 = score_pool(model64, DataLoader(TensorDataset(pool.double()), batch_size=args.chunk),
                              backend=backend, norm=args.norm, chunk_size=args.chunk, progress=False)
        print(f"The {backend} backend in float64 (model and inputs) against the float64 loop: "
              f"p50 / p99 / max {stats(rel_err(scores64, truth))}.")
    print(f"Logits, max |z - z64| / max |z64|: batched {forward_errors['batched']:.1e}, batch-1 "
          f"{forward_errors['batch-1']:.1e}, vmap {forward_errors['vmap']:.1e} (vmap vs batched: "
          f"{forward_errors['vmap vs batched']:.1e}).")
    for backend, sq in where.items():
        # each parameter's share of the score's relative deviation from the batched reference
        share = (sq - batched_sq).abs() / (2 * batched_sq.sum(dim=1, keepdim=True))
        ref_share = (batched_sq - truth_sq).abs() / (2 * truth_sq.sum(dim=1, keepdim=True))
        top = share.max(dim=0).values.argsort(descending=True)[:args.where]
        print(f"\n{backend}: parameters where the engine's squared norms differ most from the batched "
              "reference, |engine - (a)| / (2 * sample's total), max over the pool (beside it, (a)'s own "
              "deviation from float64, same measure)\n")
        print("| parameter | engine vs (a) max | (a) vs float64 max |")
        print("|---|---|---|")
        for j in top.tolist():
            print(f"| {names[j]} | {share[:, j].max():.1e} | {ref_share[:, j].max():.1e} |")
    print(f"\n({seconds:.0f} s to score, training aside)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=(*MODELS, "all"), default="all")
    parser.add_argument("--backends", default=",".join(BACKEND_NAMES),
                        help="comma-separated, from " + ", ".join(BACKEND_NAMES))
    parser.add_argument("--norm", choices=("frobenius", "tensor_sum"), default="frobenius")
    parser.add_argument("--pool", type=int, default=300, help="samples scored")
    parser.add_argument("--train", type=int, default=1000, help="samples trained on")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (8: train accuracy 1.00)")
    parser.add_argument("--size", type=int, default=16, help="input height and width (digits are 8x8)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    parser.add_argument("--width", type=int, default=16, help="stage width of the cifar model")
    parser.add_argument("--chunk", type=int, default=64, help="samples per chunk (engine and batched reference)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--float64", default="hooks",
                        help="comma-separated backends also run in float64 against the float64 loop ('' for none)")
    parser.add_argument("--where", type=int, default=5, help="parameters listed per backend (0: none)")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.float64 = [b.strip() for b in args.float64.split(",") if b.strip()]
    unknown = sorted(set(args.backends + args.float64) - set(BACKEND_NAMES))
    if unknown:
        parser.error(f"unknown backend(s) {unknown}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, gradnorm_engine from {Path(gradnorm_engine.__file__).parent}; "
          f"command: python bench/precision_fp32.py {' '.join(sys.argv[1:])}", flush=True)
    for name in (MODELS if args.model == "all" else (args.model,)):
        measure(args, name)


if __name__ == "__main__":
    main()
