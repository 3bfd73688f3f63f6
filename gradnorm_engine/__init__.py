"""gradnorm-engine: exact per-sample gradient-norm scoring for active learning.

    from gradnorm_engine import rank_unlabeled, score_pool
    res = rank_unlabeled(model, loader, k=1000)   # res.indices [k], res.scores [k]
    scores = score_pool(model, loader)            # [N], pool order
"""
from .api import RankResult, rank_unlabeled, score_pool, top_k
from .norms import register_norm_rule
from .per_parameter import per_parameter_sqnorms

__version__ = "0.1.0"

__all__ = ["RankResult", "per_parameter_sqnorms", "rank_unlabeled", "register_norm_rule", "score_pool", "top_k",
           "__version__"]
