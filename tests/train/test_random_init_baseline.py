"""``launch/eval.py --random_init_seeds=N``: the random-feature baseline (issue 12)."""
import json

import numpy as np
import pytest

from fmjax.testing import assert_one_line_error, run_cli
from fmjax.train import eval_only

TINY = ["--config=configs/mae.py", "--config.batch_size=16", "--config.model.width=32",
        "--config.model.depth=1", "--config.model.num_heads=2", "--config.model.mlp_dim=64",
        "--config.model.decoder_width=32", "--config.model.decoder_depth=1",
        "--config.model.decoder_heads=2", "--config.evals.probe.train_examples=64",
        "--config.evals.probe.examples=32", "--config.evals.knn.train_examples=64",
        "--config.evals.knn.examples=32", "--config.evals.val_loss.examples=32"]


def test_cli_writes_per_seed_values(shapes_data_dir, tmp_path):
    out = tmp_path / "baseline.json"
    proc = run_cli("eval", TINY[0], f"--config.data.data_dir={shapes_data_dir}", *TINY[1:],
                   "--random_init_seeds=3", "--evals=probe,knn,images", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["seeds"] == [0, 1, 2]
    for key in ("eval/probe_top1", "eval/knn_top1"):
        values = result[key]
        assert len(values) == 3 and all(0.0 <= v <= 1.0 for v in values)
        assert result["summary"][key]["max"] == max(values)
    # Different seeds are different models.
    assert len(set(result["eval/knn_top1"] + result["eval/probe_top1"])) > 2
    assert "best" in proc.stdout and "over 3 random inits" in proc.stdout
    assert not any(k.startswith("eval/images") for k in result)


def test_in_process_matches_a_fresh_state(tiny_config):
    """Seed s of the baseline is exactly the model a training run with seed s starts from."""
    c = tiny_config("mae")
    c.evals = dict(val_loss=dict(type="loss", split="validation", examples=32))
    a = eval_only.evaluate_random_inits(c, 2)
    c.seed = 1
    b = eval_only.evaluate_random_inits(c, 1)
    np.testing.assert_allclose(a["eval/val_loss"][1], b["eval/val_loss"][0], rtol=1e-6)
    assert a["eval/val_loss"][0] != a["eval/val_loss"][1]


@pytest.mark.parametrize("args, expected", [
    (["--random_init_seeds=0"], "--random_init_seeds=0"),
    (["--random_init_seeds=2", "--step=3"], "give one of them"),
    (["--random_init_seeds=2", "--out=/nonexistent_dir/x.json"], "its folder does not exist"),
    (["--random_init_seeds=2", "--evals=nope"], "unknown evals ['nope']"),
    (["--random_init_seeds=2", "--evals=images"], "no evals to run on random initialisations"),
])
def test_errors_are_one_line(args, expected, shapes_data_dir):
    proc = run_cli("eval", TINY[0], f"--config.data.data_dir={shapes_data_dir}", *TINY[1:], *args)
    assert_one_line_error(proc, expected)


def test_needs_a_config_or_workdir():
    proc = run_cli("eval", "--random_init_seeds=2")
    assert_one_line_error(proc, "needs --config")
    proc = run_cli("eval")
    assert_one_line_error(proc, "--workdir is required")
