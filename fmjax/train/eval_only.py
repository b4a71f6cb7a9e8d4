"""Evaluate a checkpoint without training: what ``launch/eval.py`` runs."""
from __future__ import annotations

import json
import os

import ml_collections

from fmjax.data import sources, transforms
from fmjax.train import checkpoint as ckpt
from fmjax.train import optimizer as opt_lib
from fmjax.train import state as state_lib
from fmjax.train.evaluate import Evaluator
from fmjax.train.loop import _batch_spec, build
from fmjax.train.validate import ConfigError
from fmjax.train.writer import MetricWriter, log


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by launch/train.py.")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def evaluate_checkpoint(workdir: str, config=None, step: int | None = None, evals=None) -> dict:
    """Restores ``workdir``'s checkpoint (latest or ``step``) and runs ``config.evals``
    (or the named subset ``evals``); writes the metrics to metrics.jsonl and returns them."""
    workdir = os.path.abspath(workdir)
    config = config or load_workdir_config(workdir)
    objective, mesh, rules = build(config)
    manager = ckpt.make_manager(workdir, async_save=False)
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise ConfigError(f"no checkpoint {'' if step is None else step} in {workdir}/checkpoints; "
                          f"available: {sorted(manager.all_steps())}.")
    names = list(evals or config.evals.keys())
    unknown = [n for n in names if n not in config.evals]
    if unknown:
        raise ConfigError(f"unknown evals {unknown}; the config defines {sorted(config.evals.keys())}.")
    source = sources.get_source(config.data.name, config.data.get("train_split", "train"),
                                config.data.get("data_dir"))
    spec = _batch_spec(source, transforms.parse(config.data.pp_train), objective.batch_keys,
                       config.batch_size)
    tx, _ = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    abstract, shardings, _ = state_lib.state_shardings(objective, tx, spec, mesh, rules, config.seed)
    state = ckpt.restore(manager, step, abstract, shardings, data_iter=None)
    log(f"== evaluating {workdir} at step {step}: {names}")
    writer = MetricWriter(workdir, config.total_steps)
    metrics = Evaluator(config, objective, mesh, rules).run(names, state, writer, step)
    writer.write(step, metrics)
    writer.close()
    manager.close()
    for k, v in sorted(metrics.items()):
        log(f"   {k} = {v:.4f}")
    return metrics
