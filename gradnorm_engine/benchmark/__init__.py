"""Benchmarks of every way to get per-sample gradient norms, against the physical floors.

    gradnorm-engine bench --device cuda --model resnet18 --json bench.json   # the command
    rows = run_methods(BenchConfig(model="resnet18", device="cpu"))          # the same, in Python

workloads.py  models, realistic random inputs, precision (fp32 | tf32 | bf16)
methods.py    one function per row: loop, vmap-naive, every engine backend, opacus, fwd_bwd, forward
timing.py     warm-up, CUDA events, median and spread over rotated inputs; peak memory
runner.py     all methods on one workload in one process -> rows; the chunk-size sweep
scaling.py    rank_unlabeled on synthetic pools of growing size -> rows
report.py     header (machine, versions, command), tables, JSON, markdown
plot.py       samples/s per method on a log scale, floors as lines
"""
from .runner import BenchConfig, run_chunk_sweep, run_methods
from .scaling import ScalingConfig, run_scaling

__all__ = ["BenchConfig", "ScalingConfig", "run_chunk_sweep", "run_methods", "run_scaling"]
