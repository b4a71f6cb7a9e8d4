"""Ahead-of-time compilation for target machines: will a config fit, and how fast might it run.

``chips`` (the chip table and topology names), ``spec`` (a batch spec from the config alone),
``report`` (compile the real train step for a target and account for its memory per chip).
"""
