"""Adapters for the active-learning libraries people already use.

Import the one you need; each imports its library only then, and says which extra to install
when it is missing (``pip install -e ".[integrations]"``):

    gradnorm_engine.integrations.baal        GradNorm heuristic, gradnorm_loop (ActiveLearningLoop)
    gradnorm_engine.integrations.modal       gradnorm_sampling (modAL query strategy, skorch models)
    gradnorm_engine.integrations.skactiveml  GradNormSampling (scikit-activeml pool strategy)
    gradnorm_engine.integrations.deepal      GradNormSampling (DeepAL / DeepAL+ Strategy, no import)
"""
