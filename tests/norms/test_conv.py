"""norms/conv.py: Conv1d/2d/3d rules, every option, each materialisation path and the Gram form,
against the per-sample loop in float64."""
import math

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from torch import nn

from gradnorm_engine.norms.conv import (_paddings, choose_conv_form, conv_weight_sqnorm, materialise_depthwise,
                                        materialise_per_sample, materialise_with_kernels, patch_gram_from_pixels,
                                        unfold_patches)
from gradnorm_engine.testing import check_rule

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def conv_layers(draw, dims=(1, 2, 3)):
    """A conv layer and an input batch, over every option the rule must handle."""
    nd = draw(st.sampled_from(dims))
    groups = draw(st.sampled_from([1, 2, "depthwise"]))
    cin_per = draw(st.integers(1, 2))
    if groups == "depthwise":
        channels = draw(st.integers(1, 4))
        groups, cin, cout = channels, channels, channels * draw(st.integers(1, 2))
    else:
        cin, cout = cin_per * groups, groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    if padding_kind == "same":
        stride = (1,) * nd
        padding = "same"
    elif padding_kind == "valid":
        padding = "valid"
    elif padding_kind == "int":
        padding = draw(st.integers(0, 2))
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
    size = tuple(draw(st.integers(3, 6 if nd < 3 else 4)) for _ in range(nd))
    layer = CONV[nd](cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=draw(st.booleans()), padding_mode=mode)
    pads = _paddings(layer)
    # Inputs torch accepts: a window fits, and reflect padding is smaller than the input.
    assume(all(s + lo + hi >= d * (k - 1) + 1 for s, (lo, hi), k, d in zip(size, pads, kernel, dilation)))
    assume(mode != "reflect" or all(max(lo, hi) < s for s, (lo, hi) in zip(size, pads)))
    assume(mode != "circular" or all(max(lo, hi) <= s for s, (lo, hi) in zip(size, pads)))
    batch = draw(st.sampled_from([1, 2, 3, 5]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layer.reset_parameters()
    return layer, torch.randn(batch, cin, *size)


@settings(max_examples=40, deadline=None)
@given(case=conv_layers())
def test_conv_rule_matches_per_sample_loop(case):
    layer, x = case
    check_rule(layer, x)


def _weight_only_rule(path):
    def rule(layer, inputs, grad_outputs):
        return {layer.weight: path(layer, inputs[0], grad_outputs[0])}
    rule.__name__ = f"conv_weight_{path.__name__}"
    return rule


PATHS = {
    "gram": lambda layer, x, g: conv_weight_sqnorm(layer, x, g, form="gram"),
    "pixel_gram": lambda layer, x, g: conv_weight_sqnorm(layer, x, g, form="pixel_gram"),
    "materialise": lambda layer, x, g: conv_weight_sqnorm(layer, x, g, form="materialise"),
    "kernels": lambda layer, x, g: materialise_with_kernels(layer, x, g, _paddings(layer)),
    "per_sample": lambda layer, x, g: materialise_per_sample(layer, x, g, _paddings(layer)),
}


@settings(max_examples=25, deadline=None)
@given(case=conv_layers())
def test_depthwise_grouped_conv_path_matches_per_sample_loop(case):
    layer, x = case
    assume(layer.in_channels == layer.groups)
    if layer.bias is not None:
        layer.bias.requires_grad_(False)
    path = lambda lay, xx, g: materialise_depthwise(lay, xx, g, _paddings(lay))  # noqa: E731
    check_rule(layer, x, rule=_weight_only_rule(path))


@pytest.mark.parametrize("path", sorted(PATHS))
@settings(max_examples=12, deadline=None)
@given(case=conv_layers())
def test_every_weight_path_matches_per_sample_loop(path, case):
    layer, x = case
    if layer.bias is not None:
        layer.bias.requires_grad_(False)
    fn = PATHS[path]
    fn.__name__ = path
    check_rule(layer, x, rule=_weight_only_rule(fn))


def test_unfold_patches_match_torch_unfold():
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    ours = unfold_patches(x, (3, 2), (2, 1), (1, 2), groups=2)             # (B*G, T, K)
    ref = nn.functional.unfold(x, (3, 2), dilation=(1, 2), stride=(2, 1))  # (B, C*k, T)
    ref = ref.reshape(2, 2, 2 * 3 * 2, -1).transpose(2, 3).reshape(4, -1, 12)
    torch.testing.assert_close(ours, ref)


def test_depthwise_and_channels_last_in_float32():
    layer = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    x = torch.randn(3, 6, 8, 8).to(memory_format=torch.channels_last)
    check_rule(layer.to(memory_format=torch.channels_last), x, dtype=torch.float32)


def test_cost_model_picks_gram_for_a_late_resnet_layer():
    """Both forms give the same answer where the cost model switches."""
    layer = nn.Conv2d(32, 32, 3, padding=1, bias=False).double()
    x = torch.randn(2, 32, 2, 2, dtype=torch.float64)   # T = 4 positions, p*d = 32*288
    g = torch.randn(2, 32, 2, 2, dtype=torch.float64)
    assert math.prod(g.shape[2:]) * (32 + 288) < 32 * 288
    assert choose_conv_form(layer, x.shape, g.shape) == "gram"
    expected = conv_weight_sqnorm(layer, x, g, form="materialise")
    torch.testing.assert_close(conv_weight_sqnorm(layer, x, g), expected)


@pytest.mark.parametrize("stride, dilation, groups", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 2, 3)])
def test_patch_gram_from_pixels_equals_the_unfolded_gram(stride, dilation, groups):
    x = torch.nn.functional.pad(torch.randn(2, 6, 7, 8, dtype=torch.float64), (1, 1, 2, 2))
    a = unfold_patches(x, (3, 2), (stride, stride), (dilation, dilation), groups)          # (B*G, T, K)
    out_shape = [(n - dilation * (k - 1) - 1) // stride + 1 for n, k in zip(x.shape[2:], (3, 2))]
    got = patch_gram_from_pixels(x, (3, 2), (stride, stride), (dilation, dilation), groups, out_shape)
    torch.testing.assert_close(got, torch.bmm(a, a.transpose(1, 2)))


def test_cost_model_picks_each_form_where_it_is_cheapest():
    """CIFAR ResNet-18 at batch 256: layer1 convs materialise, stride-1 convs from layer2 on use
    the pixel Gram, a strided 3x3 conv with a large input materialises."""
    conv = lambda c, o, s: nn.Conv2d(c, o, 3, stride=s, padding=1, bias=False)  # noqa: E731
    assert choose_conv_form(conv(64, 64, 1), (256, 64, 32, 32), (256, 64, 32, 32)) == "materialise"
    assert choose_conv_form(conv(128, 128, 1), (256, 128, 16, 16), (256, 128, 16, 16)) == "pixel_gram"
    assert choose_conv_form(conv(512, 512, 1), (256, 512, 4, 4), (256, 512, 4, 4)) == "pixel_gram"
    assert choose_conv_form(conv(64, 128, 2), (256, 64, 32, 32), (256, 128, 16, 16)) == "materialise"
    strided_late = conv(128, 256, 2)   # T=64 outputs but 18x18 padded pixels: the unfolded Gram
    assert choose_conv_form(strided_late, (256, 128, 16, 16), (256, 256, 8, 8)) == "gram"
    # On CPU oneDNN's per-sample backward is worth half its count: layer2 materialises there.
    assert choose_conv_form(conv(128, 128, 1), (32, 128, 16, 16), (32, 128, 16, 16), "cpu") == "materialise"
    assert choose_conv_form(conv(256, 256, 1), (32, 256, 8, 8), (32, 256, 8, 8), "cpu") == "pixel_gram"


@pytest.mark.parametrize("form", ["gram", "pixel_gram", "materialise"])
def test_float32_forms_keep_their_digits_on_a_common_input_level_against_cancelling_gradients(form):
    """Inputs at a level 1000x their spread, output gradients summing to zero over positions:
    the Gram products cancel unless the inputs are centred first (they lost 1-2 digits of 7)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3).double()
    x = 1000 + torch.randn(3, 4, 6, 6, dtype=torch.float64)
    g = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    g = g - g.mean(dim=(2, 3), keepdim=True)
    truth = conv_weight_sqnorm(conv, x, g, form="materialise")
    got = conv_weight_sqnorm(conv.float(), x.float(), g.float(), form=form).double()
    assert float(((got - truth).abs() / truth).max()) < 1e-4
