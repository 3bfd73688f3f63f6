"""gradnorm_engine/testing.py: check_rule accepts right rules, reports wrong ones clearly."""
import pytest
import torch
from torch import nn

from gradnorm_engine import register_norm_rule, score_pool
from gradnorm_engine.norms import NORM_RULES
from gradnorm_engine.norms.linear import linear_norms
from gradnorm_engine.testing import RuleCheck, check_rule


def test_a_correct_rule_passes_and_reports_every_parameter():
    result = check_rule(nn.Linear(4, 3), torch.randn(5, 4))
    assert isinstance(result, RuleCheck) and result.ok
    assert [p.name for p in result.params] == ["weight", "bias"]
    assert "agrees" in result.report()


def test_a_wrong_rule_raises_with_a_report_naming_the_parameter():
    def doubled(layer, inputs, grad_outputs):
        norms = linear_norms(layer, inputs, grad_outputs)
        return {p: 2 * v if p is layer.weight else v for p, v in norms.items()}

    with pytest.raises(AssertionError, match=r"FAIL weight") as info:
        check_rule(nn.Linear(4, 3), torch.randn(5, 4), rule=doubled)
    assert "DISAGREES" in str(info.value) and "ok   bias" in str(info.value)


def test_mismatch_can_be_returned_instead_of_raised():
    def forgets_bias(layer, inputs, grad_outputs):
        return {layer.weight: linear_norms(layer, inputs, grad_outputs)[layer.weight]}

    result = check_rule(nn.Linear(4, 3), torch.randn(2, 4), rule=forgets_bias, raise_on_mismatch=False)
    assert not result.ok
    assert "no entry" in result.report()


def test_a_layer_without_a_rule_is_a_clear_error():
    with pytest.raises(ValueError, match="register_norm_rule"):
        check_rule(nn.PReLU(), torch.randn(3, 2))


class Scale(nn.Module):
    """y = x * w (per feature): a layer type the library has no rule for."""

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return x * self.w


def scale_norms(layer, inputs, grad_outputs):
    # d loss_b / d w = sum over leading dims of x_b * g_b
    per_sample = (inputs[0] * grad_outputs[0]).reshape(inputs[0].shape[0], -1, layer.w.numel()).sum(1)
    return {layer.w: per_sample.pow(2).sum(1)}


def test_user_rule_checks_then_runs_in_the_hooks_backend():
    check_rule(Scale(3), torch.randn(4, 2, 3), rule=scale_norms)
    saved = dict(NORM_RULES)
    try:
        register_norm_rule(Scale)(scale_norms)
        check_rule(Scale(3), torch.randn(4, 3))   # found through the registry now
        model = nn.Sequential(nn.Linear(3, 3), Scale(3), nn.Linear(3, 2)).double()
        x = torch.randn(5, 3, dtype=torch.float64)
        hooks = score_pool(model, [x], backend="hooks", progress=False)
        loop = score_pool(model, [x], backend="loop", progress=False)
        torch.testing.assert_close(hooks, loop, rtol=1e-9, atol=0)
    finally:
        NORM_RULES.clear()
        NORM_RULES.update(saved)


def test_float32_comparison_and_integer_inputs_kept():
    result = check_rule(nn.Embedding(7, 3), torch.tensor([[1, 1, 2], [6, 0, 1]]), dtype=torch.float32)
    assert result.ok and result.dtype == torch.float32


class ScaledLinear(nn.Module):
    """A block with a parameter of its own and a child layer (which has its own rule)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) * self.scale


def scaled_rule(layer, inputs, grad_outputs):
    with torch.no_grad():
        out = layer.lin(inputs[0])
    return {layer.scale: (grad_outputs[0] * out).pow(2).sum(dim=1)}


def test_a_rule_is_checked_on_the_parameters_its_layer_owns_directly():
    result = check_rule(ScaledLinear(), torch.randn(5, 4), rule=scaled_rule)
    assert result.ok and [p.name for p in result.params] == ["scale"]


def test_a_rule_returning_no_dict_or_no_tensor_is_named():
    with pytest.raises(TypeError, match="returned a NoneType"):
        check_rule(nn.Linear(4, 3), torch.randn(5, 4), rule=lambda layer, i, g: None)
    result = check_rule(nn.Linear(4, 3), torch.randn(5, 4), rule=lambda layer, i, g: {layer.weight: 1.0,
                                                                                         layer.bias: [0.0]},
                        raise_on_mismatch=False)
    assert not result.ok and "returned a float" in result.report() and "returned a list" in result.report()
