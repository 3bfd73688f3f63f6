"""The active-learning system built on the engine: LPLgrad and its baselines, end to end.

    from gradnorm_engine.al.loop import ALConfig, run_active_learning
    from gradnorm_engine.al.presets import get_preset

The engine (everything in ``gradnorm_engine`` outside this package) never imports from here.
"""
