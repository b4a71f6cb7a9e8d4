"""Evaluate without training: what ``launch/eval.py`` runs.

``evaluate_checkpoint`` restores a workdir's checkpoint (through ``fmjax.train.restore``,
re-exported here) and runs its evals; ``evaluate_random_inits`` gives the random-feature
baseline of a config.
"""
from __future__ import annotations

import json
import os

import jax

from fmjax.evals import registry
from fmjax.train import optimizer as opt_lib
from fmjax.train import state as state_lib
from fmjax.train import workdir as workdir_lib
from fmjax.train.evaluate import Evaluator
from fmjax.train.restore import (abstract_state, check_finite_params, load_checkpoint,  # noqa: F401
                                 load_classifier, load_workdir_config, train_batch_spec)
from fmjax.train.setup import build
from fmjax.train.validate import ConfigError
from fmjax.train.writer import MetricWriter, log


def evaluate_checkpoint(workdir: str, config=None, step: int | None = None, evals=None,
                        quantize: str | None = None) -> dict:
    """Restores ``workdir``'s checkpoint (latest or ``step``) and runs ``config.evals``
    (or the named subset ``evals``); writes the metrics to metrics.jsonl and returns them.

    ``quantize`` ('int8' | 'int8_w8a8', ``fmjax.adapt.quant``): the evals run a second time
    with every dense projection quantized; those metrics are written as ``<mode>/eval/...``
    and the log shows each metric's change and the dense-kernel bytes int8 storage saves."""
    from fmjax.adapt import quant
    if quantize is not None and quantize not in quant.MODES:
        raise ConfigError(f"--quantize={quantize!r}; valid: {', '.join(quant.MODES)}.")
    workdir = workdir_lib.resolve(workdir)
    config = config or load_workdir_config(workdir)
    names = list(evals or config.evals.keys())
    unknown = [n for n in names if n not in config.evals]
    if unknown:
        raise ConfigError(f"unknown evals {unknown}; the config defines {sorted(config.evals.keys())}.")
    config, objective, mesh, rules, state, step = load_checkpoint(workdir, config, step)
    log(f"== evaluating {workdir} at step {step}: {names}")
    writer = MetricWriter(workdir, config.total_steps)
    metrics = Evaluator(config, objective, mesh, rules, data_for=names).run(names, state, writer, step)
    if quantize:
        seen: dict = {}
        qobj = quant.quantized(objective, quantize, seen)
        qnames = [n for n in names if config.evals[n].get("type") != "images"]  # pictures: float only
        qmetrics = Evaluator(config, qobj, mesh, rules, data_for=qnames).run(qnames, state, None, step)
        before, after = quant.weight_bytes(state.params, seen)
        log(f"== {quantize}: {len(seen)} dense projections quantized; their kernels "
            f"{before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB as int8 + scales "
            f"({1 - after / max(before, 1):.0%} saved)")
        for k in sorted(metrics):
            if k in qmetrics:
                log(f"   {k}: {metrics[k]:.4f} -> {quantize} {qmetrics[k]:.4f} "
                    f"({qmetrics[k] - metrics[k]:+.4f})")
        metrics.update({f"{quantize}/{k}": v for k, v in qmetrics.items()})
        metrics[f"{quantize}/kernel_bytes"] = float(before)
        metrics[f"{quantize}/int8_kernel_bytes"] = float(after)
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
    skipped = sorted({config.evals[n].get("type") for n in names
                      if not registry.get(config.evals[n].get("type"), f"config.evals.{n}.type").random_init})
    names = [n for n in names if config.evals[n].get("type") not in skipped]
    if not names:
        raise ConfigError(f"no evals to run on random initialisations (evals of type {', '.join(skipped)} "
                          f"are skipped); the config defines {sorted(config.evals.keys())}.")
    if out:
        out = workdir_lib.resolve(out)
        if not os.path.isdir(os.path.dirname(out)):
            raise ConfigError(f"--out={out}: folder {os.path.dirname(out)} does not exist.")
    objective, mesh, rules = build(config, devices)
    # The objective's own checks, as training runs them: one-line errors, and host-side loads
    # (BEiT's tokenizer) happen here, not inside the jitted init.
    objective.check(config)
    spec = train_batch_spec(config, objective)
    tx, _ = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    evaluator = Evaluator(config, objective, mesh, rules, data_for=names)
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
