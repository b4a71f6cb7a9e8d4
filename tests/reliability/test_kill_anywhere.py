"""Kill -9 a tiny run at 10 random moments (start-up and compile, a step, an async save, an
eval); resume after each and finish. The final params must equal an uninterrupted run's and
``metrics.jsonl`` must hold each step once."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fmjax.testing import REPO, cli_env

TOTAL = 16
FLAGS = [
    "--config=configs/mae.py", "--config.batch_size=32", "--config.log_every=1",
    "--config.eval_every=4", "--config.eval_at_start=True", "--config.optimizer.warmup_steps=4",
    "--config.model.width=32", "--config.model.depth=2", "--config.model.num_heads=2",
    "--config.model.mlp_dim=64", "--config.model.decoder_width=32",
    "--config.model.decoder_depth=1", "--config.model.decoder_heads=2",
    f"--config.total_steps={TOTAL}", "--config.checkpoint_every=2", "--config.keep_checkpoints=2",
    # One cheap eval, so that kills also land in evaluation.
    "--config.evals={'val_loss': {'type': 'loss', 'split': 'validation', 'examples': 64}}",
]


def _cmd(workdir, data_dir):
    return [sys.executable, "launch/train.py", FLAGS[0], f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", *FLAGS[1:]]


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _run_and_kill(workdir, data_dir, trigger, delay):
    """Starts the run; ``trigger`` None: kill after ``delay`` s; else after the stdout line
    containing ``trigger`` (plus ``delay`` s). Returns (killed, return code, stderr tail)."""
    proc = subprocess.Popen(_cmd(workdir, data_dir), cwd=REPO, env=cli_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err = []
    threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True).start()
    killed = False
    t0 = time.time()
    if trigger is None:
        while time.time() - t0 < delay and proc.poll() is None:
            time.sleep(0.01)
    else:
        for line in proc.stdout:
            if trigger in line:
                time.sleep(delay)
                break
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        killed = True
    proc.stdout.close() if proc.stdout else None
    proc.wait(timeout=120)
    time.sleep(0.2)
    return killed, proc.returncode, "".join(err)[-3000:]


@pytest.mark.slow
def test_kill_9_at_ten_random_moments_then_resume_equals_uninterrupted(shapes_data_dir, tmp_path):
    straight = str(tmp_path / "straight")
    proc = subprocess.run(_cmd(straight, shapes_data_dir), cwd=REPO, env=cli_env(1),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rng = random.Random(1234)
    wd = str(tmp_path / "killed")
    moments = []
    for i in range(10):
        start = max(_steps(wd), default=0)
        if i < 2:  # during start-up: imports, data, restore, compile
            trigger, delay = None, rng.uniform(0.5, 6.0)
        elif i % 4 == 2:  # during an eval (evals run every 4 steps)
            trigger, delay = "== compiled" if start == 0 else f"[step {min(start + 4 - start % 4, TOTAL)}/", rng.uniform(0.0, 0.3)
        else:  # mid-training: right after a step's log line, often inside an async save
            k = rng.randint(start + 1, TOTAL - 1) if start + 1 < TOTAL else TOTAL
            trigger, delay = f"[step {k}/", rng.uniform(0.0, 0.15)
        killed, rc, err = _run_and_kill(wd, shapes_data_dir, trigger, delay)
        moments.append((i, start, trigger, round(delay, 2), killed, rc))
        assert killed or rc == 0, (moments, err)
        assert "Traceback" not in err, (moments, err)

    assert sum(m[4] for m in moments) >= 8, moments  # most attempts really were killed
    print("kill moments (i, resumed from, trigger, delay, killed, rc):", *moments, sep="\n  ")
    proc = subprocess.run(_cmd(wd, shapes_data_dir), cwd=REPO, env=cli_env(1), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (moments, proc.stderr[-3000:])
    assert TOTAL in _steps(wd), moments

    # The same final params as the uninterrupted run.
    a, b = (jax.device_get(ocp.StandardCheckpointer().restore(os.path.join(d, "checkpoints", str(TOTAL), "state")))
            for d in (straight, wd))
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a["params"])[0], jax.tree.leaves(b["params"])):
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6, err_msg=f"{jax.tree_util.keystr(path)} {moments}")

    # Each step logged once, every line valid JSON, the same losses as the uninterrupted run.
    def rows(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]
    train = [r for r in rows(wd) if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, TOTAL + 1)), (moments, [r["step"] for r in train])
    ref = {r["step"]: r["train/loss"] for r in rows(straight) if "train/loss" in r}
    np.testing.assert_allclose([r["train/loss"] for r in train], [ref[s] for s in range(1, TOTAL + 1)],
                               rtol=1e-6)
    evals = [r["step"] for r in rows(wd) if "eval/val_loss" in r]
    assert evals == [0, 4, 8, 12, 16], (moments, evals)
