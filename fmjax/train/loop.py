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

from fmjax.data import pipeline
from fmjax.parallel import mesh as mesh_lib
from fmjax.parallel import rules as rules_lib
from fmjax.train import checkpoint as ckpt
from fmjax.train import adapter_ckpt
from fmjax.train import restore as restore_lib
from fmjax.train import files, observe, preflight
from fmjax.train import optimizer as opt_lib
from fmjax.train import state as state_lib
from fmjax.train import step as step_lib
from fmjax.errors import NonFiniteError
from fmjax.train import validate
from fmjax.train import workdir as workdir_lib
from fmjax.data.transforms import parse_pp
from fmjax.train import setup as setup_lib
from fmjax.train.evaluate import Evaluator
from fmjax.train.writer import MetricWriter, Progress, log, truncate_metrics


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training, after the current step was saved; exit code 130."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class _Preemption:
    """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a stop at an agreed step: the loop
    saves that step, then exits 0 (SIGTERM) or raises ``Interrupted`` (SIGINT, exit 130).
    A second Ctrl-C interrupts at once (the saves already committed stay restorable).

    One process: a Python signal handler sets a flag, read once per step. Several processes
    (``jax.distributed``): jax's preemption service catches SIGTERM on any host and agrees a
    step with every host in the background; ``sync(step)`` asks it, which costs no barrier
    (0.15 us per step against 824 us for the all-gather it replaced, 2 processes on
    127.0.0.1, docs/design.md). A Ctrl-C on one host is passed to the service as a SIGTERM.
    Without the service (disabled by ``jax_enable_preemption_service``), the hosts all-gather
    their flags every step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signum = None
        self._old = {}
        self._service = None
        if jax.process_count() > 1:
            from jax._src import distributed
            self._service = distributed.global_state.preemption_sync_manager

    def __enter__(self):
        for sig in self.SIGNALS:
            if sig == signal.SIGTERM and self._service is not None:
                continue  # the preemption service's own handler stays installed
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested, self.signum = True, self.signum or signum
        if self._service is not None:
            os.kill(os.getpid(), signal.SIGTERM)  # tell every host through the service

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def sync(self, step: int) -> bool:
        """Whether every process stops after ``step`` (called once per step, on every host)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        if self._service is not None:
            stop = multihost_utils.reached_preemption_sync_point(step)
        else:
            flags = multihost_utils.process_allgather(np.array(self.requested, np.int32))
            stop = bool(np.asarray(flags).any())
        if stop and self.signum is None:  # another host was signalled
            self.signum = signal.SIGTERM
        return stop


def check_config(config, workdir: str, devices=None):
    """Phase 1: every check that needs no write and no compile. Returns what the run needs.

    Bad input here is a one-line ``ConfigError`` (or a missing-file error), raised before
    anything is written to ``workdir``.
    """
    objective, mesh, rules = setup_lib.build(config, devices)
    validate.check(config, objective, mesh)
    validate.check_model_init(config, workdir)
    evaluator = Evaluator(config, objective, mesh, rules, checked=True)  # validate.check ran check_evals
    source = setup_lib.train_source(config)
    transform = parse_pp(config.data.pp_train, "config.data.pp_train")
    spec = setup_lib.batch_spec(source, transform, objective.batch_keys, config.batch_size)
    validate.check_pipeline_matches(config, transform, spec)
    try:
        tx, schedule = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    except ValueError as e:
        raise validate.ConfigError(str(e)) from None
    abstract, shardings, boxed = state_lib.state_shardings(objective, tx, spec, mesh, rules, config.seed)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    param_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract.params))
    trainable, trainable_bytes = ((objective.trainable_count(abstract.params),
                                   objective.trainable_count(abstract.params, nbytes=True))
                                  if hasattr(objective, "trainable_count") else (n_params, param_bytes))
    unreached = (objective.unreached_targets(abstract.params)
                 if callable(getattr(objective, "unreached_targets", None)) else [])
    if unreached:
        ckpt.warn(f"config.adapter.targets={objective.adapter['targets']!r} also matches "
                  f"{len(unreached)} layer(s) the {config.adapter.name} adapter cannot reach (not "
                  f"{objective.reach}, e.g. {unreached[0]}); they stay frozen.")
    frac = rules_lib.replicated_fraction(shardings.params, boxed)
    if mesh.shape["fsdp"] > 1 and frac > config.get("max_replicated_fraction", 0.5):
        raise validate.ConfigError(
            f"mesh fsdp={mesh.shape['fsdp']} leaves {frac:.0%} of large params replicated; "
            "use --config.sharding=fsdp or a smaller fsdp axis.")
    validate.check_workdir(workdir, create=False)
    return dict(objective=objective, mesh=mesh, rules=rules, evaluator=evaluator, source=source,
                transform=transform, spec=spec, tx=tx, schedule=schedule, abstract=abstract,
                shardings=shardings, n_params=n_params, trainable=trainable, param_bytes=param_bytes,
                trainable_bytes=trainable_bytes, replicated=frac)


def train_and_evaluate(config, workdir: str, devices=None, check_only: bool = False) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns final metrics.

    ``devices``: the devices of the mesh (default all); tests use subsets to restore a
    checkpoint onto fewer devices than wrote it. ``check_only``: run every config check,
    print a summary and return without writing or compiling anything.
    """
    workdir = workdir_lib.resolve(workdir)
    log(f"== fmjax: {config.objective.name} | workdir {workdir} | "
        f"{jax.process_count()} process(es), {len(devices or jax.devices())} device(s) ({jax.devices()[0].platform})")

    # -- 1. Check the config: every error here is one line, before anything is written. ------
    run = check_config(config, workdir, devices)
    preflight.run(config, workdir)  # several hosts: the same code, config, devices and workdir
    mesh = run["mesh"]
    trainable = "" if run["trainable"] == run["n_params"] else (
        f" ({run['trainable'] / 1e6:.3f}M = {run['trainable'] / run['n_params']:.2%} trainable, "
        f"{run['trainable_bytes'] / 2**20:.2f} of {run['param_bytes'] / 2**20:.2f} MiB: "
        f"{config.adapter.name} adapter)")
    log(f"== model: {run['n_params'] / 1e6:.2f}M params{trainable}; {run['replicated']:.0%} of large-param bytes "
        f"replicated (sharding preset {config.get('sharding', 'fsdp')!r}); batch "
        + ", ".join(f"{k} {tuple(v.shape)}" for k, v in run["spec"].items()))
    if check_only:
        log(f"== config OK ({config.total_steps} steps, global batch {config.batch_size}, mesh "
            f"{dict(mesh.shape)}); nothing was written")
        return {}
    validate.check_workdir(workdir, create=jax.process_index() == 0)
    preflight.check_shared_workdir(workdir)
    with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0):
        return _train(config, workdir, run)


def _train(config, workdir: str, run: dict) -> dict:
    objective, mesh, rules, evaluator = run["objective"], run["mesh"], run["rules"], run["evaluator"]
    spec, tx, schedule, shardings = run["spec"], run["tx"], run["schedule"], run["shardings"]
    manager = ckpt.make_manager(workdir, keep=config.get("keep_checkpoints", 3),
                                keep_period=config.get("keep_period") or None)
    writer = data_iter = profiler = None
    try:
        # -- 2. Data, and the latest readable checkpoint (or a fresh state). ------------------
        data_iter = setup_lib.train_iterator(config, run["source"], run["transform"], spec)
        def fresh_state():  # the fresh init with config.model_init's weights put in
            return restore_lib.fresh_state(config, objective, tx, spec, mesh, rules, shardings, log=log)
        store = adapter_ckpt.for_run(config, tx, run["abstract"], fresh_state)  # adapters: the base
        latest, state = ckpt.restore_latest(
            manager, config, run["abstract"], shardings, data_iter,
            move_unreadable_to=files.join(workdir, "unreadable_checkpoints"), store=store)
        if latest is not None and latest >= config.total_steps:
            log(f"== already at step {latest} (total_steps {config.total_steps}): nothing to do; "
                "the workdir is left as it was")
            return _read_final(workdir, latest)
        if jax.process_index() == 0:
            workdir_lib.write_config(workdir, config, latest or 0)
            dropped = truncate_metrics(workdir, latest if latest is not None else -1)
            if dropped:
                log(f"== metrics.jsonl: {dropped} row(s) logged after step {latest or 0} moved to "
                    "metrics_discarded.jsonl (they are logged again)")
        log(f"== data: {config.data.name} ({len(run['source'])} train examples), global batch "
            f"{config.batch_size}, mesh {dict(mesh.shape)}")
        if latest is None:  # fresh start (a resume restores its checkpoint, or its adapter)
            state = fresh_state()
            start = 0
        else:
            log(f"== resuming from step {latest}")
            start = int(latest)

        # -- 3. Compile ahead of time. ------------------------------------------------------------
        batch_sh = mesh_lib.batch_sharding(mesh)
        policy = config.get("nonfinite", "stop")
        step_fn = step_lib.make_train_step(objective, tx, schedule, rules,
                                           config.get("grad_accum_steps", 1), nonfinite=policy,
                                           per_example_clip=step_lib.per_example_clip_norm(config.optimizer))
        jitted = step_lib.jit_train_step(step_fn, shardings, jax.tree.map(lambda _: batch_sh, spec))
        with state_lib.mesh_context(mesh):
            lowered = jitted.lower(state, spec)
            compiled = lowered.compile()
        mem = compiled.memory_analysis()
        if mem is not None and hasattr(mem, "temp_size_in_bytes"):
            log(f"== compiled: temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, "
                f"args {mem.argument_size_in_bytes / 2**20:.1f} MiB per device")
        clock = _step_clock(config, objective, spec, lowered, mesh)
        profiler = observe.Profiler(config, workdir)

        # -- 4. Train. -------------------------------------------------------------------------------
        writer = MetricWriter(workdir, config.total_steps, writers=config.get("writers", ("jsonl", "tensorboard")),
                              run_config=config)
        progress = Progress(config.total_steps, config.batch_size, start, clock=clock)
        guard = _FiniteGuard(policy, manager, workdir)
        final: dict = {}
        step = start
        with _Preemption() as preempt:
            if start == 0 and config.get("eval_at_start", True) and config.evals:
                final.update(evaluator.run(list(config.evals), state, writer, 0))
                writer.write(0, final)
                log(f"   eval @0: {_fmt(final)}")
            while step < config.total_steps:
                profiler.before_step(step)
                clock.data_start()
                local = next(data_iter)
                batch = pipeline.global_batch(setup_lib.host_arrays(local, spec), mesh)
                clock.data_end()
                state, metrics = compiled(state, batch)
                step += 1
                profiler.after_step(step, metrics)
                guard.after_dispatch(step, metrics)  # checks the previous step (no pipeline stall)
                if step % config.log_every == 0 or step == config.total_steps:
                    metrics = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
                    guard.check(step, metrics)
                    metrics.update(progress.rates(step))
                    metrics["train/skipped_steps"] = float(guard.skipped)
                    writer.write(step, metrics)
                    log(progress.line(step, metrics))
                    warning = objective.health(metrics) if callable(getattr(objective, "health", None)) else None
                    if warning:  # e.g. DINO's collapse monitors
                        log(f"   WARNING @{step}: {warning}")
                    final.update(metrics)
                stop = preempt.sync(step)
                due = evaluator.due(step, config.total_steps)
                if due:
                    guard.check_now(step)
                    ev = evaluator.run(due, state, writer, step)
                    if ev:
                        writer.write(step, ev)
                        log(f"   eval @{step}: {_fmt(ev)}")
                        final.update(ev)
                if stop or step % config.checkpoint_every == 0 or step == config.total_steps:
                    guard.check_now(step)  # never save a non-finite state
                    writer.flush()  # a bucket workdir: the metrics up to this step are there too
                    ckpt.save(manager, step, state, data_iter, config, force=stop, spec=spec,
                              store=store)
                if stop:
                    manager.wait_until_finished()
                    if preempt.signum == signal.SIGINT:
                        raise Interrupted(f"interrupted (Ctrl-C) at step {step}; saved checkpoint {step} "
                                          f"in {workdir}/checkpoints; run the same command to resume.")
                    log(f"== SIGTERM: saved step {step}; exiting cleanly")
                    break
        profiler.stop(state)
        manager.wait_until_finished()
        final["step"] = step
        if jax.process_index() == 0:
            files.write_text(files.join(workdir, "final_metrics.json"), json.dumps(
                {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in final.items()},
                indent=1))
        return final
    finally:
        # Any exit (an error, Ctrl-C, a NaN): finish the saves already started, so the last
        # committed step stays restorable, then release Orbax's threads quietly.
        try:
            manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - a failed save must not hide the original error
            ckpt.warn(f"a checkpoint save did not finish ({type(e).__name__}: {e}); the previous "
                      "committed step is still restorable.")
        try:
            manager.close()
        except Exception:  # noqa: BLE001
            pass
        if profiler is not None:
            profiler.stop()
        if writer is not None:
            writer.close()
        if data_iter is not None and hasattr(data_iter, "close"):
            try:
                data_iter.close()  # grain worker processes
            except Exception:  # noqa: BLE001
                pass


def _step_clock(config, objective, spec, lowered, mesh) -> observe.StepClock:
    """The run's FLOPs per step per chip and peak, logged once; MFU is logged every log line."""
    from fmjax.aot import flops as flops_lib
    try:
        flops, source = flops_lib.model_flops_per_chip(objective, spec, lowered, mesh.size)
    except Exception as e:  # noqa: BLE001 - the count is a report, never a reason to stop
        flops, source = 0.0, f"unknown ({type(e).__name__})"
    peak, origin = observe.peak_tflops(config, mesh.devices.flat[0])
    log(f"== model {flops / 1e9:.3g} GFLOP per step per chip ({source}); peak {peak:.3g} TFLOP/s per chip "
        f"({origin}{'' if origin != 'measured' else ': a dense matmul; set --config.peak_tflops'})")
    return observe.StepClock(flops, peak)


class _FiniteGuard:
    """Host side of the step's on-device finiteness check (``metrics['finite']``).

    ``stop``: the first non-finite step ends the run with one line naming it and the last
    good checkpoint; the state after it is never saved. The flag of step s is read after
    step s+1 was dispatched, so the check does not stall the device pipeline, and right
    before any save or eval. ``skip_step``: counts the skipped steps; more than
    ``MAX_CONSECUTIVE`` in a row end the run the same way.
    """
    MAX_CONSECUTIVE = 20

    def __init__(self, policy, manager, workdir):
        self.policy, self.manager, self.workdir = policy, manager, workdir
        self.pending = None  # (step, device metrics) not yet checked
        self.skipped = 0
        self._consecutive = 0

    def after_dispatch(self, step, metrics):
        previous, self.pending = self.pending, (step, metrics)
        if previous is not None:
            self._check_device(*previous)

    def check_now(self, step):
        if self.pending is not None and self.pending[0] == step:
            self._check_device(*self.pending)
            self.pending = None

    def check(self, step, host_metrics):
        if self.pending is not None and self.pending[0] == step:
            self.pending = None
        self._verdict(step, host_metrics.get("train/finite", 1.0) > 0, host_metrics)

    def _check_device(self, step, metrics):
        finite = float(jax.device_get(metrics["finite"])) > 0
        if not finite:
            metrics = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
        self._verdict(step, finite, metrics)

    def _verdict(self, step, finite, metrics):
        if finite:
            self._consecutive = 0
            return
        if self.policy == "skip_step":
            self.skipped += 1
            self._consecutive += 1
            log(f"   WARNING @{step}: non-finite loss or gradient; step skipped (state unchanged; "
                f"{self.skipped} skipped so far)")
            if self._consecutive <= self.MAX_CONSECUTIVE:
                return
        self.manager.wait_until_finished()
        good = self.manager.latest_step()
        where = (f"the last good checkpoint is step {good} ({self.workdir}/checkpoints/{good}); re-running "
                 "the same command resumes from it" if good is not None else "no checkpoint was saved yet")
        what = ", ".join(f"{k.split('/')[-1]}={metrics[k]:.4g}" for k in ("train/loss", "train/grad_norm")
                         if k in metrics)
        raise NonFiniteError(
            f"non-finite training state at step {step} ({what}"
            + (f"; {self._consecutive} steps in a row skipped" if self.policy == "skip_step" else "")
            + f"); it was not saved; {where}. Lower the learning rate or enable clipping "
            "(--config.optimizer.clip_norm=1)"
            + (" or set --config.nonfinite=skip_step." if self.policy == "stop" else "."))


def _read_final(workdir: str, step: int) -> dict:
    try:
        return json.loads(files.read_text(files.join(workdir, "final_metrics.json")))
    except (OSError, ValueError):
        return {"step": step}


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
