"""Orbax checkpoints: one composite item per step (state, data iterator, meta).

``DIR/checkpoints/<step>/{state,data,meta}``. Saves are async; a save that was
interrupted leaves a ``*.orbax-checkpoint-tmp`` dir that the manager ignores, so
the latest *complete* step is always what a resume restores.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from fmjax.data import pipeline


class IncompatibleCheckpointError(ValueError):
    pass


def make_manager(workdir: str, keep: int = 3, keep_period: int | None = None,
                 async_save: bool = True) -> ocp.CheckpointManager:
    path = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period, create=True,
        enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(path, options=options)


def fingerprint(config) -> dict[str, Any]:
    """The parts of a config that fix the shapes and meaning of the saved state."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: cfg.get(k) for k in ("model", "objective")}


def save(manager, step: int, state, data_iter, config, force: bool = False) -> bool:
    meta = dict(fingerprint=fingerprint(config), step=int(step),
                config=json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else None,
                versions=dict(jax=jax.__version__))
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
        items["data"] = pipeline.grain_save_args(data_iter)
    return manager.save(int(step), args=ocp.args.Composite(**items), force=force)


def check_compatible(manager, config) -> int | None:
    """Returns the latest step, raising a one-line error if it was written by another config."""
    step = manager.latest_step()
    if step is None:
        return None
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved, now = _normalise(meta.get("fingerprint", {})), _normalise(fingerprint(config))
    if saved != now:
        diffs = _diff(saved, now)
        raise IncompatibleCheckpointError(
            f"{manager.directory} holds checkpoints of an incompatible config ({'; '.join(diffs[:4])}); "
            "use a new --workdir, or restore the original config to resume.")
    return step


def restore(manager, step: int, abstract_state, shardings, data_iter, with_opt_state: bool = True):
    """Restores state (resharded onto ``shardings``) and the data iterator in place.

    ``with_opt_state=False`` reads everything but the optimizer state (Orbax partial
    restore: its arrays are never loaded) and returns the state with ``opt_state=None``:
    what evaluation and sampling need, at a third of the memory for Adam.
    """
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    if not with_opt_state:
        part = {f.name: getattr(target, f.name) for f in dataclasses.fields(target)
                if f.name != "opt_state"}
        args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(
            sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), part)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            part, restore_args=args, partial_restore=True)))
        return dataclasses.replace(target, opt_state=None, **restored["state"])
    items = dict(state=ocp.args.StandardRestore(target))
    if data_iter is not None and _has_item(manager, step, "data"):
        items["data"] = pipeline.grain_restore_args(data_iter)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]


def _has_item(manager, step, name) -> bool:
    return os.path.isdir(os.path.join(str(manager.directory), str(step), name))


def _normalise(tree: Mapping) -> Any:
    return json.loads(json.dumps(tree, sort_keys=True, default=str))


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: saved {a!r}, now {b!r}"]
