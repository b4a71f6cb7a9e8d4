"""The fault and bad-input drill of issue 11, for ``launch/train.py`` and ``launch/eval.py``.

Each case runs the real command line in a fresh process and asserts the exit code, that
stderr ends in exactly one line naming the problem (no traceback), and that every committed
checkpoint, ``config.json`` and ``final_metrics.json`` are intact afterwards. The numbers in
the test names are the items of the issue.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fmjax.testing import REPO, assert_one_line_error, cli_env, run_cli

TINY = [
    "--config=configs/mae.py", "--config.batch_size=16", "--config.log_every=1",
    "--config.eval_every=0", "--config.eval_at_start=False", "--config.optimizer.warmup_steps=2",
    "--config.model.width=32", "--config.model.depth=2", "--config.model.num_heads=2",
    "--config.model.mlp_dim=64", "--config.model.decoder_width=32",
    "--config.model.decoder_depth=1", "--config.model.decoder_heads=2",
]
STEPS = ["--config.total_steps=4", "--config.checkpoint_every=2"]


def _train(workdir, data_dir, *extra, steps=STEPS, **kw):
    return run_cli("train", f"--workdir={workdir}", TINY[0], f"--config.data.data_dir={data_dir}",
                   *TINY[1:], *steps, *extra, **kw)


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _snapshot(workdir):
    """{relative path: bytes} of every file in the workdir (the lock file excluded)."""
    out = {}
    for path in glob.glob(os.path.join(workdir, "**"), recursive=True):
        if os.path.isfile(path) and os.path.basename(path) != ".lock":
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = f.read()
    return out


def _params(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return jax.device_get(ocp.StandardCheckpointer().restore(path))["params"]


def _assert_restorable(workdir, steps=None):
    """Every committed checkpoint (or ``steps``) restores, with finite params."""
    for s in steps or _steps(workdir):
        leaves = jax.tree.leaves(_params(workdir, s))
        assert leaves and all(np.isfinite(x).all() for x in leaves), f"step {s} holds non-finite params"


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]  # every line must be valid JSON


@pytest.fixture(scope="module")
def trained(shapes_data_dir, tmp_path_factory):
    """A finished tiny MAE run (steps 2 and 4 saved); tests work on copies."""
    wd = str(tmp_path_factory.mktemp("drill") / "trained")
    proc = _train(wd, shapes_data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(wd) == [2, 4]
    return wd


@pytest.fixture
def copy_of(trained, tmp_path):
    def make(name="wd"):
        dst = str(tmp_path / name)
        shutil.copytree(trained, dst)
        return dst
    return make


# -- 1. Presets through the real command line ---------------------------------------------------

def _presets():
    out = []
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        name = os.path.basename(path)[:-3]
        if name in ("__init__", "common"):
            continue
        with open(path) as f:
            text = f.read()
        # Every preset is listed in the config's own "valid: ..." error message.
        valid = text.split("valid: ", 1)[1].split(".", 1)[0] if "valid: " in text else "default"
        for preset in [p.strip() for p in valid.replace("'", "").replace('"', "").split(",")]:
            out.append((name, preset))
    return out


PRESETS = _presets()


def test_preset_list_is_complete():
    assert ("mae", "default") in PRESETS and ("diffusion", "text") in PRESETS, PRESETS
    assert len({n for n, _ in PRESETS}) >= 5
    assert set(_CLI_FILES) <= {n for n, _ in PRESETS}, _CLI_FILES   # each still names a config file


# The config files whose first preset goes through the real command line (a subprocess, ~8 s
# each in the suite): the core methods, and one of each kind of data (image-text, SAM's masks,
# a composite model). The other presets check in this process (~1 s each).
_CLI_FILES = ("mae", "clip", "dino", "diffusion", "supervised", "sam", "flamingo")
_FIRST = {}
for _name, _preset in PRESETS:
    _FIRST.setdefault(_name, _preset)
_MISSING_DATA = ("not prepared", "tfds build", "image_folder", "not found",
                 "train a classifier first", "train a dVAE tokenizer first")


@pytest.mark.slow
@pytest.mark.parametrize("name, preset", PRESETS, ids=[f"{n}:{p}" for n, p in PRESETS])
def test_1_every_preset_passes_the_config_check_from_the_cli(name, preset, shapes_data_dir, tmp_path,
                                                             capsys):
    """``--config=configs/X.py:preset --check_only``: the whole check phase runs and nothing
    is written. Presets on data this machine lacks (ImageNet, an image-text folder) may only
    fail with the one-line missing-data error; diffusion.py:cpu, whose generation eval needs a
    trained classifier workdir, only with the one-line missing-classifier error.

    The first preset of each config file in ``_CLI_FILES`` goes through the real command line
    (a subprocess); the others through the same ``load_config`` + ``run_with_clean_errors(
    train_and_evaluate, check_only=True)`` in this process, 8 simulated devices as the CLI run
    has (a subprocess per preset cost ~8 s of start-up each, ~6 minutes of the suite; one per
    config file still ~4 minutes)."""
    wd = tmp_path / "wd"
    if _FIRST[name] == preset and name in _CLI_FILES:
        proc = run_cli("train", f"--config=configs/{name}.py:{preset}", f"--workdir={wd}",
                       f"--config.data.data_dir={shapes_data_dir}", "--check_only", devices=8)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
        line = assert_one_line_error(proc) if code else ""
    else:
        from fmjax.testing import load_config
        from fmjax.train.errors import run_with_clean_errors
        from fmjax.train.loop import train_and_evaluate
        c = load_config(name, preset)
        c.data.data_dir = shapes_data_dir
        try:
            run_with_clean_errors(train_and_evaluate, c, str(wd), check_only=True)
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        line = lines[-1] if lines else ""
        if code:
            assert code == 2 and line.startswith("fmjax: error: ") and "Traceback" not in err, err[-2000:]
    if code == 0:
        assert "== config OK" in out, out[-2000:]
        assert "Traceback" not in err
    else:
        assert any(t in line for t in _MISSING_DATA), line
    assert not wd.exists()


def test_1_preset_suffix_trains(shapes_data_dir, tmp_path):
    """The README's form ``configs/mae.py:default`` trains (it said 'config file not found')."""
    proc = run_cli("train", "--config=configs/mae.py:default", f"--workdir={tmp_path / 'wd'}",
                   f"--config.data.data_dir={shapes_data_dir}", *TINY[1:], "--config.total_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(tmp_path / "wd") == [1]


@pytest.mark.parametrize("script", ["train", "eval", "sample", "benchmark"])
def test_11_help_exits_zero(script):
    proc = run_cli(script, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--workdir" in proc.stdout or "--config" in proc.stdout


# -- 2. NaN ---------------------------------------------------------------------------------------

def test_2_nan_is_never_checkpointed(shapes_data_dir, tmp_path):
    """The drill's reproduction: a NaN at step ~3 with a checkpoint every step and the loss
    logged every 10. It used to leave only NaN checkpoints (6, 7, 8) and say nothing was saved."""
    wd = str(tmp_path / "wd")
    proc = _train(wd, shapes_data_dir, "--config.log_every=10", "--config.checkpoint_every=1",
                  "--config.optimizer.blr=1e6", steps=["--config.total_steps=30"])
    line = assert_one_line_error(proc, "non-finite training state at step", "last good checkpoint is step")
    bad_step = int(line.split("at step ")[1].split()[0])
    good = int(line.split("last good checkpoint is step ")[1].split()[0])
    assert _steps(wd) and max(_steps(wd)) == good == bad_step - 1, (line, _steps(wd))
    _assert_restorable(wd)
    assert all(r.get("train/loss") is None or np.isfinite(r["train/loss"]) for r in _rows(wd))


def test_2_skip_step_policy_keeps_training(shapes_data_dir, tmp_path):
    """``nonfinite=skip_step``: a non-finite step leaves the state as it was and the run goes on."""
    wd = str(tmp_path / "wd")
    proc = _train(wd, shapes_data_dir, "--config.nonfinite=skip_step", "--config.optimizer.blr=1e6",
                  "--config.checkpoint_every=3", steps=["--config.total_steps=6"])
    assert proc.returncode in (0, 2), proc.stderr[-3000:]
    assert "step skipped" in proc.stdout
    _assert_restorable(wd)


def test_9_metrics_jsonl_writes_nan_as_null(tmp_path):
    from fmjax.train.writer import MetricWriter
    w = MetricWriter(str(tmp_path), 10, enabled=True)
    w.write(1, {"eval/knn_top1": float("nan"), "train/loss": 1.5, "x": float("inf")})
    w.close()
    with open(tmp_path / "metrics.jsonl") as f:
        row = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    assert row == {"step": 1, "eval/knn_top1": None, "train/loss": 1.5, "x": None}


def _nan_checkpoint(workdir, step):
    """Writes a copy of the latest checkpoint as ``step`` with every param NaN."""
    src = os.path.join(workdir, "checkpoints", str(max(_steps(workdir))))
    dst = os.path.join(workdir, "checkpoints", str(step))
    shutil.copytree(src, dst)
    shutil.rmtree(os.path.join(dst, "state"))
    state = jax.device_get(ocp.StandardCheckpointer().restore(os.path.join(src, "state")))
    state["params"] = jax.tree.map(lambda x: np.full_like(x, np.nan), state["params"])
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(dst, "state"), state)
    ckptr.wait_until_finished()
    with open(os.path.join(dst, "meta", "metadata")) as f:
        meta = json.load(f)
    meta["step"] = step
    with open(os.path.join(dst, "meta", "metadata"), "w") as f:
        json.dump(meta, f)


def test_9_eval_of_a_nan_checkpoint_is_an_error_naming_the_step(copy_of):
    wd = copy_of()
    _nan_checkpoint(wd, 6)
    before = _snapshot(wd)
    proc = run_cli("eval", f"--workdir={wd}")
    assert_one_line_error(proc, "checkpoint step 6", "non-finite", "--step=N")
    assert _snapshot(wd) == before


# -- 3, 10. Config values that used to crash or destroy ---------------------------------------------

@pytest.mark.parametrize("override, expected", [
    ("--config.keep_checkpoints=0", ["keep_checkpoints must be positive, got 0", "delete every checkpoint"]),
    ("--config.keep_checkpoints=-1", ["keep_checkpoints must be positive, got -1"]),
    ("--config.batch_size=0", ["batch_size must be positive, got 0"]),
    ("--config.batch_size=-16", ["batch_size must be positive, got -16"]),
    ("--config.optimizer.name=adamx", ["Unknown optimizer 'adamx'", "'adamw'"]),
    ("--config.optimizer.decay=cosin", ["config.optimizer.decay='cosin'", "'cosine'"]),
    ("--config.nonfinite=ignore", ["config.nonfinite='ignore'", "skip_step"]),
    ("--config.data.read_threads=0", ["config.data.read_threads=0 must be an int >= 1"]),
    ("--config.data.worker_count=-1", ["config.data.worker_count=-1 must be an int >= 0"]),
])
def test_3_10_bad_values_fail_before_anything_is_written(override, expected, shapes_data_dir, tmp_path):
    wd = tmp_path / "wd"
    proc = _train(wd, shapes_data_dir, override)
    assert_one_line_error(proc, *expected)
    assert not wd.exists()


@pytest.mark.parametrize("override", ["--config.keep_checkpoints=0", "--config.optimizer.name=nope",
                                      "--config.data.pp_train=resize(32)|nosuchop",
                                      "--config.data.image_size=16"])
def test_5_failed_start_leaves_a_good_workdir_untouched(override, copy_of, shapes_data_dir):
    """config.json used to be written before the later checks; eval.py then used the bad one."""
    wd = copy_of()
    before = _snapshot(wd)
    proc = _train(wd, shapes_data_dir, override, steps=["--config.total_steps=8"])
    assert_one_line_error(proc)
    assert _snapshot(wd) == before


def test_5_a_resume_with_more_steps_keeps_the_old_config_in_history(copy_of, shapes_data_dir):
    wd = copy_of()
    with open(os.path.join(wd, "config.json")) as f:
        old = f.read()
    proc = _train(wd, shapes_data_dir, steps=["--config.total_steps=6", "--config.checkpoint_every=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = glob.glob(os.path.join(wd, "config_history", "*.json"))
    assert len(history) == 1 and open(history[0]).read() == old
    assert json.load(open(os.path.join(wd, "config.json")))["total_steps"] == 6


def test_10_resume_with_another_optimizer_is_refused(copy_of, shapes_data_dir):
    wd = copy_of()
    before = _snapshot(wd)
    proc = _train(wd, shapes_data_dir, "--config.optimizer.name=sgd", steps=["--config.total_steps=8"])
    assert_one_line_error(proc, "another optimizer state", "optimizer.name: saved 'adamw', now 'sgd'")
    assert _snapshot(wd) == before


def test_10_eval_with_a_config_that_does_not_match_the_checkpoint(copy_of, shapes_data_dir):
    wd = copy_of()
    before = _snapshot(wd)
    proc = run_cli("eval", f"--workdir={wd}", TINY[0], f"--config.data.data_dir={shapes_data_dir}",
                   *TINY[1:], "--config.model.width=48")
    assert_one_line_error(proc, "incompatible config", "model.width: saved 32, now 48")
    assert _snapshot(wd) == before


def test_10_workdir_that_is_a_file_or_under_a_file(shapes_data_dir, tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep me")
    assert_one_line_error(_train(f, shapes_data_dir), "is a file, not a directory")
    assert_one_line_error(_train(f / "sub", shapes_data_dir), "cannot create", "is a file")
    assert f.read_text() == "keep me"


def test_10_unwritable_workdir(shapes_data_dir):
    proc = _train("/proc/fmjax_drill_wd", shapes_data_dir)
    assert_one_line_error(proc, "/proc/fmjax_drill_wd")


# -- 4. Re-running a finished run -----------------------------------------------------------------

def test_4_rerunning_a_finished_run_changes_nothing(copy_of, shapes_data_dir):
    wd = copy_of()
    before = _snapshot(wd)
    proc = _train(wd, shapes_data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already at step 4" in proc.stdout
    assert _snapshot(wd) == before  # final_metrics.json used to become {"step": 4}
    assert len(json.load(open(os.path.join(wd, "final_metrics.json")))) > 3


# -- 6. Ctrl-C --------------------------------------------------------------------------------------

def _popen_train(workdir, data_dir, *extra, steps):
    return subprocess.Popen(
        [sys.executable, "launch/train.py", f"--workdir={workdir}", TINY[0],
         f"--config.data.data_dir={data_dir}", *TINY[1:], *steps, *extra], cwd=REPO, env=cli_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def _wait_for_step(proc, workdir, step, timeout=300):
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.communicate()[1][-3000:]}")
        if step in _steps(workdir):
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_6_ctrl_c_saves_the_step_and_exits_130(shapes_data_dir, tmp_path):
    wd = str(tmp_path / "wd")
    # Slow steps (a large batch) so that the interrupt lands mid-run, after the step-2 save.
    proc = _popen_train(wd, shapes_data_dir, "--config.batch_size=256", "--config.model.width=64",
                        steps=["--config.total_steps=400", "--config.checkpoint_every=2"])
    _wait_for_step(proc, wd, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("fmjax: interrupted (Ctrl-C) at step"), err[-3000:]
    k = int(lines[-1].split("at step ")[1].split(";")[0])
    assert k in _steps(wd) and k < 400
    _assert_restorable(wd)
    # The same command resumes from that step, not from 0.
    proc = _train(wd, shapes_data_dir, "--config.batch_size=256", "--config.model.width=64",
                  steps=[f"--config.total_steps={k + 1}", "--config.checkpoint_every=2"])
    assert proc.returncode == 0 and f"resuming from step {k}" in proc.stdout, proc.stderr[-3000:]


# -- 7. Corrupt checkpoints ------------------------------------------------------------------------

def _corrupt(workdir, step):
    """Truncates every data file of a step's state to a third (the drill truncated one; all of
    them makes the params unreadable too, whichever file Orbax put them in)."""
    files = [p for p in glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**"),
                                  recursive=True) if os.path.isfile(p) and f"{os.sep}d{os.sep}" in p]
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)


def test_7_corrupt_latest_checkpoint_falls_back_and_is_kept(copy_of, shapes_data_dir):
    wd = copy_of()
    _corrupt(wd, 4)
    corrupt = _snapshot(os.path.join(wd, "checkpoints", "4"))
    # eval.py: falls back to step 2 with one warning, moves nothing.
    proc = run_cli("eval", f"--workdir={wd}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("fmjax: warning:")]
    assert len(warnings) == 1 and "checkpoints/4 cannot be read" in warnings[0] and "using step 2" in warnings[0]
    assert "Traceback" not in proc.stderr and "at step 2" in proc.stdout
    # train.py: resumes from step 2, keeps the unreadable folder (moved aside) and finishes.
    proc = _train(wd, shapes_data_dir, steps=["--config.total_steps=6", "--config.checkpoint_every=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from step 2" in proc.stdout and "Traceback" not in proc.stderr
    assert "moved it to" in proc.stderr
    assert _snapshot(os.path.join(wd, "unreadable_checkpoints", "4")) == corrupt
    assert _steps(wd)[-1] == 6
    _assert_restorable(wd)


def test_7_no_readable_checkpoint_is_one_line_and_never_step_0(copy_of, shapes_data_dir):
    wd = copy_of()
    for s in _steps(wd):
        _corrupt(wd, s)
    before = _snapshot(wd)
    proc = _train(wd, shapes_data_dir, steps=["--config.total_steps=8"])
    assert_one_line_error(proc, "no checkpoint in", "can be read", "checkpoints/2", "checkpoints/4")
    assert _snapshot(wd) == before
    proc = run_cli("eval", f"--workdir={wd}")
    assert_one_line_error(proc, "can be read")


# -- 8. Overrides baked into pp_train ------------------------------------------------------------

@pytest.mark.parametrize("config, override, expected", [
    ("mae", "--config.data.image_size=16", "config.data.image_size=16 but config.data.pp_train makes 32x32"),
    ("clip", "--config.data.tokenize.context_length=16", "config.data.tokenize="),
    ("clip", "--config.data.tokenize.vocab_size=4096", "config.data.tokenize="),
    ("clip", "--config.data.swap_words=('red','blue')", "config.data.swap_words=('red', 'blue')"),
])
def test_8_overrides_the_pipeline_ignores_are_refused(config, override, expected, shapes_data_dir, tmp_path):
    extra = ["--config.model.vocab_size=4096"] if "vocab_size" in override else []
    proc = run_cli("train", f"--config=configs/{config}.py", f"--workdir={tmp_path / 'wd'}",
                   f"--config.data.data_dir={shapes_data_dir}", override, *extra, "--check_only")
    assert_one_line_error(proc, expected, "--config.data.pp_train")


# -- 11. Lesser issues ----------------------------------------------------------------------------

def test_11_resume_does_not_duplicate_metric_rows(copy_of, shapes_data_dir):
    """A run that died after logging steps 3-4 but before their checkpoint logs them again."""
    wd = copy_of()
    shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
    os.remove(os.path.join(wd, "final_metrics.json"))
    proc = _train(wd, shapes_data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r["step"] for r in _rows(wd) if "train/loss" in r]
    assert steps == [1, 2, 3, 4], steps
    assert os.path.exists(os.path.join(wd, "metrics_discarded.jsonl"))


def test_11_a_held_workdir_is_refused(copy_of, shapes_data_dir):
    from fmjax.train.workdir import WorkdirLock
    wd = copy_of()
    before = _snapshot(wd)
    with WorkdirLock(wd):
        proc = _train(wd, shapes_data_dir, steps=["--config.total_steps=8"])
    assert_one_line_error(proc, "is in use by another run", f"pid {os.getpid()}")
    assert _snapshot(wd) == before


def test_11_tilde_workdir_is_expanded(shapes_data_dir, tmp_path):
    proc = _train("~/wd", shapes_data_dir, steps=["--config.total_steps=1"], env={"HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(tmp_path / "wd") == [1]
    assert not os.path.exists(os.path.join(REPO, "~"))


def test_checkpoint_meta_holds_the_batch_spec_so_loading_needs_no_data(copy_of, tmp_path):
    """Eval and sampling rebuild the state from the spec saved in the checkpoint, not from the
    first training example (issue 13): a workdir restores with its training data gone."""
    from fmjax.train import restore
    wd = copy_of()
    config = restore.load_workdir_config(wd)
    config.data.name = f"image_folder:{tmp_path / 'no_data_here'}"
    _, _, _, _, state, step = restore.load_checkpoint(wd, config)
    assert step == 4 and state.opt_state is None
    np.testing.assert_allclose(jax.tree.leaves(jax.device_get(state.params))[0],
                               jax.tree.leaves(_params(wd, 4))[0])
