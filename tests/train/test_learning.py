"""Learning gates on the bundled data: shortened versions of the default configs must learn.

Numbers measured on a 2-core CPU (see the configs' docstrings for the full runs).
"""
import json
import os

from fmjax.train import loop


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _eval_at(rows, step, key):
    vals = [r[key] for r in rows if r["step"] == step and key in r]
    assert vals, f"{key} not logged at step {step}"
    return vals[-1]


def _shorten(c, steps):
    c.total_steps = steps
    c.log_every = 50
    c.eval_every = steps
    c.checkpoint_every = steps
    c.optimizer.warmup_steps = steps // 10
    return c


def test_supervised_default_learns(default_config, tmp_path):
    c = _shorten(default_config("supervised"), 300)
    loop.train_and_evaluate(c, str(tmp_path))
    rows = _rows(tmp_path)
    start, end = _eval_at(rows, 0, "eval/val_accuracy"), _eval_at(rows, 300, "eval/val_accuracy")
    print(f"supervised val accuracy: {start:.3f} at init -> {end:.3f} after 300 steps")
    assert start < 0.2            # chance is 1/8
    assert end >= 0.25            # measured 0.328 (8 classes; 2x chance)
