"""Per-layer norm rules: (layer, its inputs, d summed-loss / d output) -> per-sample squared
norms of the layer's parameter gradients. One file per layer family; the registry resolves a
layer's rule through its class hierarchy.

    from gradnorm_engine.norms import find_norm_rule, register_norm_rule
"""
from .registry import (NORM_RULES, NormRule, check_rule_result, entry_problem, find_norm_rule, register_norm_rule,
                       rule_name)

# The built-in rules register themselves when their files are imported, here and only here.
from . import conv, embedding, linear, normalization  # noqa: E402,F401

__all__ = ["NORM_RULES", "NormRule", "check_rule_result", "entry_problem", "find_norm_rule", "register_norm_rule",
           "rule_name"]
