"""Sampling a trained workdir (``fmjax.train.sample`` and ``launch/sample.py``) and the
``generation`` evaluator (a supervised classifier scoring class-conditional samples)."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from fmjax.train import loop
from fmjax.train import setup
from fmjax.train.eval_only import (abstract_state, evaluate_checkpoint, load_checkpoint,
                                   load_workdir_config)
from fmjax.train.evaluate import Evaluator
from fmjax.train.sample import sample_checkpoint
from fmjax.train.validate import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TRAINED = {}


@pytest.fixture
def workdirs(tiny_config, tmp_path_factory):
    """A 2-step diffusion workdir and a 2-step supervised classifier workdir (trained once).

    Trained on 1 device (a quicker checkpoint), restored and sampled on all 8."""
    if not _TRAINED:
        root = tmp_path_factory.mktemp("trained")
        for name in ("diffusion", "supervised"):
            config = tiny_config(name, total_steps=2, checkpoint_every=2)
            loop.train_and_evaluate(config, str(root / name), devices=jax.devices()[:1])
            _TRAINED[name] = str(root / name)
    return _TRAINED


def _env():
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ["FMJAX_TEST_JAX_CACHE"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _sample_cli(*args):
    cmd = [sys.executable, os.path.join(REPO, "launch", "sample.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def test_load_checkpoint_restores_the_trained_state(workdirs):
    config, objective, mesh, rules, state, step = load_checkpoint(workdirs["diffusion"])
    assert step == 2 and int(state.step) == 2 and config.objective.name == "diffusion"
    assert mesh.shape["data"] == 8 and len(state.step.sharding.device_set) == 8
    assert objective.num_classes == 8 and set(state.extra) == {"ema"}
    # The optimizer state is not read; everything else equals a full restore.
    assert state.opt_state is None
    from fmjax.train import checkpoint as ckpt
    manager = ckpt.make_manager(workdirs["diffusion"], async_save=False)
    full = ckpt.restore(manager, 2, *abstract_state(config, objective, mesh, rules), data_iter=None)
    manager.close()
    assert jax.tree.leaves(full.opt_state)
    for a, b in zip(jax.tree.leaves((full.params, full.extra, full.rng)),
                    jax.tree.leaves((state.params, state.extra, state.rng))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sample_library_writes_grids(workdirs, tmp_path):
    out = sample_checkpoint(workdirs["diffusion"], num_per_class=2, num_steps=2, batch_size=8)
    names = [os.path.basename(p) for p in out["paths"]]
    assert names[0] == "class_000_circle.png" and names[-1] == "all_classes.png" and len(names) == 9
    assert all(os.path.dirname(p) == os.path.join(workdirs["diffusion"], "samples") for p in out["paths"])
    grid = np.asarray(Image.open(out["paths"][-1]))
    assert grid.shape == (8 * 32 + 9 * 2, 2 * 32 + 3 * 2, 3)  # a row per class, a column per sample
    assert out["images"].shape == (16, 32, 32, 3) and out["images"].dtype == np.uint8

    # A subset of classes into --outdir; DDIM (eta 0) samples do not depend on the batch size.
    sub = sample_checkpoint(workdirs["diffusion"], num_per_class=2, num_steps=2, batch_size=16,
                            classes=[0, 3], outdir=str(tmp_path / "s"))
    assert sorted(os.listdir(tmp_path / "s")) == ["all_classes.png", "class_000_circle.png",
                                                  "class_003_star.png"]
    assert np.abs(sub["images"][:2].astype(int) - out["images"][:2].astype(int)).max() <= 1

    with pytest.raises(ConfigError, match="valid class ids are 0 .. 7"):
        sample_checkpoint(workdirs["diffusion"], classes=[9], num_steps=2)
    with pytest.raises(ConfigError, match="sampler='euler'"):
        sample_checkpoint(workdirs["diffusion"], sampler="euler")


def test_launch_sample_writes_pngs_and_prints_paths(workdirs, tmp_path):
    outdir = str(tmp_path / "cli")
    proc = _sample_cli(f"--workdir={workdirs['diffusion']}", "--num_per_class=1", "--num_steps=2",
                       "--guidance_scale=1.5", "--sampler=ddim", "--eta=0", "--seed=1",
                       "--batch_size=8", f"--outdir={outdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [line for line in proc.stdout.splitlines() if line.endswith(".png")]
    assert len(printed) == 9 and all(os.path.exists(p) for p in printed)
    assert os.path.join(outdir, "all_classes.png") in printed


def test_missing_workdir_is_one_line_error(tmp_path):
    proc = _sample_cli(f"--workdir={tmp_path / 'nope'}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("fmjax: error: ") and "config.json" in lines[-1], proc.stderr[-2000:]
    assert not any("Traceback" in line for line in lines)


def test_workdir_without_checkpoints_is_a_config_error(workdirs, tmp_path):
    os.makedirs(tmp_path / "empty")
    shutil.copy(os.path.join(workdirs["diffusion"], "config.json"), tmp_path / "empty")
    with pytest.raises(ConfigError, match="no checkpoint") as e:
        load_checkpoint(str(tmp_path / "empty"))
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "empty" / "checkpoints")  # nothing created


def test_generation_eval_scores_samples_with_the_classifier(workdirs):
    config = load_workdir_config(workdirs["diffusion"])
    config.evals = {"gen": dict(type="generation", classifier_workdir=workdirs["supervised"],
                                samples_per_class=2, num_steps=2, guidance_scale=1.0, examples=64,
                                batch_size=16)}
    metrics = evaluate_checkpoint(workdirs["diffusion"], config)
    for key in ("eval/gen_accuracy", "eval/gen_classifier_real_accuracy", "eval/gen_accuracy_circle",
                "eval/gen_accuracy_ring"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    per_class = [v for k, v in metrics.items() if k.startswith("eval/gen_accuracy_")]
    assert len(per_class) == 8
    np.testing.assert_allclose(np.mean(per_class), metrics["eval/gen_accuracy"])  # 2 per class
    with open(os.path.join(workdirs["diffusion"], "metrics.jsonl")) as f:
        assert "eval/gen_accuracy" in json.loads(f.readlines()[-1])

    # The same metric from the sampling entry point.
    out = sample_checkpoint(workdirs["diffusion"], num_per_class=2, num_steps=2, guidance_scale=1.0,
                            batch_size=16, classifier_workdir=workdirs["supervised"])
    assert 0.0 <= out["metrics"]["accuracy"] <= 1.0
    assert 0.0 <= out["metrics"]["classifier_real_accuracy"] <= 1.0


def test_generation_eval_errors(workdirs, tmp_path):
    config = load_workdir_config(workdirs["diffusion"])
    objective, mesh, rules = setup.build(config)

    def error(**ev):
        config.evals = {"gen": dict(type="generation", **ev)}
        with pytest.raises((ConfigError, FileNotFoundError)) as e:
            Evaluator(config, objective, mesh, rules)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "has no config.json" in error(classifier_workdir=str(tmp_path / "missing"))
    assert "needs classifier_workdir" in error()
    # A classifier of another number of classes.
    os.makedirs(tmp_path / "clf5")
    with open(os.path.join(workdirs["supervised"], "config.json")) as f:
        clf = json.load(f)
    clf["model"]["num_classes"] = 5
    with open(tmp_path / "clf5" / "config.json", "w") as f:
        json.dump(clf, f)
    msg = error(classifier_workdir=str(tmp_path / "clf5"))
    assert "classifies 5 classes" in msg and "generates 8" in msg
    assert "num_steps=5000" in error(classifier_workdir=workdirs["supervised"], num_steps=5000)
    # train_and_evaluate runs these checks before anything is compiled or written.
    config.evals = {"gen": dict(type="generation", classifier_workdir=str(tmp_path / "missing"))}
    with pytest.raises((ConfigError, FileNotFoundError), match="has no config.json"):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "config.json")
    with pytest.raises(ConfigError, match="classifies 5 classes"):
        sample_checkpoint(workdirs["diffusion"], num_steps=2, num_per_class=1,
                          classifier_workdir=str(tmp_path / "clf5"))
