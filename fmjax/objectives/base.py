"""The objective interface: everything method-specific lives behind it.

The trainer only knows this protocol (see docs/design.md):

    init(rng, batch) -> (params, extra)       # params are trained; extra is carried, sharded, checkpointed
    loss(params, extra, batch, rng, step) -> (loss, (metrics, extra))
    after_update(params, extra, step) -> extra
    features(params, extra, images) -> [B, D] embedding for kNN / linear probe / retrieval

Optional hooks the trainer uses when present:
    visualize(params, extra, batch, rng) -> {name: uint8 HxWx3}   # pictures for DIR/images/
    eval_metrics(params, extra, batch, rng) -> {name: [B] per-example values}
    project_params(params, step) -> params   # applied right after each update (e.g. clamps)
    update_mask(params, step) -> tree of bool  # False: the param is not updated (no decay either)
    text_features(params, extra, tokens) -> [B, D]  # text embedding for zero-shot / retrieval
    after_model_init(params, extra) -> extra  # after config.model_init loaded params (default: unchanged)
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping

import jax

Params = Any
Extra = Any
Metrics = Mapping[str, jax.Array]


class Objective:
    """Base class with the default (identity) hooks."""

    #: Batch keys the objective reads; the data pipeline keeps only these.
    batch_keys: tuple[str, ...] = ("image",)

    def __init__(self, config):
        self.config = config

    def init(self, rng, batch) -> tuple[Params, Extra]:
        raise NotImplementedError

    def loss(self, params, extra, batch, rng, step):
        raise NotImplementedError

    def after_update(self, params, extra, step) -> Extra:
        return extra

    def features(self, params, extra, images) -> jax.Array:
        raise NotImplementedError

    def after_model_init(self, params, extra) -> Extra:
        """The objective state for params that ``config.model_init`` partly replaced after
        ``init`` (fresh starts only). Default: unchanged; objectives whose state starts as a
        copy of the params (an EMA teacher, EMA weights) copy the loaded params."""
        return extra


def available() -> list[str]:
    import fmjax.objectives as pkg
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in ("base",))


def make_objective(config) -> Objective:
    """Imports ``fmjax.objectives.<config.objective.name>`` and calls its ``make(config)``."""
    name = config.objective.name
    if name not in available():
        raise ValueError(f"Unknown objective {name!r}; valid objectives: {available()}.")
    module = importlib.import_module(f"fmjax.objectives.{name}")
    return module.make(config)
