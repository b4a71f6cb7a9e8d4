"""Orbax checkpoints: one composite item per step (state, data iterator, meta).

``DIR/checkpoints/<step>/{state,data,meta}``. Saves are async; a save that was
interrupted leaves a ``*.orbax-checkpoint-tmp`` dir that the manager ignores, so
the latest *complete* step is always what a resume restores. A complete step that
cannot be read (a truncated file, a disk error) is skipped with a one-line warning:
``restore_latest`` falls back to the newest readable step and never deletes anything.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from fmjax.data import elastic, pipeline
from fmjax.train import files


class IncompatibleCheckpointError(ValueError):
    pass


class UnreadableCheckpointError(IncompatibleCheckpointError):
    """Checkpoints exist but none of them can be read."""


def warn(msg: str):
    if jax.process_index() == 0:
        print(f"fmjax: warning: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)


def structure(abstract_state) -> dict[str, str]:
    """A digest of the tree structure, shapes and dtypes of each part of a TrainState.

    Stored in the checkpoint's meta, so a resume whose optimizer (or model) builds a
    different state is refused with one line before Orbax tries to restore into it.
    """
    out = {}
    for f in dataclasses.fields(abstract_state):
        tree = getattr(abstract_state, f.name)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        text = str(treedef) + "".join(
            f"{jax.tree_util.keystr(k)}:{getattr(v, 'shape', ())}:{getattr(v, 'dtype', '')};" for k, v in leaves)
        out[f.name] = hashlib.sha1(text.encode()).hexdigest()[:16]
    return out


# Orbax's replica-parallel save splits every replicated array into one slice per replica so
# that hosts share the writing. On one process every replica is local, so it only adds work:
# one sliced copy per replica and array (a tiny MAE on 8 CPU devices: 1,444 slices, 1.4 s of a
# 1.7 s save). One process writes each array whole; several split only arrays whose slices
# reach 1 MiB (the same bytes on disk either way, so each restores the other's checkpoints).
_MIN_REPLICA_SLICE_BYTES = 1 << 20


def _register_array_handler() -> None:
    multi = jax.process_count() > 1
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            use_replica_parallel=multi,
            min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES if multi else None),
        override=True)


def make_manager(workdir: str, keep: int = 3, keep_period: int | None = None,
                 async_save: bool = True) -> ocp.CheckpointManager:
    _register_array_handler()
    path = files.join(files.resolve(workdir), "checkpoints")  # Orbax reads and writes gs:// itself
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period, create=True,
        enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(path, options=options)


# Config keys that only steer inference (sampling) or how a value is computed, not the saved
# state: evaluating or sampling a checkpoint with another guidance scale or sampler, or
# resuming CLIP with the ring instead of the gathered loss (same values), or with another
# remat policy (same values, other memory; fmjax.models.scan), is not another run.
INFERENCE_ONLY_KEYS = {"objective": ("sample", "loss_impl"), "model": ("remat",)}
# Keys whose default is what checkpoints written before the key existed did: a fingerprint
# with the default equals one without the key (``scan_layers=True`` stores stacked params: a
# resume with the other layout is refused).
DEFAULT_KEYS = {"model": {"scan_layers": False}}


def fingerprint(config) -> dict[str, Any]:
    """The parts of a config that fix the shapes and meaning of the saved state."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    fp = {k: cfg.get(k) for k in ("model", "objective")}
    adapter = cfg.get("adapter")
    if isinstance(adapter, Mapping) and adapter.get("name"):  # no adapter: as before the key existed
        fp["adapter"] = {k: v for k, v in adapter.items() if k not in ("dropout", "checkpoint")}
    return _strip_inference_only(fp)


def _strip_inference_only(fp: Mapping) -> dict:
    out = dict(fp)
    for part, keys in INFERENCE_ONLY_KEYS.items():
        if isinstance(out.get(part), Mapping):
            out[part] = {k: v for k, v in out[part].items() if k not in keys}
    for part, defaults in DEFAULT_KEYS.items():
        if isinstance(out.get(part), Mapping):
            out[part] = {k: v for k, v in out[part].items()
                         if not (k in defaults and v == defaults[k] and type(v) is type(defaults[k]))}
    return out


OPTIMIZER_STRUCTURE_KEYS = ("name", "clip_norm", "clip_mode", "weight_decay_end", "adam_count")


def spec_to_json(spec) -> dict:
    return {k: [list(v.shape), str(v.dtype)] for k, v in spec.items()}


def spec_from_json(data) -> dict:
    return {k: jax.ShapeDtypeStruct(tuple(shape), dtype) for k, (shape, dtype) in data.items()}


def save(manager, step: int, state, data_iter, config, force: bool = False, spec=None,
         store=None) -> bool:
    """``spec``: the global batch spec, stored so that eval and sampling rebuild the state's
    shapes without reading training data. ``store`` (an ``adapter_ckpt.AdapterStore``): only
    the arrays an adapter trains are written, the frozen base is referenced by its digest."""
    meta = dict(fingerprint=fingerprint(config), step=int(step), structure=structure(state),
                batch_spec=spec_to_json(spec) if spec is not None else None,
                optimizer={k: config.optimizer.get(k) for k in OPTIMIZER_STRUCTURE_KEYS}
                if hasattr(config, "optimizer") else None,
                config=json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else None,
                versions=dict(jax=jax.__version__))
    if store is not None and store.prune_saves:
        meta.update(stored="adapter", adapter_base=store.meta(state))
        state = store.prune(state)
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
        items["data"] = (elastic.save_args(data_iter) if isinstance(data_iter, elastic.GlobalOrderIterator)
                         else pipeline.grain_save_args(data_iter))
    return manager.save(int(step), args=ocp.args.Composite(**items), force=force)


def read_meta(manager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def check_meta(meta: dict, config, directory, abstract_state=None, parts=None) -> None:
    """Raises a one-line ``IncompatibleCheckpointError`` if the checkpoint described by
    ``meta`` was written by another model / objective config, or (given the abstract state)
    holds a state of another structure, e.g. a resume with a different optimizer."""
    saved = _normalise(_strip_inference_only(meta.get("fingerprint", {})))
    now = _normalise(fingerprint(config))
    if saved != now:
        diffs = _diff(saved, now)
        raise IncompatibleCheckpointError(
            f"{directory} holds checkpoints of an incompatible config ({'; '.join(diffs[:4])}); "
            "use a new --workdir, or restore the original config to resume.")
    if abstract_state is None or "structure" not in meta:
        return
    have = structure(abstract_state)
    changed = [k for k in (parts or have) if k in meta["structure"] and meta["structure"][k] != have[k]]
    if not changed:
        return
    if "opt_state" in changed and meta.get("optimizer") is not None:
        now_opt = {k: config.optimizer.get(k) for k in OPTIMIZER_STRUCTURE_KEYS}
        diffs = _diff(_normalise(meta["optimizer"]), _normalise(now_opt), "optimizer.")
        raise IncompatibleCheckpointError(
            f"{directory} was trained with another optimizer state ({'; '.join(diffs[:4]) or 'its structure differs'}); "
            "resume with the original config.optimizer settings, or use a new --workdir.")
    raise IncompatibleCheckpointError(
        f"{directory} holds a train state whose {', '.join(changed)} differ from this config's; "
        "resume with the original config, or use a new --workdir.")


def _short(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(err).__name__
    return f"{type(err).__name__}: {text[:200]}"


def restore_latest(manager, config, abstract_state, shardings, data_iter=None, step=None,
                   with_opt_state: bool = True, move_unreadable_to: str | None = None, store=None):
    """``(step, state)`` of the newest readable checkpoint (or of ``step``), or ``(None, None)``.

    A complete step that cannot be read is skipped with a one-line warning naming its
    folder; with ``move_unreadable_to`` (training) the folder is moved there, not deleted,
    so later saves and rotation never touch it. A config or state-structure mismatch is an
    ``IncompatibleCheckpointError`` (not skipped). If checkpoints exist but none can be
    read, ``UnreadableCheckpointError`` names them: a run never restarts from 0 silently.
    ``store`` (``adapter_ckpt.AdapterStore``): puts the base under an adapter-only step.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
        if int(step) not in steps:
            raise IncompatibleCheckpointError(
                f"no checkpoint {step} in {manager.directory}; available: {sorted(steps)}.")
        steps = [int(step)]
    parts = None if with_opt_state else ["params", "extra", "step", "rng"]
    bad = []
    with _QuietFailedReads() as quiet:
        found = _first_readable(manager, config, abstract_state, shardings, data_iter, steps,
                                with_opt_state, parts, bad, store)
        quiet.failed = bool(bad)
    if found is None:
        if bad:
            folders = ", ".join(f for _, f, _ in bad)
            raise UnreadableCheckpointError(
                f"no checkpoint in {manager.directory} can be read ({folders}; first error: "
                f"{_short(bad[0][2])}); nothing was changed. Move those folders aside to start again "
                "from step 0, or restore them from a backup.")
        return None, None
    s, state = found
    for bs, bfolder, e in bad:
        where = _move_aside(bfolder, move_unreadable_to) if move_unreadable_to else bfolder
        warn(f"checkpoint {bfolder} cannot be read ({_short(e)}); "
             + (f"moved it to {where} (not deleted); " if move_unreadable_to else "")
             + f"using step {s} instead.")
    if bad and move_unreadable_to:
        manager.reload()
    return s, state


class _QuietFailedReads:
    """Holds back what the C++ readers print to stderr (fd 2) while checkpoints are tried.

    When one array of a step cannot be read, Orbax stops, closes its event loop, and the
    reads still in flight later print "Event loop is closed" tracebacks from tensorstore's
    threads. The failure itself is reported as one line by ``restore_latest``; so after a
    failed read that output is dropped (once the late callbacks have run), and otherwise
    written back unchanged.
    """

    def __init__(self):
        self.failed = False
        self._saved = self._tmp = None

    def __enter__(self):
        try:
            sys.stderr.flush()
            self._tmp = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._tmp.fileno(), 2)
        except (OSError, ValueError, AttributeError):  # no real fd 2 (e.g. a notebook): do nothing
            self._saved = None
        return self

    def _wait_until_quiet(self, quiet_s: float = 0.5, max_s: float = 10.0):
        """Until the captured output has not grown for ``quiet_s`` (at most ``max_s``): a fixed
        0.5 s was not always enough on a loaded machine (a late traceback leaked in CI)."""
        start = last_change = time.monotonic()
        size = -1
        while time.monotonic() - start < max_s:
            now_size = os.fstat(self._tmp.fileno()).st_size
            if now_size != size:
                size, last_change = now_size, time.monotonic()
            elif time.monotonic() - last_change >= quiet_s:
                return
            time.sleep(0.05)

    def __exit__(self, exc_type, *exc):
        if self._saved is None:
            return
        if self.failed or exc_type is not None:
            self._wait_until_quiet()  # let the abandoned reads finish and print into the void
            # Their futures are garbage-collected later, when asyncio logs "Task exception was
            # never retrieved" with the same traceback: already reported, so keep it quiet.
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        text = self._tmp.read().decode(errors="replace")
        self._tmp.close()
        if self.failed or exc_type is not None:
            text = "".join(ln for ln in text.splitlines(True) if ln.startswith("fmjax:"))
        if text:
            sys.stderr.write(text)
            sys.stderr.flush()


def _first_readable(manager, config, abstract_state, shardings, data_iter, steps, with_opt_state,
                    parts, bad, store=None):
    for s in steps:
        folder = files.join(str(manager.directory), str(s))
        try:
            meta = read_meta(manager, s)
        except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
            bad.append((s, folder, e))
            continue
        check_meta(meta, config, manager.directory, abstract_state, parts)
        if data_iter is not None:  # another process count / data order: one line, not "unreadable"
            elastic.check_restore(files.join(folder, "data"), data_iter)
        adapter_only = meta.get("stored") == "adapter"
        if adapter_only and store is None:
            raise IncompatibleCheckpointError(
                f"{folder} is an adapter-only checkpoint (its base comes from config.model_init="
                f"{(meta.get('adapter_base') or {}).get('model_init')!r}) but this config trains no "
                "adapter; resume with the original config.adapter, or use a new --workdir.")
        try:
            state = restore(manager, s, abstract_state, shardings, data_iter, with_opt_state,
                            store if adapter_only else None)
        except Exception as e:  # noqa: BLE001
            bad.append((s, folder, e))
            continue
        if adapter_only:
            state = store.fill(state, with_opt_state)
            store.check(state, meta, manager.directory)
        return s, state
    return None


def _move_aside(folder: str, dest_root: str) -> str:
    """Moves an unreadable step folder to ``dest_root/<step>[-k]`` (process 0); returns the path."""
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    dest = files.join(dest_root, name)
    k = 1
    while files.exists(dest):
        dest, k = files.join(dest_root, f"{name}-{k}"), k + 1
    if jax.process_index() == 0:
        files.makedirs(dest_root)
        files.move(folder, dest)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("fmjax_move_unreadable_checkpoint")
    return dest


def restore(manager, step: int, abstract_state, shardings, data_iter, with_opt_state: bool = True,
            store=None):
    """Restores state (resharded onto ``shardings``) and the data iterator in place.

    ``with_opt_state=False`` reads everything but the optimizer state (Orbax partial
    restore: its arrays are never loaded) and returns the state with ``opt_state=None``:
    what evaluation and sampling need, at a third of the memory for Adam. With ``store`` the
    step is adapter-only: its frozen arrays are read as the 0-d placeholders they are
    (``AdapterStore.fill`` puts the base in).
    """
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    if store is not None:
        target = store.prune_target(target)
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
        items["data"] = (elastic.restore_args(data_iter) if isinstance(data_iter, elastic.GlobalOrderIterator)
                         else pipeline.grain_restore_args(data_iter))
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]


def _has_item(manager, step, name) -> bool:
    return files.isdir(files.join(str(manager.directory), str(step), name))


def _normalise(tree: Mapping) -> Any:
    return json.loads(json.dumps(tree, sort_keys=True, default=str))


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: saved {a!r}, now {b!r}"]
