"""Restore a workdir's checkpoint and evaluate it without training: what ``launch/eval.py`` runs.

``load_checkpoint`` is the one way to get a trained model back from a workdir written by
``launch/train.py`` (used by ``launch/eval.py``, ``launch/sample.py`` and the ``generation``
evaluator, which loads a classifier from another workdir).
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from fmjax.data import sources, transforms
from fmjax.evals import generation as gen_lib
from fmjax.errors import NonFiniteError
from fmjax.train import checkpoint as ckpt
from fmjax.train import workdir as workdir_lib
from fmjax.train import optimizer as opt_lib
from fmjax.train import state as state_lib
from fmjax.train.evaluate import Evaluator
from fmjax.train.loop import _batch_spec, build
from fmjax.train.validate import ConfigError
from fmjax.train.writer import MetricWriter, log


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir_lib.resolve(workdir), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by launch/train.py.")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def abstract_state(config, objective, mesh, rules):
    """``(abstract TrainState, shardings)`` of ``config``'s training run on ``mesh``."""
    source = sources.get_source(config.data.name, config.data.get("train_split", "train"),
                                config.data.get("data_dir"))
    spec = _batch_spec(source, transforms.parse(config.data.pp_train), objective.batch_keys,
                       config.batch_size)
    tx, _ = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    abstract, shardings, _ = state_lib.state_shardings(objective, tx, spec, mesh, rules, config.seed)
    return abstract, shardings


def load_checkpoint(workdir: str, config=None, step: int | None = None, devices=None):
    """Restores the sharded TrainState of ``workdir`` (latest readable checkpoint or ``step``).

    ``config`` defaults to ``DIR/config.json``; ``devices`` to all (the mesh comes from
    ``config.mesh`` over them, so a checkpoint restores onto any device count).
    Returns ``(config, objective, mesh, rules, state, step)``; ``state.opt_state`` is None
    (not read from disk: evaluation and sampling do not need it). A missing workdir, config
    or checkpoint, a config whose model / objective differ from the checkpoint's, and a
    checkpoint holding NaN / inf params are one-line errors. An unreadable latest step is
    skipped with a warning (nothing is moved or deleted).
    """
    workdir = workdir_lib.resolve(workdir)
    config = config or load_workdir_config(workdir)
    objective, mesh, rules = build(config, devices)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # the manager would create it
        raise ConfigError(f"no checkpoint in {workdir}/checkpoints; available: [] "
                          "(train first with launch/train.py --workdir=...).")
    manager = ckpt.make_manager(workdir, async_save=False)
    try:
        if step is None and manager.latest_step() is None:
            raise ConfigError(f"no checkpoint in {workdir}/checkpoints; available: [] "
                              "(train first with launch/train.py --workdir=...).")
        abstract, shardings = abstract_state(config, objective, mesh, rules)
        step, state = ckpt.restore_latest(manager, config, abstract, shardings, step=step,
                                          with_opt_state=False)
    finally:
        manager.close()
    check_finite_params(state, step, workdir)
    return config, objective, mesh, rules, state, step


def check_finite_params(state, step, workdir) -> None:
    """A checkpoint with NaN / inf params is an error naming its step (evaluating it would
    report plausible-looking numbers: kNN on NaN features still picks neighbours)."""
    bad = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_flatten_with_path(
        (state.params, state.extra))[0] if not bool(jax.numpy.isfinite(v).all())]
    if bad:
        raise NonFiniteError(f"checkpoint step {step} in {workdir}/checkpoints holds non-finite values "
                             f"({len(bad)} arrays, e.g. {bad[0]}); evaluate an earlier step with --step=N.")


def evaluate_checkpoint(workdir: str, config=None, step: int | None = None, evals=None) -> dict:
    """Restores ``workdir``'s checkpoint (latest or ``step``) and runs ``config.evals``
    (or the named subset ``evals``); writes the metrics to metrics.jsonl and returns them."""
    workdir = workdir_lib.resolve(workdir)
    config = config or load_workdir_config(workdir)
    names = list(evals or config.evals.keys())
    unknown = [n for n in names if n not in config.evals]
    if unknown:
        raise ConfigError(f"unknown evals {unknown}; the config defines {sorted(config.evals.keys())}.")
    config, objective, mesh, rules, state, step = load_checkpoint(workdir, config, step)
    log(f"== evaluating {workdir} at step {step}: {names}")
    writer = MetricWriter(workdir, config.total_steps)
    metrics = Evaluator(config, objective, mesh, rules).run(names, state, writer, step)
    writer.write(step, metrics)
    writer.close()
    for k, v in sorted(metrics.items()):
        log(f"   {k} = {v:.4f}")
    return metrics


def evaluate_random_inits(config, num_seeds: int, evals=None, out: str | None = None,
                          devices=None) -> dict:
    """The "how much does pretraining beat random features?" baseline.

    Initialises ``num_seeds`` fresh models of ``config`` (seeds ``config.seed + i``), runs the
    config's evals (or the named subset) on each, and returns (and with ``out`` writes as
    JSON) ``{"seeds": [...], "<metric>": [per-seed values], ..., "summary": {"<metric>":
    {"max", "mean", "min"}}}``. Nothing is trained and no workdir is written.
    """
    if int(num_seeds) < 1:
        raise ConfigError(f"--random_init_seeds={num_seeds}; give the number of random initialisations, e.g. 8.")
    names = list(evals or config.evals.keys())
    unknown = [n for n in names if n not in config.evals]
    if unknown:
        raise ConfigError(f"unknown evals {unknown}; the config defines {sorted(config.evals.keys())}.")
    names = [n for n in names if config.evals[n].get("type") not in ("images", "generation")]
    if not names:
        raise ConfigError("no evals to run on random initialisations (images and generation evals are "
                          f"skipped); the config defines {sorted(config.evals.keys())}.")
    if out:
        out = workdir_lib.resolve(out)
        if not os.path.isdir(os.path.dirname(out)):
            raise ConfigError(f"--out={out}: folder {os.path.dirname(out)} does not exist.")
    objective, mesh, rules = build(config, devices)
    source = sources.get_source(config.data.name, config.data.get("train_split", "train"),
                                config.data.get("data_dir"))
    spec = _batch_spec(source, transforms.parse(config.data.pp_train), objective.batch_keys,
                       config.batch_size)
    tx, _ = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    evaluator = Evaluator(config, objective, mesh, rules)
    writer = MetricWriter("", config.total_steps, enabled=False)
    seeds = [int(config.seed) + i for i in range(int(num_seeds))]
    result: dict = {"seeds": seeds}
    for seed in seeds:
        state, _ = state_lib.create_state(objective, tx, spec, mesh, rules, seed)
        metrics = evaluator.run(names, state, writer, 0)
        log(f"   seed {seed}: " + " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        for k, v in metrics.items():
            result.setdefault(k, []).append(float(v))
    result["summary"] = {k: dict(max=max(v), mean=sum(v) / len(v), min=min(v))
                         for k, v in result.items() if k not in ("seeds", "summary")}
    for k, v in sorted(result["summary"].items()):
        log(f"== {k}: best {v['max']:.4f}, mean {v['mean']:.4f}, worst {v['min']:.4f} over {len(seeds)} random inits")
    if out and jax.process_index() == 0:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, out)
        log(f"== wrote {out}")
    return result


def load_classifier(workdir: str, num_classes: int, image_shape=None, devices=None,
                    batch_size: int | None = None):
    """A ``generation.Classifier`` from a workdir trained with the ``supervised`` objective.

    Checks (before restoring anything) that the workdir exists and classifies
    ``num_classes`` classes, and that its eval transform maps ``image_shape`` (H, W, C)
    pictures to the size it was trained on. Returns ``(classifier, classifier_config)``.
    """
    try:
        gen_lib.check_classifier_workdir(workdir, num_classes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    config, objective, mesh, rules, state, _ = load_checkpoint(workdir, devices=devices)
    try:
        clf = gen_lib.Classifier(objective, mesh, rules, state.params, state.extra,
                                 config.data.pp_eval, batch_size or config.batch_size, num_classes)
    except ValueError as e:
        raise ConfigError(f"classifier_workdir {workdir}: {e}") from None
    size = config.data.get("image_size")
    if image_shape is not None and size:
        got = clf.preprocess(np.zeros((1,) + tuple(image_shape), np.uint8)).shape[1:3]
        if tuple(got) != (int(size), int(size)):
            raise ConfigError(
                f"the classifier in {workdir} takes {size}x{size} images but its pp_eval maps the "
                f"generated {image_shape[0]}x{image_shape[1]} samples to {got[0]}x{got[1]}; train the "
                "classifier at the diffusion model's image size.")
    return clf, config
