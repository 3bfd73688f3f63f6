"""kernels/per_sample_sumsq.py: the Triton kernel (run by Triton's interpreter on CPU, see
conftest.py) against its torch reference, a float64 ground truth and per-sample autograd."""
import importlib
import os
import subprocess
import sys

import pytest
import torch

from gradnorm_engine.kernels import per_sample_sumsq, per_sample_sumsq_reference
from gradnorm_engine.kernels.compile_check import compile_in_subprocess

# The package re-exports the function under the module's name, so fetch the module itself.
pss = importlib.import_module("gradnorm_engine.kernels.per_sample_sumsq")

FP32_RTOL = 1e-4  # the bound vs a float64 reference; the kernel lands near 1e-7


def _truth(tensors):
    """Float64 ground truth [B, T] from plain Python loops over samples."""
    return torch.stack([torch.stack([t[b].double().pow(2).sum() for t in tensors])
                        for b in range(tensors[0].shape[0])])


def _mixed_layouts(batch):
    """Tensors of different sizes, dtypes and layouts, none a multiple of the chunk size."""
    return [
        torch.randn(batch, 5, 7),                                           # contiguous
        torch.randn(batch, 3001),                                           # several blocks
        torch.randn(batch, 4, 6, 5).to(memory_format=torch.channels_last),  # permuted strides
        torch.randn(9, batch).T,                                            # batch innermost
        torch.randn(batch, 1, 2).expand(batch, 4, 2),                       # expanded: copied
        torch.randn(batch, 7, 8).transpose(1, 2),                           # transposed view
        torch.randn(batch, 6, 10)[:, ::2, 1:8],                             # gaps: copied
        torch.randn(batch, 1),                                              # bias-like
    ]


@pytest.mark.parametrize("batch", [1, 3])
def test_triton_matches_float64_truth_per_tensor(batch):
    tensors = _mixed_layouts(batch)
    out = per_sample_sumsq(tensors, per_tensor=True, impl="triton")
    assert out.shape == (batch, len(tensors)) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _truth(tensors), rtol=FP32_RTOL, atol=0)
    torch.testing.assert_close(out, per_sample_sumsq_reference(tensors, per_tensor=True), rtol=1e-6, atol=0)


def test_triton_total_is_sum_over_tensors():
    tensors = _mixed_layouts(2)
    total = per_sample_sumsq(tensors, impl="triton")
    assert total.shape == (2,)
    torch.testing.assert_close(total.double(), _truth(tensors).sum(dim=1), rtol=FP32_RTOL, atol=0)


def test_half_precision_inputs_accumulate_in_float32():
    tensors = [torch.randn(2, 300).bfloat16(), torch.randn(2, 3, 5).half(), torch.randn(2, 4)]
    out = per_sample_sumsq(tensors, per_tensor=True, impl="triton")
    assert out.dtype == torch.float32
    # The inputs are exactly representable; only the float32 sums differ from float64.
    torch.testing.assert_close(out.double(), _truth(tensors), rtol=1e-6, atol=0)


def test_float64_stays_float64_and_exact():
    tensors = [torch.randn(3, 17, dtype=torch.float64), torch.randn(3, 2, 2)]
    out = per_sample_sumsq(tensors, per_tensor=True, impl="triton")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _truth(tensors), rtol=1e-12, atol=0)


def test_many_chunks_and_segment_blocks(monkeypatch):
    # Shrink the chunk so that tiny tensors span many chunks and the second stage loops over
    # several blocks of partials: the same code paths a ResNet's 2M-entry gradients take.
    monkeypatch.setattr(pss, "BLOCK", 16)
    monkeypatch.setattr(pss, "ITERS", 2)
    monkeypatch.setattr(pss, "SEGMENT_BLOCK", 4)
    tensors = [torch.randn(2, 333), torch.randn(2, 5, 7).transpose(1, 2), torch.randn(2, 40).bfloat16()]
    out = per_sample_sumsq(tensors, per_tensor=True, impl="triton")
    torch.testing.assert_close(out.double(), _truth(tensors), rtol=FP32_RTOL, atol=0)


def test_one_launch_per_dtype(monkeypatch):
    launches = []
    kernel = pss._per_sample_sumsq_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(pss, "_per_sample_sumsq_kernel", Counting())
    monkeypatch.setattr(pss, "is_interpreted", lambda k: True)
    monkeypatch.setattr(pss, "use_triton", lambda *a: True)
    tensors = [torch.randn(2, n) for n in (3, 50, 7, 1)] + [torch.randn(2, 9).bfloat16()]
    per_sample_sumsq(tensors, per_tensor=True, impl="triton")
    assert len(launches) == 2  # float32 group and bfloat16 group


def test_matches_autograd_per_sample_gradients():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    params = list(model.parameters())
    per_sample = [torch.autograd.grad(model(x[i:i + 1]).pow(2).sum(), params) for i in range(4)]
    grads = [torch.stack([g[j] for g in per_sample]) for j in range(len(params))]  # each [B, ...]
    expected = torch.stack([sum(g.pow(2).sum() for g in gs) for gs in per_sample])
    torch.testing.assert_close(per_sample_sumsq(grads, impl="triton"), expected, rtol=1e-12, atol=0)


def test_deterministic():
    tensors = _mixed_layouts(3)
    first = per_sample_sumsq(tensors, per_tensor=True, impl="triton")
    assert torch.equal(first, per_sample_sumsq(tensors, per_tensor=True, impl="triton"))


def test_auto_on_cpu_is_the_reference():
    tensors = _mixed_layouts(2)
    assert torch.equal(per_sample_sumsq(tensors, per_tensor=True),
                       per_sample_sumsq_reference(tensors, per_tensor=True))
    assert torch.equal(per_sample_sumsq(tensors, impl="torch"), per_sample_sumsq_reference(tensors))


def test_edge_sizes():
    empty = per_sample_sumsq([torch.randn(0, 3)], impl="triton")
    assert empty.shape == (0,)
    zero_width = per_sample_sumsq([torch.randn(2, 0), torch.ones(2, 3)], per_tensor=True, impl="triton")
    assert torch.equal(zero_width, torch.tensor([[0.0, 3.0], [0.0, 3.0]]))
    only_empty_bf16 = per_sample_sumsq([torch.ones(2, 3), torch.ones(2, 0).bfloat16()], per_tensor=True, impl="triton")
    assert torch.equal(only_empty_bf16, torch.tensor([[3.0, 0.0], [3.0, 0.0]]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="impl"):
        per_sample_sumsq([torch.ones(2, 3)], impl="cuda")
    with pytest.raises(ValueError, match="same B"):
        per_sample_sumsq([torch.ones(2, 3), torch.ones(3, 3)])
    with pytest.raises(ValueError, match="at least one"):
        per_sample_sumsq([])
    with pytest.raises(TypeError, match="floating"):
        per_sample_sumsq([torch.ones(2, 3, dtype=torch.int64)])
    for impl in ("torch", "triton"):   # the kernel would read a pointer of another device
        with pytest.raises(ValueError, match="one device"):
            per_sample_sumsq([torch.ones(2, 3), torch.ones(2, 3, device="meta")], impl=impl)


def test_triton_on_cpu_without_interpreter_says_how_to_fix():
    # The interpreter is chosen when the kernels are decorated (at import), so a fresh process
    # without TRITON_INTERPRET must refuse impl="triton" on CPU for every kernel, and still
    # serve impl="auto" through the references.
    code = (
        "import torch\n"
        "from gradnorm_engine.kernels import *\n"
        "x = torch.ones(2, 3, 4, 4)\n"
        "calls = [lambda: per_sample_sumsq([x], impl='triton'),\n"
        "         lambda: linear_weight_grad_sqnorm(x[:, 0], x[:, 1], impl='triton'),\n"
        "         lambda: conv2d_weight_grad_sqnorm(x, x, 1, impl='triton')]\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as e:\n"
        "        assert 'TRITON_INTERPRET=1' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
        "assert per_sample_sumsq([x]).tolist() == [48.0, 48.0]\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_compiles_for_hopper_without_a_gpu():
    # The interpreter never runs Triton's compiler; compile the real cubins (sm_90) as well.
    done = compile_in_subprocess(["per_sample_sumsq"], arch=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fp32" in done.stdout and "bf16" in done.stdout and "fp64" in done.stdout
