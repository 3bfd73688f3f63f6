"""Norm rules: per-sample squared norms of parameter gradients, from one batched backward.

Two kinds, one file per layer family:
  per-layer rules  (layer, its inputs, d summed-loss / d output) -> {parameter: [B]}, for user layers
                   (``register_norm_rule``; the registry resolves a layer's rule through its classes)
  op rules         (a recorded torch op call, d summed-loss / d its output) -> norms or per-sample
                   gradients of the parameters the op takes (norms/ops.py), wherever the samples sit
                   in the op's tensors (norms/layout.py)

    from gradnorm_engine.norms import find_norm_rule, register_norm_rule
"""
from .registry import (NORM_RULES, NormRule, check_rule_result, entry_problem, find_norm_rule, register_norm_rule,
                       rule_name)

# The built-in rules register themselves when their files are imported, here and only here.
from . import generic  # noqa: E402,F401  (first: the op rules of the families may use it)
from . import activation, conv, elementwise, embedding, linear, normalization  # noqa: E402,F401

# The layer rules the library itself registers: the hooks backend scores those layers through their
# ops instead, and gives a forward hook only to layers whose rule a user registered.
BUILT_IN_RULES = dict(NORM_RULES)

__all__ = ["BUILT_IN_RULES", "NORM_RULES", "NormRule", "check_rule_result", "entry_problem", "find_norm_rule",
           "register_norm_rule", "rule_name"]
