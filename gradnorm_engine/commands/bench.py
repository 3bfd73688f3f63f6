"""``gradnorm-engine bench``: every way of getting per-sample gradient norms, side by side.

    gradnorm-engine bench --device cpu --model resnet18 --batch-size 32 --json bench.json
    gradnorm-engine bench --quick                                   # a CPU smoke, about a minute
    gradnorm-engine bench --chunk-sizes 8,16,32,64                  # engine backends by chunk size
    gradnorm-engine bench --no-methods --scaling 1000,4000,16000    # rank_unlabeled vs pool size

Prints a table and, with ``--json FILE``, writes the records (a header with the machine,
versions and this command, then one row per method) and a plot next to them (FILE with the
suffix .png). ``--markdown FILE`` writes the same as a markdown section.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..errors import UsageError

HELP = "benchmark every per-sample gradient-norm method against the forward/backward floors"

QUICK = dict(batch_size=8, repeats=3, warmup=1, loop_samples=4, n_batches=2)
DEFAULT_BATCH = {"cpu": 32, "cuda": 256}
DEFAULT_SCALING = {"cpu": "1000,4000,16000", "cuda": "10000,100000,1000000"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..benchmark.workloads import DTYPES, model_names

    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to run (default: cuda when available, else cpu)")
    p.add_argument("--model", choices=model_names(), default="resnet18",
                   help="the model to score (default: resnet18, the CIFAR ResNet-18 on 32x32 images)")
    p.add_argument("--width", type=int, default=None,
                   help="stage width of resnet18 / small_cnn (default: the real model, 64 / 16); "
                        "smaller for smoke runs")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per call (default: 32 on cpu, 256 on cuda, 8 with --quick)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="fp32, tf32 (TF32 tensor cores, CUDA only) or bf16 (autocast)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke size: batch 8, 3 timed calls, loop on 4 samples (about a minute on a CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method, median reported (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per method before timing (default 2)")
    p.add_argument("--loop-samples", type=int, default=None,
                   help="samples per call of the per-sample loop, and samples checked against it (default 8)")
    p.add_argument("--batches", type=int, default=None,
                   help="distinct input batches rotated from call to call (default 4)")
    p.add_argument("--methods", default=None,
                   help="comma-separated rows to measure (default: all; see the list in --help's epilog)")
    p.add_argument("--no-methods", action="store_true", help="skip the method table (e.g. only --scaling)")
    p.add_argument("--chunk-sizes", default=None,
                   help="also time every engine backend at these chunk sizes, e.g. 8,16,32,64")
    p.add_argument("--chunk-backends", default=None,
                   help="comma-separated engine backends for --chunk-sizes (default: every registered one)")
    p.add_argument("--scaling", nargs="?", const="default", default=None, metavar="SIZES",
                   help="also time rank_unlabeled on synthetic pools of these sizes "
                        "(default 1000,4000,16000 on cpu; 10000,100000,1000000 on cuda)")
    p.add_argument("--scaling-model", choices=model_names(), default="small_cnn",
                   help="model for --scaling (default small_cnn)")
    p.add_argument("--scaling-backend", default="auto", help="backend for --scaling (default auto)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="write the records here, and the plot next to them (FILE.png)")
    p.add_argument("--markdown", type=Path, default=None, metavar="FILE", help="write a markdown report here")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads torch may use (default: torch's choice, one per core)")
    from ..benchmark.methods import method_names

    p.epilog = "methods: " + ", ".join(method_names())


def run(args: argparse.Namespace) -> int:
    from ..benchmark import plot, report, runner, scaling

    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device here; use --device cpu")
    device = runner.resolve_device(device_name)
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.width is not None and args.width < 1:
        raise UsageError(f"--width must be at least 1, got {args.width}")
    settings = _settings(args, device_name)
    methods = _csv(args.methods, str, "--methods") if args.methods else None
    if methods is not None:
        from ..benchmark.methods import method_names

        unknown = [m for m in methods if m not in method_names()]
        if unknown:
            raise UsageError(f"--methods names unknown rows {unknown}; choose from {method_names()}")
    chunk_sizes = _csv(args.chunk_sizes, int, "--chunk-sizes") if args.chunk_sizes else None
    chunk_backends = _csv(args.chunk_backends, str, "--chunk-backends") if args.chunk_backends else None
    if chunk_backends:
        from ..backends import BACKENDS

        unknown = [b for b in chunk_backends if b not in BACKENDS]
        if unknown:
            raise UsageError(f"--chunk-backends names unknown backends {unknown}; registered: {list(BACKENDS)}")
    pool_sizes = None
    if args.scaling is not None:
        text = DEFAULT_SCALING[device.type] if args.scaling == "default" else args.scaling
        pool_sizes = _csv(text, int, "--scaling")
    if args.no_methods and not chunk_sizes and not pool_sizes:
        raise UsageError("--no-methods leaves nothing to measure; add --chunk-sizes or --scaling")

    config = runner.BenchConfig(model=args.model, device=device_name, dtype=args.dtype,
                                batch_size=settings["batch_size"], warmup=settings["warmup"],
                                repeats=settings["repeats"], loop_samples=settings["loop_samples"],
                                n_batches=settings["n_batches"], width=args.width, methods=methods, seed=args.seed)
    header = report.environment_header(device, _command_line(args, settings), settings)
    result: dict = {"header": header, "rows": [], "chunk_sweep": [], "scaling": []}
    _say(f"{header['device']}, torch {header['torch']}, triton {header['triton']}; "
         f"load average {header['load_average_at_start']}")

    if not args.no_methods:
        _say(f"methods: {settings['model_description']}, {args.dtype}, batch {config.batch_size}")
        result["rows"] = runner.run_methods(config, log=_say)
        print(report.format_table(result["rows"], report.METHOD_COLUMNS))
    if chunk_sizes:
        _say(f"chunk sizes {chunk_sizes}: engine backends {chunk_backends or 'all'}")
        result["chunk_sweep"] = runner.run_chunk_sweep(config, chunk_sizes, chunk_backends, log=_say)
        print()
        print(report.format_table(result["chunk_sweep"], report.SWEEP_COLUMNS))
    if pool_sizes:
        _say(f"pool scaling {pool_sizes}: rank_unlabeled, {args.scaling_model}")
        result["scaling"] = scaling.run_scaling(scaling.ScalingConfig(
            device=device_name, pool_sizes=pool_sizes, model=args.scaling_model, width=args.width, dtype=args.dtype,
            backend=args.scaling_backend, loader_batch=1024 if device.type == "cuda" else 256, seed=args.seed))
        print()
        print(report.format_table(result["scaling"], report.SCALING_COLUMNS))
    report.finish_header(header)

    if args.json:
        report.write_json(result, args.json)
        _say(f"wrote {args.json}")
        if result["rows"]:
            _say(f"wrote {plot.plot_methods(result, args.json.with_suffix('.png'))}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report.markdown_report(result))
        _say(f"wrote {args.markdown}")
    return 0


def _settings(args: argparse.Namespace, device_name: str) -> dict:
    from ..benchmark.workloads import MODELS

    base = dict(QUICK) if args.quick else dict(batch_size=DEFAULT_BATCH[device_name], repeats=5, warmup=2,
                                                loop_samples=8, n_batches=4)
    for key, value in (("batch_size", args.batch_size), ("repeats", args.repeats), ("warmup", args.warmup),
                       ("loop_samples", args.loop_samples), ("n_batches", args.batches)):
        if value is not None:
            if value < (0 if key == "warmup" else 1):
                raise UsageError(f"--{key.replace('_', '-')} must be {'>= 0' if key == 'warmup' else '>= 1'}, got {value}")
            base[key] = value
    description = MODELS[args.model].description + (f", width {args.width}" if args.width is not None else "")
    return {"model": args.model, "model_description": description, "dtype": args.dtype,
            "device": device_name, "quick": args.quick, **base}


def _command_line(args: argparse.Namespace, settings: dict) -> list[str]:
    """The command with every setting spelled out, so the header reruns it exactly."""
    argv = ["bench", "--device", settings["device"], "--dtype", args.dtype]
    if not args.no_methods or args.chunk_sizes:  # the method settings matter
        argv += ["--model", args.model, "--batch-size", str(settings["batch_size"]),
                 "--repeats", str(settings["repeats"]), "--warmup", str(settings["warmup"]),
                 "--loop-samples", str(settings["loop_samples"]), "--batches", str(settings["n_batches"])]
    if args.width is not None:   # the methods' model and the scaling model both take it
        argv += ["--width", str(args.width)]
    if args.methods:
        argv += ["--methods", args.methods]
    if args.no_methods:
        argv += ["--no-methods"]
    if args.chunk_sizes:
        argv += ["--chunk-sizes", args.chunk_sizes]
    if args.chunk_backends:
        argv += ["--chunk-backends", args.chunk_backends]
    if args.scaling is not None:
        argv += ["--scaling"] + ([] if args.scaling == "default" else [args.scaling])
        argv += ["--scaling-model", args.scaling_model, "--scaling-backend", args.scaling_backend]
    if args.seed:
        argv += ["--seed", str(args.seed)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.json:
        argv += ["--json", str(args.json)]
    if args.markdown:
        argv += ["--markdown", str(args.markdown)]
    return argv


def _csv(text: str, kind, option: str) -> list:
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} takes a comma-separated list, e.g. 8,16,32; got {text!r}") from None
    if not values:
        raise UsageError(f"{option} is empty")
    if kind is int and min(values) < 1:
        raise UsageError(f"{option} takes positive numbers, got {text!r}")
    return values


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
