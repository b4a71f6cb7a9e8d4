"""The training loop, in phases: check, data, state, compile, restore, train, evaluate.

Everything here is importable (a notebook can call ``train_and_evaluate``);
``launch/train.py`` only parses flags and calls it.
"""
from __future__ import annotations

import json
import math
import os
import signal

import jax
import numpy as np

from fmjax.data import pipeline, sources
from fmjax.objectives.base import make_objective
from fmjax.parallel import mesh as mesh_lib
from fmjax.parallel import rules as rules_lib
from fmjax.train import checkpoint as ckpt
from fmjax.train import optimizer as opt_lib
from fmjax.train import state as state_lib
from fmjax.train import step as step_lib
from fmjax.train import validate
from fmjax.train.evaluate import Evaluator, parse_pp
from fmjax.train.writer import MetricWriter, Progress, log


class _Preemption:
    """Turns SIGTERM into a flag checked once per step (save, then exit 0)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def sync(self) -> bool:
        """All processes agree to stop if any of them was asked to."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.array(self.requested, np.int32))
        return bool(np.asarray(flags).any())


def _batch_spec(source, transform, keys, global_batch):
    """Shapes of one global batch, from one transformed example (the iterator is untouched)."""
    try:
        example = transform(source[0], np.random.default_rng(0))
    except (KeyError, ValueError, TypeError) as e:  # e.g. keep() of a key the data lacks
        raise validate.ConfigError(f"config.data.pp_train fails on the first training example: "
                                   f"{e}") from None
    missing = [k for k in keys if k not in example]
    if missing:
        raise validate.ConfigError(
            f"the objective needs batch keys {list(keys)} but config.data.pp_train gives "
            f"{sorted(example)}: add {missing} to its keep(...) and the ops that make them"
            + (" (hard negatives: swap_words(words)|tokenize(..., key='neg_caption', "
               "outkey='neg_tokens'))" if "neg_tokens" in missing else "") + ".")
    return {k: jax.ShapeDtypeStruct((global_batch,) + np.asarray(example[k]).shape,
                                    jax.dtypes.canonicalize_dtype(np.asarray(example[k]).dtype))
            for k in keys}


def _host_arrays(local, spec):
    """The spec'd entries of a host batch, in the dtypes the step was compiled for (int64 -> int32)."""
    return {k: np.asarray(local[k], dtype=spec[k].dtype) for k in spec}


def build(config, devices=None):
    """(objective, mesh, logical rules) from a config; bad names are ``ConfigError``s."""
    try:
        return (make_objective(config), mesh_lib.make_mesh(config.mesh, devices),
                rules_lib.get_rules(config.get("sharding", "fsdp")))
    except ValueError as e:  # unknown names, impossible meshes: the user's input, not a bug
        raise validate.ConfigError(str(e)) from None


def train_and_evaluate(config, workdir: str, devices=None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns final metrics.

    ``devices``: the devices of the mesh (default all); tests use subsets to restore a
    checkpoint onto fewer devices than wrote it.
    """
    workdir = os.path.abspath(workdir)
    log(f"== fmjax: {config.objective.name} | workdir {workdir} | "
        f"{jax.process_count()} process(es), {len(devices or jax.devices())} device(s) ({jax.devices()[0].platform})")

    # -- 1. Check the config: every error here is one line, before any compile. ---------------
    objective, mesh, rules = build(config, devices)
    validate.check(config, objective, mesh)
    evaluator = Evaluator(config, objective, mesh, rules)  # checks config.evals (and classifiers)
    source = sources.get_source(config.data.name, config.data.get("train_split", "train"),
                                config.data.get("data_dir"))
    transform = parse_pp(config.data.pp_train, "config.data.pp_train")
    spec = _batch_spec(source, transform, objective.batch_keys, config.batch_size)
    manager = ckpt.make_manager(workdir, keep=config.get("keep_checkpoints", 3),
                                keep_period=config.get("keep_period") or None)
    latest = ckpt.check_compatible(manager, config)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    # -- 2. Data. -------------------------------------------------------------------------------
    data_iter = pipeline.make_train_iterator(
        source, global_batch_size=config.batch_size, transform=transform, seed=config.seed,
        worker_count=config.data.get("worker_count", 0))
    log(f"== data: {config.data.name} ({len(source)} train examples), global batch {config.batch_size}, "
        f"mesh {dict(mesh.shape)}")

    # -- 3. Model, optimizer and sharded state. --------------------------------------------------
    tx, schedule = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    abstract, shardings, boxed = state_lib.state_shardings(objective, tx, spec, mesh, rules, config.seed)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    frac = rules_lib.replicated_fraction(shardings.params, boxed)
    log(f"== model: {n_params / 1e6:.2f}M params; {frac:.0%} of large-param bytes replicated "
        f"(sharding preset {config.get('sharding', 'fsdp')!r})")
    if mesh.shape["fsdp"] > 1 and frac > config.get("max_replicated_fraction", 0.5):
        raise validate.ConfigError(
            f"mesh fsdp={mesh.shape['fsdp']} leaves {frac:.0%} of large params replicated; "
            "use --config.sharding=fsdp or a smaller fsdp axis.")
    if latest is None:
        state, _ = state_lib.create_state(objective, tx, spec, mesh, rules, config.seed, shardings)
        start = 0
    else:
        log(f"== resuming from step {latest}")
        state = ckpt.restore(manager, latest, abstract, shardings, data_iter)
        start = int(latest)

    # -- 4. Compile ahead of time. ---------------------------------------------------------------
    batch_sh = mesh_lib.batch_sharding(mesh)
    step_fn = step_lib.make_train_step(objective, tx, schedule, rules, config.get("grad_accum_steps", 1))
    jitted = step_lib.jit_train_step(step_fn, shardings, jax.tree.map(lambda _: batch_sh, spec))
    with state_lib.mesh_context(mesh):
        compiled = jitted.lower(state, spec).compile()
    mem = compiled.memory_analysis()
    if mem is not None and hasattr(mem, "temp_size_in_bytes"):
        log(f"== compiled: temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, "
            f"args {mem.argument_size_in_bytes / 2**20:.1f} MiB per device")

    # -- 5. Train. --------------------------------------------------------------------------------
    writer = MetricWriter(workdir, config.total_steps)
    progress = Progress(config.total_steps, config.batch_size, start)
    final: dict = {}
    if start == 0 and config.get("eval_at_start", True) and config.evals:
        final.update(evaluator.run(list(config.evals), state, writer, 0))
        writer.write(0, final)
        log(f"   eval @0: {_fmt(final)}")
    step = start
    with _Preemption() as preempt:
        while step < config.total_steps:
            local = next(data_iter)
            batch = pipeline.global_batch(_host_arrays(local, spec), mesh)
            state, metrics = compiled(state, batch)
            step += 1
            if step % config.log_every == 0 or step == config.total_steps:
                metrics = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
                if not math.isfinite(metrics["train/loss"]):
                    raise FloatingPointError(
                        f"train/loss is {metrics['train/loss']} at step {step}; nothing was saved for "
                        "this step. Lower the learning rate or enable clipping (--config.optimizer.clip_norm=1).")
                metrics.update(progress.rates(step))
                writer.write(step, metrics)
                log(progress.line(step, metrics))
                warning = objective.health(metrics) if hasattr(objective, "health") else None
                if warning:  # e.g. DINO's collapse monitors
                    log(f"   WARNING @{step}: {warning}")
                final.update(metrics)
            stop = preempt.sync()
            due = evaluator.due(step, config.total_steps)
            if due:
                ev = evaluator.run(due, state, writer, step)
                if ev:
                    writer.write(step, ev)
                    log(f"   eval @{step}: {_fmt(ev)}")
                    final.update(ev)
            if stop or step % config.checkpoint_every == 0 or step == config.total_steps:
                ckpt.save(manager, step, state, data_iter, config, force=stop)
            if stop:
                log(f"== SIGTERM: saved step {step}; exiting cleanly")
                break
    manager.wait_until_finished()
    manager.close()
    writer.close()
    final["step"] = step
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=1)
    return final


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
