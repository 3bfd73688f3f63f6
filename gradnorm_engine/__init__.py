"""gradnorm-engine: exact per-sample gradient-norm scoring for active learning.

    from gradnorm_engine import rank_unlabeled, score_pool
    res = rank_unlabeled(model, loader, k=1000)   # res.indices [k], res.scores [k]
    scores = score_pool(model, loader)            # [N], pool order
"""
from ._checkout import load_checkout_kernels

load_checkout_kernels(__name__, __path__[0])   # a source checkout: its own kernels/, not another checkout's

from .api import RankResult, rank_unlabeled, score_pool, top_k  # noqa: E402 - after the kernels
from .norms import register_norm_rule  # noqa: E402
from .badge import badge  # noqa: E402
from .egl import expected_gradient_length  # noqa: E402
from .explain import explain  # noqa: E402
from .per_parameter import per_parameter_sqnorms  # noqa: E402

__version__ = "0.1.0"

__all__ = ["RankResult", "badge", "expected_gradient_length", "explain", "per_parameter_sqnorms", "rank_unlabeled",
           "register_norm_rule", "score_pool", "top_k", "__version__"]
