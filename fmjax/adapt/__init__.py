"""Adapters applied from outside the model, selected by ``config.adapter``.

``config.adapter = dict(name='lora', rank=8, alpha=16.0, targets='attn/(query|value)$',
train=('head/.*',), dropout=0.0)`` wraps the objective (``fmjax.objectives.base.make_objective``)
in an ``AdaptedObjective``: every method of the objective runs inside the adapter's
``inject.hooks`` context, so the adapter params are created by ``init`` beside the modules
they adapt (``.../attn/query/lora_a``) and used by the loss, the evaluators, the pictures and
sampling alike, with no edit to the model, the objective or the trainer. Only the adapter
params, plus the params whose '/'-joined path matches a ``train`` regex (``re.fullmatch``;
e.g. a new classifier head), are updated: the rest is frozen through the objective's
``update_mask`` (no update, no weight decay; the trainer's frozen-param path), so the base
params stay bit-identical. The base weights come from ``config.model_init`` (a workdir or a
converted checkpoint) as for any fine-tuning.

Adapters: ``lora`` (``fmjax.adapt.lora``). ``name=''`` (or no ``config.adapter``): none.

Not yet here (issue 18): Houlsby adapters, prefix and prompt tuning, LoRA dropout, and
checkpoints holding the adapter params alone (they hold every param today).
"""
from __future__ import annotations

import inspect
import math
import re

import flax.linen as nn
import jax

from fmjax.adapt import lora as lora_lib
from fmjax.errors import ConfigError
from fmjax.models import inject

ADAPTERS = ("lora",)
KEYS = {"lora": ("name", "rank", "alpha", "targets", "train", "dropout")}
DEFAULT_TARGETS = r"attn/(query|value)$"


def _get(a, key, default):
    v = a.get(key, default) if hasattr(a, "get") else default
    return default if v is None else v


def spec(config) -> dict | None:
    """The checked ``config.adapter`` as a plain dict, or None when no adapter is set.
    Bad values are one-line ConfigErrors."""
    a = config.get("adapter") if hasattr(config, "get") else None
    name = _get(a, "name", "") if a is not None else ""
    if not name:
        return None
    if name not in ADAPTERS:
        raise ConfigError(f"config.adapter.name={name!r}; valid: {list(ADAPTERS)} (or '' for none).")
    unknown = sorted(set(a.keys()) - set(KEYS[name]))
    if unknown:
        raise ConfigError(f"config.adapter has unknown keys {unknown} for {name!r}; valid: {list(KEYS[name])}.")
    rank, alpha = _get(a, "rank", 8), _get(a, "alpha", None)
    if not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"config.adapter.rank={rank!r} must be an int >= 0 (0: no LoRA params).")
    alpha = float(2 * rank if alpha is None else alpha)
    targets = _get(a, "targets", DEFAULT_TARGETS)
    train = _get(a, "train", ())
    train = (train,) if isinstance(train, str) else tuple(train)
    for what, pats in (("targets", (targets,)), ("train", train)):
        for p in pats:
            try:
                re.compile(p)
            except (re.error, TypeError) as e:
                raise ConfigError(f"config.adapter.{what}={p!r} is not a regex ({e}).") from None
    dropout = float(_get(a, "dropout", 0.0))
    if dropout != 0.0:
        raise ConfigError(f"config.adapter.dropout={dropout}: LoRA dropout is not implemented yet; use 0.")
    return dict(name=name, rank=rank, alpha=alpha, targets=targets, train=train)


def trainable_mask(params, adapter: dict):
    """Tree of bools like ``params``: True for the adapter params and the ``train`` regexes."""
    train = [re.compile(p) for p in adapter["train"]]

    def keep(path, _):
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        if keys and keys[-1] in lora_lib.LORA_PARAMS:
            return True
        name = "/".join(keys)
        return any(p.fullmatch(name) for p in train)
    return jax.tree_util.tree_map_with_path(keep, params)


class AdaptedObjective:
    """An objective whose every method runs with the adapter's hooks active, and whose
    ``update_mask`` freezes every non-adapter param (see the module docstring)."""

    def __init__(self, inner, adapter: dict):
        self._inner, self.adapter = inner, adapter
        self._hooks = inject.hooks(dense=lora_lib.lora_hook(adapter["rank"], adapter["alpha"],
                                                            adapter["targets"]))

    def _wrap(self, fn):
        def call(*args, **kwargs):
            with self._hooks:
                return fn(*args, **kwargs)
        call.__name__ = getattr(fn, "__name__", "call")
        call.__doc__ = getattr(fn, "__doc__", None)
        return call

    def __getattr__(self, name):
        from fmjax.objectives.base import OPTIONAL_HOOKS, _STUBS, supports
        inner = self.__dict__["_inner"]
        if name in OPTIONAL_HOOKS + _STUBS and not supports(inner, name):
            return None
        attr = getattr(inner, name)
        return self._wrap(attr) if inspect.ismethod(attr) else attr

    def update_mask(self, params, step):
        mask = trainable_mask(params, self.adapter)
        from fmjax.objectives.base import supports
        if supports(self._inner, "update_mask"):
            with self._hooks:
                inner = self._inner.update_mask(params, step)
            mask = jax.tree.map(lambda a, b: a & b, mask, inner)
        return mask

    def trainable_count(self, params) -> int:
        """Parameters the adapter trains (the banner's 'trainable')."""
        params = nn.unbox(params)
        return sum(math.prod(x.shape) for x, m in zip(jax.tree.leaves(params),
                                                      jax.tree.leaves(trainable_mask(params, self.adapter))) if m)


def wrap(objective, config):
    """``objective`` wrapped by ``config.adapter``'s adapter, or unchanged when none is set."""
    a = spec(config)
    return objective if a is None else AdaptedObjective(objective, a)
