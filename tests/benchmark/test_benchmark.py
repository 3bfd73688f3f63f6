"""Smoke of the benchmark suite (gradnorm_engine.benchmark, ``gradnorm-engine bench``).

Tiny models and one timed call each: these check that every row is complete and that each
method's norms equal the per-sample loop; they never assert a speed.
"""
import json

import pytest
import torch

from gradnorm_engine import cli
from gradnorm_engine.backends import BACKENDS
from gradnorm_engine.benchmark.methods import FLOORS, Method, MethodContext, build_method, method_names
from gradnorm_engine.benchmark.runner import BenchConfig, run_chunk_sweep, run_methods
from gradnorm_engine.benchmark.scaling import ScalingConfig, SyntheticPool, run_scaling
from gradnorm_engine.benchmark.timing import PeakMemory, Timing, time_calls
from gradnorm_engine.benchmark.workloads import build_workload

ROW_KEYS = {"method", "model", "device", "dtype", "batch_size", "samples_per_call", "samples_per_s",
            "time_per_call_ms", "spread_pct", "repeats", "peak_mem_mb", "max_rel_err", "ratio_to_fwd_bwd", "error"}
TINY = dict(model="resnet18", width=4, device="cpu", batch_size=4, warmup=0, repeats=1, loop_samples=2, n_batches=2)
FP32_TOL = 1e-4  # fp32 vs the float64 loop: rounding only


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from a second thread, and on a busy machine two spinning
    # OpenMP threads per op slow these smoke runs several times over.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_rows(rows, names):
    assert [r["method"] for r in rows] == names
    for r in rows:
        assert set(r) >= ROW_KEYS, r
        if r["error"]:
            # Only Opacus may refuse (not installed, or BatchNorm); its numbers are then null.
            assert r["method"] == "opacus", r
            assert r["samples_per_s"] is None and r["max_rel_err"] is None
            continue
        assert r["samples_per_s"] > 0 and r["time_per_call_ms"] > 0 and r["repeats"] >= 1
        assert r["device"].startswith("CPU (")
        assert r["peak_mem_mb"] is None or r["peak_mem_mb"] >= 0
        if r["method"] in FLOORS:
            assert r["max_rel_err"] is None
        else:
            assert r["max_rel_err"] is not None and r["max_rel_err"] < FP32_TOL, r
        assert r["ratio_to_fwd_bwd"] > 0


def test_run_methods_rows_complete_and_exact():
    rows = run_methods(BenchConfig(**TINY))
    _check_rows(rows, method_names())
    by_name = {r["method"]: r for r in rows}
    assert by_name["fwd_bwd"]["ratio_to_fwd_bwd"] == pytest.approx(1.0)
    assert by_name["loop"]["samples_per_call"] == 2  # the loop is timed on a subset
    assert by_name["vmap"]["samples_per_call"] == 4


def test_bf16_rows_are_checked_against_the_float64_loop():
    rows = run_methods(BenchConfig(**{**TINY, "model": "transformer", "batch_size": 2, "dtype": "bf16",
                                      "methods": ["fwd_bwd", "loop", "vmap"]}))
    errs = {r["method"]: r["max_rel_err"] for r in rows}
    assert errs["fwd_bwd"] is None
    # bf16 autocast keeps 2 to 3 significant digits; the reference is the float64 loop.
    assert 0 < errs["vmap"] < 0.05 and 0 < errs["loop"] < 0.05


def test_a_method_that_fails_becomes_an_error_row(monkeypatch):
    from gradnorm_engine.benchmark import runner

    def out_of_memory(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(runner, "build_method", lambda name, ctx: Method(name, out_of_memory, lambda x: 4))
    rows = run_methods(BenchConfig(**{**TINY, "model": "small_cnn", "methods": ["vmap"]}))
    assert rows[0]["samples_per_s"] is None and "out of memory" in rows[0]["error"]


def test_each_norm_method_matches_the_loop():
    work = build_workload("small_cnn", torch.device("cpu"), batch_size=2, n_batches=1, width=4)
    ctx = MethodContext(work.model, torch.device("cpu"), None, loop_samples=2, chunk_size=2)
    with torch.enable_grad():
        ref = build_method("loop", ctx).fn(work.batches[0])
        for name in ("vmap-naive", "vmap"):
            torch.testing.assert_close(build_method(name, ctx).fn(work.batches[0]), ref, rtol=1e-5, atol=0)


def test_chunk_sweep_has_every_backend_at_every_chunk():
    rows = run_chunk_sweep(BenchConfig(**{**TINY, "model": "small_cnn"}), chunk_sizes=[4, 2])
    assert [(r["chunk_size"], r["method"]) for r in rows] == [(c, name) for c in (2, 4) for name in BACKENDS]
    for r in rows:
        assert r["batch_size"] == r["chunk_size"]
        assert r["error"] is None and r["max_rel_err"] < FP32_TOL


def test_scaling_rows_and_synthetic_pool():
    bank = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    assert sum(len(b) for b in SyntheticPool(bank, 10)) == 10
    assert len(SyntheticPool(bank, 10)) == 3
    rows = run_scaling(ScalingConfig(pool_sizes=(96, 48), width=4, loader_batch=16, k=5))
    assert [r["pool_size"] for r in rows] == [48, 96]
    assert rows[0]["time_vs_smallest"] == 1.0 and rows[1]["size_vs_smallest"] == 2.0
    assert all(r["seconds"] > 0 and r["backend"] for r in rows)


def test_time_calls_rotates_inputs_and_counts_calls():
    seen = []
    inputs = [torch.full((1,), float(i + 1)) for i in range(3)]
    timing = time_calls(lambda x: seen.append(int(x)), inputs, warmup=2, repeats=4, device=torch.device("cpu"))
    assert seen == [1, 2, 3, 1, 2, 3]
    assert len(timing.seconds) == 4
    assert Timing((1.0, 2.0, 3.0)).median_s == 2.0
    assert Timing((1.0, 2.0, 3.0)).spread_pct == pytest.approx(100.0)


def test_peak_memory_sees_a_large_cpu_allocation():
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, written so the pages are resident
        del x
    if mem.mb is None:
        pytest.skip("no /proc on this system")
    assert mem.mb >= 48


def test_bench_command_writes_json_plot_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    code = cli.main(["bench", "--device", "cpu", "--model", "small_cnn", "--width", "4", "--batch-size", "4", "--repeats", "1",
                     "--warmup", "0", "--loop-samples", "2", "--batches", "2", "--methods", "forward,fwd_bwd,loop,vmap",
                     "--scaling", "32,64", "--scaling-model", "small_cnn", "--json", str(out), "--markdown", str(md)])
    assert code == 0
    report = json.loads(out.read_text())
    header = report["header"]
    assert header["torch"] == torch.__version__ and "triton" in header
    assert header["command"].startswith("gradnorm-engine bench --device cpu")
    _check_rows(report["rows"], ["forward", "fwd_bwd", "loop", "vmap"])
    assert [r["pool_size"] for r in report["scaling"]] == [32, 64]
    assert out.with_suffix(".png").stat().st_size > 0
    text = md.read_text()
    assert header["command"] in text and "| vmap |" in text
    printed = capsys.readouterr().out
    assert "samples/s" in printed and "vmap" in printed


def test_scaling_alone_takes_the_width_and_records_it(tmp_path):
    out = tmp_path / "scaling.json"
    assert cli.main(["bench", "--device", "cpu", "--no-methods", "--scaling", "32", "--scaling-model", "small_cnn",
                     "--width", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "--width 2" in report["header"]["command"]
    assert [r["width"] for r in report["scaling"]] == [2]


@pytest.mark.parametrize("argv, message", [
    (["--width", "0"], "--width"),
    (["--no-methods"], "nothing to measure"),
    (["--chunk-sizes", "8,x"], "comma-separated"),
    (["--methods", "vmap,warp"], "unknown rows"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bench_command_usage_errors(argv, message, capsys):
    assert cli.main(["bench", "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU is visible")
def test_bench_command_says_when_cuda_is_missing(capsys):
    assert cli.main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
