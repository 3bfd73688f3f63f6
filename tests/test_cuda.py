"""The CUDA paths against the per-sample loop: compiled Triton kernels inside the conv and linear
rules, the hooks backend on whole models, autocast and channels_last on a real GPU.

Skipped where no GPU is visible (CI). On a GPU machine run them with the kernels compiled, not
interpreted:

    TRITON_INTERPRET=0 python -m pytest -q tests/test_cuda.py
"""
import pytest
import torch
from hypothesis import Phase, given, settings
from torch import nn

from gradnorm_engine import score_pool
from gradnorm_engine.kernels import (batch_norm_grad_sqnorm, conv2d_weight_grad_sqnorm, linear_weight_grad_sqnorm,
                                    per_sample_sumsq)
from gradnorm_engine.kernels._dispatch import is_interpreted
from gradnorm_engine.kernels.conv2d_weight_grad import _conv2d_weight_grad_sqnorm_kernel
from gradnorm_engine.al.models import cifar_resnet18
from gradnorm_engine.norms.conv import _paddings, conv_weight_sqnorm, materialise_with_kernels
from gradnorm_engine.testing import check_rule
from tests.architectures import ARCHITECTURES
from tests.reference import max_rel_err, reference_scores
from tests.norms.test_conv import _weight_only_rule, conv_layers

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(is_interpreted(_conv2d_weight_grad_sqnorm_kernel),
                       reason="kernels decorated for Triton's interpreter: run with TRITON_INTERPRET=0"),
]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _full_float32():
    """cuDNN and cuBLAS default to TF32 for float32 on this hardware, which would make the
    per-sample loop itself the least exact side of every float32 comparison."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

# Every new conv geometry compiles new kernel variants (seconds each): no shrinking on a failure.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


@settings(max_examples=12, deadline=None, phases=NO_SHRINK)
@given(case=conv_layers(dims=(1, 2)))
def test_compiled_conv_kernel_path_matches_the_loop_in_float64(case):
    layer, x = case
    if layer.bias is not None:
        layer.bias.requires_grad_(False)
    rule = _weight_only_rule(lambda lay, xx, g: materialise_with_kernels(lay, xx, g, _paddings(lay)))
    check_rule(layer.to(CUDA), x.to(CUDA), rule=rule)


@settings(max_examples=8, deadline=None, phases=NO_SHRINK)
@given(case=conv_layers())
def test_conv_rule_on_cuda_matches_the_loop_in_float32(case):
    layer, x = case
    check_rule(layer.to(CUDA), x.to(CUDA), dtype=torch.float32)


@pytest.mark.parametrize("form", ["materialise", "gram", "pixel_gram"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_every_conv_form_on_cuda_matches_the_loop_in_float32(form, layout):
    for c, o, size, stride, groups in ((16, 32, 12, 1, 1), (32, 32, 9, 2, 2), (64, 64, 6, 1, 64)):
        layer = nn.Conv2d(c, o, 3, stride=stride, padding=1, groups=groups).to(CUDA).to(memory_format=layout)
        x = torch.randn(5, c, size, size, device=CUDA).to(memory_format=layout)
        rule = _weight_only_rule(lambda lay, xx, g: conv_weight_sqnorm(lay, xx, g, form=form))
        layer.bias.requires_grad_(False)
        check_rule(layer, x, rule=rule, dtype=torch.float32)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_kernels_at_resnet_shapes_match_float64(dtype, rtol):
    """bf16 inputs: exact products in fp32, so only the fp32 sums differ from float64."""
    gen = torch.Generator(device=CUDA).manual_seed(0)
    for C, H, O, k, s, p in ((64, 32, 64, 3, 1, 1), (64, 32, 128, 3, 2, 1), (64, 32, 128, 1, 2, 0),
                             (256, 8, 256, 3, 1, 1)):
        Ho = (H + 2 * p - k) // s + 1
        x = torch.randn(7, C, H, H, device=CUDA, generator=gen).to(dtype)
        g = torch.randn(7, O, Ho, Ho, device=CUDA, generator=gen).to(dtype)
        for layout in (torch.contiguous_format, torch.channels_last):
            xl, gl = x.to(memory_format=layout), g.to(memory_format=layout)
            got = conv2d_weight_grad_sqnorm(xl, gl, k, s, p, impl="triton")
            want = conv2d_weight_grad_sqnorm(x.double(), g.double(), k, s, p, impl="torch")
            err = max_rel_err(got, want)
            assert err < rtol, (C, H, O, k, s, layout, err)
    for T, d, p in ((64, 256, 384), (6, 3, 5), (1, 17, 9)):
        a = torch.randn(5, T, d, device=CUDA, generator=gen).to(dtype)
        g = torch.randn(5, T, p, device=CUDA, generator=gen).to(dtype)
        got = linear_weight_grad_sqnorm(a, g, impl="triton")
        err = max_rel_err(got, linear_weight_grad_sqnorm(a.double(), g.double(), impl="torch"))
        assert err < rtol, (T, d, p, err)
    mean, inv_std = torch.randn(64, device=CUDA, generator=gen), torch.rand(64, device=CUDA, generator=gen) + 0.5
    for shape in ((7, 64, 32, 32), (7, 64, 4, 4), (7, 64)):
        x = (torch.randn(*shape, device=CUDA, generator=gen) + 1).to(dtype)
        g = torch.randn(*shape, device=CUDA, generator=gen).to(dtype)
        want = batch_norm_grad_sqnorm(x.double(), g.double(), mean.double(), inv_std.double(), impl="torch")
        for layout in ((torch.contiguous_format, torch.channels_last) if len(shape) == 4 else (None,)):
            xl, gl = (x, g) if layout is None else (x.to(memory_format=layout), g.to(memory_format=layout))
            got = batch_norm_grad_sqnorm(xl, gl, mean, inv_std, impl="triton")
            errs = [max_rel_err(a, b) for a, b in zip(got, want)]
            assert max(errs) < rtol, ("batch_norm", shape, layout, errs)
    grads = [torch.randn(3, *shape, device=CUDA, generator=gen).to(dtype)
             for shape in ((7,), (5, 4), (64, 64, 3, 3), (100_003,))]
    got = per_sample_sumsq(grads, per_tensor=True, impl="triton")
    want = per_sample_sumsq([t.double() for t in grads], per_tensor=True, impl="torch")
    err = max_rel_err(got, want)
    assert err < rtol, ("per_sample_sumsq", err)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_on_cuda_matches_the_loop_in_float64(name):
    factory, make_input = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = factory().double().to(CUDA)
    x = make_input(5)
    x = (x.double() if x.is_floating_point() else x).to(CUDA)
    want = reference_scores(model, x)
    errors = {backend: max_rel_err(score_pool(model, [x[:2], x[2:]], backend=backend, progress=False), want)
              for backend in ("hooks", "vmap")}
    assert max(errors.values()) < 1e-9, errors


@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet18_float32_on_cuda_matches_the_loop(channels_last):
    torch.manual_seed(0)
    model = cifar_resnet18().to(CUDA)
    x = torch.randn(6, 3, 32, 32, device=CUDA)
    want = reference_scores(model, x)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    got = score_pool(model, [x], backend="hooks", progress=False)
    assert max_rel_err(got, want) < 1e-4


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_resnet18_autocast_channels_last_on_cuda_is_close_to_the_loop(autocast):
    """Low-precision forwards differ between a batch and one sample; fp32 accumulation keeps the
    scores within a few percent of the per-sample loop under the same autocast."""
    torch.manual_seed(0)
    model = cifar_resnet18().to(CUDA).to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 32, 32, device=CUDA).to(memory_format=torch.channels_last)
    got = score_pool(model, [x], backend="hooks", autocast=autocast, progress=False)
    loop = score_pool(model, [x], backend="loop", autocast=autocast, progress=False)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, loop, rtol=5e-2, atol=1e-6)


def test_no_model_state_changes_on_cuda():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)).to(CUDA)
    model(torch.randn(2, 3, 8, 8, device=CUDA))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    score_pool(model, [torch.randn(5, 3, 8, 8, device=CUDA)], backend="hooks", progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
