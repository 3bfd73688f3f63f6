"""kernels/conv2d_weight_grad.py: the implicit-im2col Triton kernel (Triton's interpreter on CPU,
see conftest.py) against its unfold reference, a float64 ground truth and per-sample autograd."""
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gradnorm_engine.kernels import conv2d_weight_grad_sqnorm, conv2d_weight_grad_sqnorm_reference
from gradnorm_engine.kernels.compile_check import compile_in_subprocess
from gradnorm_engine.kernels.conv2d_weight_grad import _conv2d_weight_grad_sqnorm_triton

FP32_RTOL = 1e-4  # the bound vs a float64 reference


def _autograd_truth(x, grad_out, conv):
    """Per-sample ||dW||^2 by autograd through nn.Conv2d, one sample at a time, in float64."""
    conv = conv.double()
    out = []
    for b in range(x.shape[0]):
        y = conv(x[b:b + 1].double())
        dw, = torch.autograd.grad(y, conv.weight, grad_out[b:b + 1].double())
        out.append(dw.pow(2).sum())
    return torch.stack(out)


def _case(B, C, H, W, O, k, s=1, p=0, d=1, g=1, dtype=torch.float32):
    conv = torch.nn.Conv2d(C, O, k, stride=s, padding=p, dilation=d, groups=g, bias=False)
    x = torch.randn(B, C, H, W)
    with torch.no_grad():
        shape = conv(x).shape
    return x.to(dtype), torch.randn(shape).to(dtype), conv


# (B, C, H, W, O, kernel, stride, padding, dilation, groups): odd sizes, never tile multiples.
CASES = {
    "batch1_3x3_same": (1, 3, 7, 6, 5, 3, 1, 1, 1, 1),
    "rectangular_stride_pad_dilation": (2, 4, 9, 8, 6, (3, 2), (2, 1), (1, 2), (1, 2), 1),
    "groups": (2, 6, 7, 7, 9, 3, 1, 1, 1, 3),
    "depthwise": (2, 5, 8, 7, 5, 3, 2, 1, 1, 5),
    "depthwise_multiplier": (1, 3, 6, 6, 6, (1, 3), 1, (0, 1), 1, 3),
    "pointwise_strided": (2, 7, 9, 9, 11, 1, 2, 0, 1, 1),
    "many_tiles": (2, 9, 9, 11, 70, 3, 1, 1, 1, 1),  # K=81 and O=70: several tiles each way
    "no_padding_large_stride": (1, 2, 10, 11, 3, (2, 3), 3, 0, 1, 1),
    "one_tap_tiles": (2, 32, 6, 5, 20, 3, 1, 1, 1, 1),            # Cg=32: one tap per K tile
    "one_tap_tiles_groups_stride": (2, 64, 5, 7, 8, (3, 2), 2, 1, (1, 2), 2),
}


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nchw_as_given"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_autograd_and_reference(name, layout):
    """Tap-major taps (channels_last, and NCHW after its copy) and channel-major taps (NCHW as
    given) must agree."""
    B, C, H, W, O, k, s, p, d, g = CASES[name]
    x, gy, conv = _case(B, C, H, W, O, k, s, p, d, g)
    if layout == "channels_last":
        x, gy = x.to(memory_format=torch.channels_last), gy.to(memory_format=torch.channels_last)
    if layout == "nchw_as_given":
        out = _conv2d_weight_grad_sqnorm_triton(x, gy, k, s, p, d, g, relayout=False)
    else:
        out = conv2d_weight_grad_sqnorm(x, gy, k, s, p, d, g, impl="triton")
    assert out.shape == (B,) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _autograd_truth(x, gy, conv), rtol=FP32_RTOL, atol=0)
    ref = conv2d_weight_grad_sqnorm_reference(x, gy, k, s, p, d, g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)


def test_reference_matches_autograd_in_float64():
    x, gy, conv = _case(2, 4, 9, 8, 6, (3, 2), (2, 1), (1, 2), (1, 2), 2, dtype=torch.float64)
    ref = conv2d_weight_grad_sqnorm_reference(x, gy, (3, 2), (2, 1), (1, 2), (1, 2), 2)
    assert ref.dtype == torch.float64
    torch.testing.assert_close(ref, _autograd_truth(x, gy, conv), rtol=1e-12, atol=0)


def test_float64_triton_stays_float64():
    x, gy, conv = _case(2, 3, 6, 5, 4, 3, 1, 1, 1, 1, dtype=torch.float64)
    out = conv2d_weight_grad_sqnorm(x, gy, 3, 1, 1, impl="triton")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _autograd_truth(x, gy, conv), rtol=1e-12, atol=0)


def test_bf16_inputs_accumulate_in_float32():
    x, gy, conv = _case(2, 6, 7, 7, 9, 3, 1, 1, 1, 3, dtype=torch.bfloat16)
    out = conv2d_weight_grad_sqnorm(x, gy, 3, 1, 1, 1, 3, impl="triton")
    assert out.dtype == torch.float32
    # bf16 products are exact in float32; the truth uses the same (rounded) bf16 inputs.
    torch.testing.assert_close(out.double(), _autograd_truth(x, gy, conv), rtol=FP32_RTOL, atol=0)


def test_non_contiguous_inputs():
    x, gy, conv = _case(2, 4, 7, 6, 5, 3, 1, 1, 1, 1)
    x_cl = x.to(memory_format=torch.channels_last)
    gy_t = gy.transpose(2, 3).contiguous().transpose(2, 3)   # same values, H and W strides swapped
    x_slice = torch.randn(2, 8, 7, 6)[:, ::2]                 # channel stride 2*H*W
    expected = _autograd_truth(x, gy, conv)
    for xi, gi, truth in ((x_cl, gy, expected), (x, gy_t, expected), (x_cl, gy_t, expected),
                          (x_slice, gy, _autograd_truth(x_slice, gy, conv))):
        out = conv2d_weight_grad_sqnorm(xi, gi, 3, padding=1, impl="triton")
        torch.testing.assert_close(out.double(), truth, rtol=FP32_RTOL, atol=0)


def test_deterministic_and_auto_on_cpu_is_reference():
    x, gy, _ = _case(3, 9, 9, 11, 70, 3, 1, 1, 1, 1)
    first = conv2d_weight_grad_sqnorm(x, gy, 3, padding=1, impl="triton")
    assert torch.equal(first, conv2d_weight_grad_sqnorm(x, gy, 3, padding=1, impl="triton"))
    assert torch.equal(conv2d_weight_grad_sqnorm(x, gy, 3, padding=1),
                       conv2d_weight_grad_sqnorm_reference(x, gy, 3, padding=1))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), cg=st.integers(1, 3), og=st.integers(1, 3), g=st.integers(1, 2),
       H=st.integers(3, 8), W=st.integers(3, 8), kh=st.integers(1, 3), kw=st.integers(1, 3),
       s=st.integers(1, 2), p=st.integers(0, 2), d=st.integers(1, 2))
def test_random_geometry_matches_autograd(B, cg, og, g, H, W, kh, kw, s, p, d):
    # the kernel must fit the padded image (nn.Conv2d refuses it otherwise): drawn again if not
    assume((H + 2 * p - d * (kh - 1) - 1) >= 0 and (W + 2 * p - d * (kw - 1) - 1) >= 0)
    x, gy, conv = _case(B, cg * g, H, W, og * g, (kh, kw), s, p, d, g)
    out = conv2d_weight_grad_sqnorm(x, gy, (kh, kw), s, p, d, g, impl="triton")
    torch.testing.assert_close(out.double(), _autograd_truth(x, gy, conv), rtol=FP32_RTOL, atol=1e-30)


def test_bad_arguments_name_the_problem():
    x = torch.ones(2, 4, 6, 6)
    with pytest.raises(ValueError, match="does not match the conv output"):
        conv2d_weight_grad_sqnorm(x, torch.ones(2, 3, 6, 6), 3)
    with pytest.raises(ValueError, match="groups"):
        conv2d_weight_grad_sqnorm(x, torch.ones(2, 3, 4, 4), 3, groups=2)
    with pytest.raises(ValueError, match="impl"):
        conv2d_weight_grad_sqnorm(x, torch.ones(2, 3, 4, 4), 3, impl="cudnn")
    # geometry torch's own conv refuses: refused on every path, before any kernel runs
    for impl in ("torch", "triton"):
        with pytest.raises(ValueError, match="padding must be .* at least 0"):
            conv2d_weight_grad_sqnorm(x, torch.ones(2, 3, 2, 2), 3, padding=-1, impl=impl)
        with pytest.raises(ValueError, match="kernel_size must be .* at least 1"):
            conv2d_weight_grad_sqnorm(x, torch.ones(2, 3, 7, 7), 0, impl=impl)
        with pytest.raises(ValueError, match="stride must be .* at least 1"):
            conv2d_weight_grad_sqnorm(x, torch.ones(2, 3, 4, 4), 3, stride=0, impl=impl)
        with pytest.raises(ValueError, match="'same'"):
            conv2d_weight_grad_sqnorm(x, torch.ones(2, 3, 6, 6), 3, padding="same", impl=impl)


def test_compiles_for_hopper_without_a_gpu():
    # The interpreter never runs Triton's compiler; compile the real cubins (sm_90) as well.
    done = compile_in_subprocess(["conv2d_weight_grad"], arch=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fp32" in done.stdout and "bf16" in done.stdout and "fp64" in done.stdout
