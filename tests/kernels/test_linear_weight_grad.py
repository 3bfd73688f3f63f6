"""kernels/linear_weight_grad.py: the Triton kernel (Triton's interpreter on CPU, see conftest.py)
against its torch reference, a float64 ground truth and per-sample autograd."""
import pytest
import torch

from gradnorm_engine.kernels import linear_weight_grad_sqnorm, linear_weight_grad_sqnorm_reference
from gradnorm_engine.kernels.compile_check import compile_in_subprocess

FP32_RTOL = 1e-4  # the bound vs a float64 reference


def _truth(a, g):
    """||sum_t g_t a_t^T||_F^2 per sample, in float64, one sample at a time."""
    return torch.stack([(g[b].double().T @ a[b].double()).pow(2).sum() for b in range(a.shape[0])])


# (B, T, d, p): none a multiple of the 16..64 tiles; p > 64 and d > 64 give several tiles.
SHAPES = [(1, 5, 3, 2), (3, 37, 21, 70), (2, 70, 67, 5), (2, 1, 17, 33)]


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_float64_truth(shape):
    B, T, d, p = shape
    a, g = torch.randn(B, T, d), torch.randn(B, T, p)
    out = linear_weight_grad_sqnorm(a, g, impl="triton")
    assert out.shape == (B,) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _truth(a, g), rtol=FP32_RTOL, atol=0)
    torch.testing.assert_close(out, linear_weight_grad_sqnorm_reference(a, g), rtol=1e-5, atol=0)


def test_non_contiguous_inputs():
    a = torch.randn(2, 21, 37).transpose(1, 2)          # (B, T=37, d=21), d has stride 37
    g = torch.randn(37, 2, 18).permute(1, 0, 2)[..., ::2]  # (B, T=37, p=9), batch not outermost
    out = linear_weight_grad_sqnorm(a, g, impl="triton")
    torch.testing.assert_close(out.double(), _truth(a, g), rtol=FP32_RTOL, atol=0)


def test_bf16_inputs_accumulate_in_float32():
    a, g = torch.randn(2, 45, 19).bfloat16(), torch.randn(2, 45, 23).bfloat16()
    out = linear_weight_grad_sqnorm(a, g, impl="triton")
    assert out.dtype == torch.float32
    # bf16 products are exact in float32: only float32 summation error remains.
    torch.testing.assert_close(out.double(), _truth(a, g), rtol=FP32_RTOL, atol=0)


def test_float64_stays_float64():
    a, g = torch.randn(2, 9, 5, dtype=torch.float64), torch.randn(2, 9, 4, dtype=torch.float64)
    out = linear_weight_grad_sqnorm(a, g, impl="triton")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _truth(a, g), rtol=1e-12, atol=0)


def test_matches_autograd_per_sample_gradients():
    layer = torch.nn.Linear(6, 4).double()
    x = torch.randn(3, 11, 6, dtype=torch.float64)
    y = layer(x)
    weights = torch.randn_like(y)
    g, = torch.autograd.grad((y * weights).sum(), y)  # dloss_b / dy_b for loss_b = <w_b, y_b>
    expected = torch.stack([
        torch.autograd.grad((layer(x[b]) * weights[b]).sum(), layer.weight)[0].pow(2).sum() for b in range(3)])
    torch.testing.assert_close(linear_weight_grad_sqnorm(x, g, impl="triton"), expected, rtol=1e-12, atol=0)


def test_deterministic_and_auto_on_cpu_is_reference():
    a, g = torch.randn(3, 37, 70), torch.randn(3, 37, 66)
    first = linear_weight_grad_sqnorm(a, g, impl="triton")
    assert torch.equal(first, linear_weight_grad_sqnorm(a, g, impl="triton"))
    assert torch.equal(linear_weight_grad_sqnorm(a, g), linear_weight_grad_sqnorm_reference(a, g))


def test_bad_arguments():
    with pytest.raises(ValueError, match="same"):
        linear_weight_grad_sqnorm(torch.ones(2, 3, 4), torch.ones(2, 5, 4))
    with pytest.raises(ValueError, match="impl"):
        linear_weight_grad_sqnorm(torch.ones(2, 3, 4), torch.ones(2, 3, 4), impl="fast")


def test_compiles_for_hopper_without_a_gpu():
    # The interpreter never runs Triton's compiler; compile the real cubins (sm_90) as well.
    done = compile_in_subprocess(["linear_weight_grad"], arch=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fp32" in done.stdout and "bf16" in done.stdout and "fp64" in done.stdout
