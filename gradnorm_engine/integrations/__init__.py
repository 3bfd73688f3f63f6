"""Adapters for the active-learning libraries people already use.

Import the one you need; each imports its library only then, and says which extra to install
when it is missing (``pip install -e ".[integrations]"``):

    gradnorm_engine.integrations.baal        GradNorm, ExpectedGradientLength, Badge heuristics; gradnorm_loop,
                                             egl_loop, badge_loop (ActiveLearningLoop)
    gradnorm_engine.integrations.modal       gradnorm_sampling, egl_sampling, badge_sampling (modAL query
                                             strategies, skorch models)
    gradnorm_engine.integrations.skactiveml  GradNormSampling, EGLSampling, BadgeSampling (scikit-activeml
                                             pool strategies)
    gradnorm_engine.integrations.deepal      GradNormSampling, EGLSampling, BadgeSampling (DeepAL /
                                             DeepAL+ Strategy, no import)
    gradnorm_engine.integrations.smalltext   GradNormSampling, ExpectedGradientLengthSampling, BadgeSampling
                                             (small-text query strategies)

Every adapter's EGL and BADGE strategies: docs/integrations.md, "Expected gradient length and
BADGE in every adapter".
"""
