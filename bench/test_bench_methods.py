"""pytest-benchmark cases: every per-sample gradient-norm method on one workload.

    pytest bench/ --benchmark-only                      # timed, on this machine's defaults
    pytest bench/ --benchmark-disable                   # smoke: each case runs once, untimed
    BENCH_DEVICE=cuda BENCH_MODEL=resnet18 BENCH_BATCH=256 pytest bench/ --benchmark-only \
        --benchmark-json bench.json

Settings (environment): BENCH_DEVICE (cuda when available, else cpu), BENCH_MODEL
(resnet18 | mobilenet_v3_small | transformer | small_cnn; default resnet18), BENCH_WIDTH
(stage width of resnet18 / small_cnn; default: 16 on cpu, the real model on cuda), BENCH_BATCH
(default 8 on cpu, 256 on cuda), BENCH_DTYPE (fp32 | tf32 | bf16), BENCH_ROUNDS (default 5).

Each round gets the next of several distinct input batches (``setup`` rotates them) and, on
CUDA, ends with a synchronize, so the clock sees the device work. Each case also checks its
norms against the per-sample loop (never its speed). ``gradnorm-engine bench`` is the full
report (floors, ratios, memory, plot); these cases put the same methods into
pytest-benchmark's comparison tools (``--benchmark-compare``, histograms).
"""
import itertools
import os

import pytest
import torch

from gradnorm_engine.benchmark.methods import FLOORS, MethodContext, MethodUnavailable, build_method, method_names
from gradnorm_engine.benchmark.runner import max_rel_err, reference_scores
from gradnorm_engine.devices import resolve_device
from gradnorm_engine.benchmark.timing import synchronize
from gradnorm_engine.benchmark.workloads import build_workload, precision

DEVICE = resolve_device(os.environ.get("BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
ON_CUDA = DEVICE.type == "cuda"
MODEL = os.environ.get("BENCH_MODEL", "resnet18")
WIDTH = int(os.environ["BENCH_WIDTH"]) if "BENCH_WIDTH" in os.environ else (None if ON_CUDA else 16)
BATCH = int(os.environ.get("BENCH_BATCH", 256 if ON_CUDA else 8))
DTYPE = os.environ.get("BENCH_DTYPE", "fp32")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 5))
# The loop scores the whole batch too: pytest-benchmark compares time per call, so every case
# must score the same samples per call (the loop is slow here by design).
LOOP_SAMPLES = BATCH
# Largest relative error against the float64 per-sample loop. fp32: a batched forward may take
# other convolution algorithms than a single sample's, and on the real CIFAR ResNet-18 (width 64,
# CPU) a few samples' batched fp32 scores land 1.1-1.2e-4 from float64 (bench/results/cpu-2core.md)
# for every batched method alike (the fp32 batch-1 loop ~1e-7); a wrong norm is off by far more.
TOLERANCE = {"fp32": 1e-3, "tf32": 1e-2, "bf16": 5e-2}[DTYPE]


@pytest.fixture(scope="module")
def workload():
    work = build_workload(MODEL, DEVICE, batch_size=BATCH, n_batches=4, width=WIDTH)
    work.reference = reference_scores(work, DEVICE, LOOP_SAMPLES)
    return work


@pytest.mark.parametrize("name", method_names())
def test_method(benchmark, workload, name):
    with precision(DTYPE, DEVICE) as autocast, torch.enable_grad():
        ctx = MethodContext(workload.model, DEVICE, autocast, LOOP_SAMPLES, BATCH)
        try:
            method = build_method(name, ctx)
        except MethodUnavailable as why:
            pytest.skip(str(why))
        try:
            scores = method.fn(workload.batches[0])
            if name not in FLOORS:
                assert max_rel_err(scores, workload.reference) < TOLERANCE
            turn = itertools.cycle(workload.batches[1:] + workload.batches[:1])

            def call(x):
                method.fn(x)
                synchronize(DEVICE)

            benchmark.extra_info.update(model=MODEL, device=str(DEVICE), dtype=DTYPE, batch_size=BATCH,
                                        samples_per_call=method.samples_per_call(workload.batches[0]))
            benchmark.pedantic(call, setup=lambda: ((next(turn),), {}), rounds=ROUNDS, warmup_rounds=1)
        finally:
            method.close()
