"""Runs ``config.evals = {name: {type: ..., every: ..., ...}}`` for the trainer and launch/eval.py.

Each entry is run by the evaluator class registered for its ``type`` (``fmjax/evals/<type>.py``,
found through ``fmjax.evals.registry``; the keys every type shares are described in
``fmjax/evals/common.py``); this module only schedules them and names their metrics:
``eval/<name>_<key>`` for each ``key`` an evaluator returns (``eval/<name>`` for ``""``).
The trainer knows no eval type.
"""
from __future__ import annotations

from fmjax.evals import common, registry
from fmjax.train import validate
from fmjax.train.restore import load_classifier


def metric_name(name: str, key: str) -> str:
    return f"eval/{name}_{key}" if key else f"eval/{name}"


class Evaluator:
    """The evaluators of ``config.evals``, built once per run.

    Construction runs ``validate.check_evals`` (one-line ConfigErrors; nothing is compiled)
    unless ``checked`` says the caller already did; ``data_for``: the entries whose dataset
    and files are checked too (default: those the training run will reach).
    """

    def __init__(self, config, objective, mesh, rules, checked: bool = False, data_for=None):
        self.config, self.objective, self.mesh, self.rules = config, objective, mesh, rules
        if not checked:
            validate.check_evals(config, objective, mesh, data_for)
        self.context = common.Context(config, objective, mesh, rules, load_classifier=load_classifier)
        self.evaluators = {name: registry.get(ev["type"])(name, ev, self.context)
                           for name, ev in config.evals.items()}

    def due(self, step: int, total_steps: int) -> list[str]:
        out = []
        for name, ev in self.config.evals.items():
            every = ev.get("every", self.config.eval_every)
            if every and (step % every == 0 or step == total_steps):
                out.append(name)
        return out

    def run(self, names, state, writer, step: int) -> dict:
        metrics = {}
        with self.context.evaluating(step):
            for name in names:
                result = self.evaluators[name].run(state, step, writer)
                metrics.update({metric_name(name, k): v for k, v in result.items()})
        return metrics
