"""kernels/batch_norm_grad.py: the one-pass Triton kernel (Triton's interpreter on CPU, see
conftest.py) against its torch reference and per-sample autograd through an eval BatchNorm."""
import pytest
import torch
from torch import nn

from gradnorm_engine.kernels import batch_norm_grad_sqnorm, batch_norm_grad_sqnorm_reference
from gradnorm_engine.kernels.compile_check import compile_in_subprocess

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _bn_case(shape, dtype=torch.float32):
    """An eval BatchNorm with non-trivial running statistics and affine parameters."""
    channels = shape[1]
    bn = BN[len(shape)](channels).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0.5, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    x = (torch.randn(shape) * 2 + 1).to(dtype)
    g = torch.randn(shape).to(dtype)
    return bn, x, g


def _autograd_truth(bn, x, g):
    """Per-sample (||dweight||^2, ||dbias||^2) by autograd, one sample at a time, in float64."""
    bn = bn.double()
    w, b = [], []
    for i in range(x.shape[0]):
        y = bn(x[i:i + 1].double())
        dw, db = torch.autograd.grad(y, (bn.weight, bn.bias), g[i:i + 1].double())
        w.append(dw.pow(2).sum())
        b.append(db.pow(2).sum())
    return torch.stack(w), torch.stack(b)


def _stats(bn, dtype=torch.float32):
    return bn.running_mean.to(dtype), torch.rsqrt(bn.running_var.to(dtype) + bn.eps)


SHAPES = {
    "bn2d_odd": (3, 5, 7, 6),
    "bn2d_many_channels": (2, 150, 3, 3),     # several channel blocks
    "bn2d_long_rows": (2, 3, 20, 17),         # several position blocks
    "bn1d_features": (4, 9),                  # [B, C]: one position
    "bn1d_sequence": (3, 6, 11),
    "bn3d": (2, 4, 3, 5, 4),
    "batch_one": (1, 8, 4, 4),
}


@pytest.mark.parametrize("name, layout", [(name, layout) for name, shape in SHAPES.items()
                                           for layout in ("contiguous", "channels_last")
                                           if layout == "contiguous" or len(shape) == 4])
def test_triton_matches_autograd_and_reference(name, layout):
    bn, x, g = _bn_case(SHAPES[name])
    if layout == "channels_last":
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    mean, inv_std = _stats(bn)
    w, b = batch_norm_grad_sqnorm(x, g, mean, inv_std, impl="triton")
    assert w.dtype == b.dtype == torch.float32 and w.shape == b.shape == (x.shape[0],)
    tw, tb = _autograd_truth(bn, x, g)
    torch.testing.assert_close(w.double(), tw, rtol=1e-5, atol=0)
    torch.testing.assert_close(b.double(), tb, rtol=1e-5, atol=0)
    rw, rb = batch_norm_grad_sqnorm_reference(x, g, mean, inv_std)
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=0)
    torch.testing.assert_close(b, rb, rtol=1e-5, atol=0)


def test_unmergeable_strides_float64_and_bf16():
    bn, x, g = _bn_case((2, 4, 5, 6))
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)       # H and W strides swapped: copied
    tw, tb = _autograd_truth(bn, x, g)
    w, b = batch_norm_grad_sqnorm(xt, g, *_stats(bn), impl="triton")
    torch.testing.assert_close(w.double(), tw, rtol=1e-5, atol=0)
    w64, b64 = batch_norm_grad_sqnorm(x.double(), g.double(), *_stats(bn, torch.float64), impl="triton")
    assert w64.dtype == torch.float64
    torch.testing.assert_close(w64, tw, rtol=1e-12, atol=0)
    torch.testing.assert_close(b64, tb, rtol=1e-12, atol=0)
    xb, gb = x.bfloat16(), g.bfloat16()
    wb, bb = batch_norm_grad_sqnorm(xb, gb, *_stats(bn), impl="triton")
    assert wb.dtype == torch.float32
    tw_b, tb_b = _autograd_truth(bn, xb, gb)          # the same bf16-rounded inputs, in float64
    torch.testing.assert_close(wb.double(), tw_b, rtol=1e-5, atol=0)
    torch.testing.assert_close(bb.double(), tb_b, rtol=1e-5, atol=0)


def test_deterministic_and_auto_on_cpu_is_reference():
    bn, x, g = _bn_case((3, 150, 5, 5))
    stats = _stats(bn)
    first = batch_norm_grad_sqnorm(x, g, *stats, impl="triton")
    again = batch_norm_grad_sqnorm(x, g, *stats, impl="triton")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    auto, ref = batch_norm_grad_sqnorm(x, g, *stats), batch_norm_grad_sqnorm_reference(x, g, *stats)
    assert all(torch.equal(a, b) for a, b in zip(auto, ref))


def test_bad_arguments_name_the_problem():
    x = torch.ones(2, 4, 3, 3)
    with pytest.raises(ValueError, match="one shape"):
        batch_norm_grad_sqnorm(x, torch.ones(2, 4, 3, 2), torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"shape \[C\]"):
        batch_norm_grad_sqnorm(x, x, torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="impl"):
        batch_norm_grad_sqnorm(x, x, torch.zeros(4), torch.ones(4), impl="cudnn")


def test_compiles_for_hopper_without_a_gpu():
    result = compile_in_subprocess(["batch_norm_grad"], dtypes="fp32,bf16,fp64")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("ok") == 3, result.stdout


@pytest.mark.parametrize("running_mean, running_var, centre", [
    (200.0, 0.01, 200.0),    # raw pixel values: the mean dwarfs the spread, |mean| * inv_std = 2000
    (8.0, 1.0, 8.0),         # an ordinary layer's statistics, a sample sitting at its mean
    (2.0, 1 / 16, 2.0),
])
def test_reference_stays_exact_where_sum_gx_and_mean_sum_g_would_cancel(running_mean, running_var, centre):
    """x close to the running mean compared with its size: sum g*x - mean * sum g loses digits in
    float32 whatever the layer's statistics; the reference centres first, as the kernel."""
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.fill_(running_mean)
        bn.running_var.fill_(running_var)
    x = centre + 1e-4 * torch.randn(4, 3, 6, 6)
    g = torch.randn(4, 3, 6, 6)
    mean, inv_std = _stats(bn)
    tw, tb = _autograd_truth(bn, x, g)
    w, b = batch_norm_grad_sqnorm_reference(x, g, mean, inv_std)
    torch.testing.assert_close(w.double(), tw, rtol=1e-4, atol=0)
    torch.testing.assert_close(b.double(), tb, rtol=1e-5, atol=0)


def test_empty_batch_gives_empty_results_on_every_path():
    from gradnorm_engine.kernels import per_sample_sumsq

    x = torch.randn(0, 3, 4, 4)
    mean, inv_std = torch.zeros(3), torch.ones(3)
    for impl in ("torch", "auto", "triton"):
        w, b = batch_norm_grad_sqnorm(x, x, mean, inv_std, impl=impl)
        assert w.shape == b.shape == (0,)
        assert per_sample_sumsq([x, torch.randn(0, 5)], impl=impl).shape == (0,)
