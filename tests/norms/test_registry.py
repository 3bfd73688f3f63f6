"""norms/registry.py: registration, lookup through the class hierarchy, replacing a rule."""
import pytest
import torch
from torch import nn

from gradnorm_engine import register_norm_rule
from gradnorm_engine.norms import NORM_RULES, find_norm_rule
from gradnorm_engine.norms.linear import linear_norms


@pytest.fixture
def clean_registry():
    saved = dict(NORM_RULES)
    yield
    NORM_RULES.clear()
    NORM_RULES.update(saved)


def test_builtin_rules_cover_every_required_layer():
    for layer in (nn.Linear(2, 2), nn.Conv1d(1, 1, 1), nn.Conv2d(1, 1, 1), nn.Conv3d(1, 1, 1),
                  nn.BatchNorm1d(1), nn.BatchNorm2d(1), nn.BatchNorm3d(1), nn.GroupNorm(1, 1),
                  nn.LayerNorm(1), nn.Embedding(2, 2)):
        assert find_norm_rule(layer) is not None, type(layer).__name__
    assert find_norm_rule(nn.ReLU()) is None
    assert find_norm_rule(nn.ConvTranspose2d(1, 1, 1)) is None  # not a Conv2d subclass


def test_subclasses_inherit_the_rule(clean_registry):
    class MyLinear(nn.Linear):
        pass

    assert find_norm_rule(MyLinear(2, 3)) is linear_norms

    @register_norm_rule(MyLinear)
    def my_rule(layer, inputs, grad_outputs):
        return {}

    assert find_norm_rule(MyLinear(2, 3)) is my_rule
    assert find_norm_rule(nn.Linear(2, 3)) is linear_norms


def test_registering_twice_needs_replace(clean_registry):
    with pytest.raises(ValueError, match="replace=True"):
        register_norm_rule(nn.Linear)(lambda layer, inputs, grad_outputs: {})
    new = register_norm_rule(nn.Linear, replace=True)(lambda layer, inputs, grad_outputs: {})
    assert find_norm_rule(nn.Linear(1, 1)) is new


def test_bad_registrations_are_refused():
    with pytest.raises(TypeError):
        register_norm_rule()
    with pytest.raises(TypeError):
        register_norm_rule(torch.Tensor)
