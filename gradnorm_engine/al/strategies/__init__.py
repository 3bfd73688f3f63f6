"""Query strategies, by name. Each file registers one class; the imports below are the list.

    lplgrad        LossNet joint training + entropy-gradient-norm query (the engine)
    ent-gradnorm   CE training + entropy-gradient-norm query (the engine)
    learning-loss  LossNet joint training + largest predicted loss
    entropy        CE training + largest softmax entropy
    coreset        CE training + k-center greedy on penultimate embeddings
    random         CE training + uniform sample
    egl            CE training + expected gradient length over the classes (the engine)
    badge          CE training + k-means++ seeds on last-layer gradient embeddings (the engine)
"""
from .base import STRATEGIES, QueryContext, Strategy, make_strategy, register_strategy
from . import lplgrad, ent_gradnorm, learning_loss, entropy, coreset, random, egl, badge  # noqa: F401  (registration)

__all__ = ["STRATEGIES", "QueryContext", "Strategy", "make_strategy", "register_strategy"]
