"""Checkpoint and resume: an interrupted run continues exactly as if it had never stopped.

(a) N steps, stop, resume to 2N == 2N uninterrupted (params and data order);
(b) SIGTERM to ``launch/train.py``: checkpoint, exit 0, and a re-run resumes;
(c) a checkpoint written on 8 devices restores onto 4 and onto 1;
(d) a workdir holding another config's checkpoints is refused, untouched.
"""
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

from fmjax import testing

from fmjax.data import sources, transforms
from fmjax.objectives.base import make_objective
from fmjax.parallel.mesh import make_mesh
from fmjax.parallel.rules import get_rules
from fmjax.train import checkpoint as ckpt
from fmjax.train import loop
from fmjax.train import setup
from fmjax.train import optimizer as opt_lib
from fmjax.train import state as state_lib
from fmjax.train.checkpoint import IncompatibleCheckpointError
from fmjax.train.validate import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The overrides tests/conftest.py's tiny_config('mae') applies, as launch/train.py flags.
TINY_MAE_FLAGS = [
    "--config.batch_size=16", "--config.log_every=1", "--config.eval_every=0",
    "--config.eval_at_start=False", "--config.optimizer.warmup_steps=2",
    "--config.model.width=32", "--config.model.depth=2", "--config.model.num_heads=2",
    "--config.model.mlp_dim=64", "--config.model.decoder_width=32",
    "--config.model.decoder_depth=1", "--config.model.decoder_heads=2",
]


def _stop_after(n):
    return testing.stop_after(n)


def _train_interrupted(monkeypatch, config, workdir, n):
    with monkeypatch.context() as m:
        m.setattr(loop, "_Preemption", _stop_after(n))
        final = loop.train_and_evaluate(config, workdir)
    assert final["step"] == n
    return final


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "train/loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {r["step"]: r for r in rows}


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _saved_state(workdir, step):
    """The saved TrainState as a dict of numpy (any device layout)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return jax.device_get(ocp.StandardCheckpointer().restore(path))


def _assert_trees_close(a, b, rtol=0.0, atol=0.0):
    paths_a = jax.tree_util.tree_flatten_with_path(a)[0]
    leaves_b = jax.tree.leaves(b)
    assert len(paths_a) == len(leaves_b)
    for (path, x), y in zip(paths_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def _snapshot(directory):
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            p = os.path.join(root, name)
            st = os.stat(p)
            with open(p, "rb") as f:
                out[os.path.relpath(p, directory)] = (st.st_size, st.st_mtime_ns, hash(f.read()))
    return out


# -- (a) -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mae", "dino", "simmim", "beit", "mae+lora", "supervised+tinyvit",
                                  "dalle", "clip+resnet", "sam", "owl"])
def test_interrupted_and_resumed_equals_uninterrupted(name, tiny_config, tmp_path, monkeypatch):
    """For DINO this covers the teacher and center (``extra``) and its step schedules;
    'mae+lora': LoRA adapters (fmjax.adapt) on a frozen MAE, restored exactly;
    'dalle': the frozen dVAE in extra and the sparse-attention transformer;
    'clip+resnet': ALIGN's BatchNorm image tower (its statistics in extra);
    'supervised+tinyvit': a backbone with model state (TinyViT's BatchNorm running statistics,
    carried in ``extra``) under the weight EMA and 2 micro-batches per step;
    'sam': the interactive rounds' prompt draws (box or point, clicks) from the step's key;
    'owl': the detector on its CLIP towers, the matching and the per-phrase queries."""
    n = 3
    name, _, variant = name.partition("+")
    # Periodic checkpoints at 4: the stop at 3 is saved only because it was asked to stop.
    config = tiny_config(name, total_steps=2 * n, checkpoint_every=4)
    if variant == "lora":
        config.adapter.update(dict(name=variant, rank=2, train=("decoder_pred/.*",)))
    if variant == "resnet":
        model = {k: v for k, v in config.model.items()
                 if k not in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "stem")}
        config.model = dict(model, image=dict(name="resnet", variant="18", stem="cifar", stem_width=8,
                                              dims=(8, 8, 16, 16)))
    if variant == "tinyvit":
        config.model = dict(name="tinyvit", embed_dims=(16, 32, 48), depths=(1, 1, 1), num_heads=(1, 2, 4),
                            window_sizes=(1, 4, 2), num_classes=config.model.num_classes)
        config.objective.ema_decay, config.grad_accum_steps = 0.9, 2
    if name == "sam":
        config.model.update(dict(global_attn_indexes=(1,), prompt_dim=32, decoder_heads=2, decoder_mlp_dim=64,
                                 iou_head_hidden_dim=32))
        config.batch_size, config.objective.correction_rounds = 8, 1
    resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")

    _train_interrupted(monkeypatch, config, resumed, n)
    assert _steps(resumed) == [n]
    final_resumed = loop.train_and_evaluate(config, resumed)
    final_straight = loop.train_and_evaluate(config, straight)
    assert final_resumed["step"] == final_straight["step"] == 2 * n
    assert _steps(resumed) == [n, 4, 2 * n] and _steps(straight) == [4, 2 * n]

    # Same batches in the same order (the loss of a step depends on its batch and mask),
    # and the same params, optimizer state and rng.
    rows_r, rows_s = _rows(resumed), _rows(straight)
    assert sorted(rows_r) == sorted(rows_s) == list(range(1, 2 * n + 1))
    for step in range(1, 2 * n + 1):
        keys = ("train/loss", "train/grad_norm", "train/param_norm")
        if name == "dino":
            keys += ("train/teacher_temp", "train/momentum", "train/teacher_entropy", "train/kl")
        for key in keys:
            np.testing.assert_allclose(rows_r[step][key], rows_s[step][key], rtol=1e-6,
                                       err_msg=f"{key} at step {step}")
    _assert_trees_close(_saved_state(resumed, 2 * n), _saved_state(straight, 2 * n), atol=1e-7)
    np.testing.assert_allclose(final_resumed["train/loss"], final_straight["train/loss"], rtol=1e-6)


# -- (b) -------------------------------------------------------------------------------------------

def test_sigterm_saves_exits_zero_and_resumes(tiny_config, shapes_data_dir, tmp_path, capsys):
    config = tiny_config("mae")
    sources.get_source(config.data.name, "train", shapes_data_dir)  # prepare the data here, not in the child
    workdir = str(tmp_path / "wd")
    total = 100_000
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ["FMJAX_TEST_JAX_CACHE"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"), "--config=configs/mae.py",
           f"--workdir={workdir}", f"--config.data.data_dir={shapes_data_dir}",
           f"--config.total_steps={total}", f"--config.checkpoint_every={total}"] + TINY_MAE_FLAGS
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            metrics = os.path.join(workdir, "metrics.jsonl")
            deadline = time.time() + 150
            while True:
                assert proc.poll() is None, f"trainer exited early:\n{log_path.read_text()[-3000:]}"
                assert time.time() < deadline, f"no steps logged:\n{log_path.read_text()[-3000:]}"
                if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
                    break
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = log_path.read_text()
    assert rc == 0, out[-3000:]
    saved = _steps(workdir)
    assert len(saved) == 1 and 3 <= saved[0] < total, (saved, out[-3000:])
    assert f"SIGTERM: saved step {saved[0]}" in out
    assert max(_rows(workdir)) == saved[0]

    # Re-running the same workdir resumes from that checkpoint (same model; a shorter run).
    k = saved[0]
    capsys.readouterr()
    final = loop.train_and_evaluate(tiny_config("mae", total_steps=k + 2), workdir)
    assert f"resuming from step {k}" in capsys.readouterr().out
    assert final["step"] == k + 2
    assert sorted(_rows(workdir)) == list(range(1, k + 3))
    assert _steps(workdir)[-1] == k + 2


# -- (c) -------------------------------------------------------------------------------------------

def _sgd(config):
    # Linear in the gradient, so continuations on different meshes stay float-close
    # (Adam would amplify float noise in gradients that are exactly zero in theory).
    config.optimizer.update(dict(name="sgd", lr=0.5, lr_scaling="none", momentum=0.9,
                                 warmup_steps=0, decay="constant", clip_norm=0.0))
    return config


def _restore_onto(config, workdir, step, devices):
    """Restores ``step`` of ``workdir`` onto a mesh of ``devices`` through fmjax's restore."""
    objective = make_objective(config)
    mesh = make_mesh(config.mesh, devices)
    rules = get_rules(config.sharding)
    tx, _ = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    source = sources.get_source(config.data.name, "train", config.data.data_dir)
    spec = setup.batch_spec(source, transforms.parse(config.data.pp_train), objective.batch_keys,
                            config.batch_size)
    abstract, shardings, _ = state_lib.state_shardings(objective, tx, spec, mesh, rules, config.seed)
    manager = ckpt.make_manager(workdir)
    try:
        state = ckpt.restore(manager, step, abstract, shardings, None)
    finally:
        manager.close()
    return state, mesh


def test_checkpoint_from_8_devices_restores_on_4_and_1(tiny_config, tmp_path, monkeypatch):
    meshes = {8: dict(data=2, fsdp=4, tensor=1), 4: dict(data=1, fsdp=4, tensor=1), 1: dict(data=-1)}
    configs = {n: _sgd(tiny_config("mae", total_steps=3, checkpoint_every=2, mesh=m))
               for n, m in meshes.items()}
    base = str(tmp_path / "base")
    _train_interrupted(monkeypatch, configs[8], base, 2)
    assert _steps(base) == [2]

    # Restored state: bitwise the saved one, laid out on the new mesh.
    ref = jax.device_get(_restore_onto(configs[8], base, 2, jax.devices()[:8])[0])
    for n in (4, 1):
        state, mesh = _restore_onto(configs[n], base, 2, jax.devices()[:n])
        leaf = max(jax.tree.leaves(state.params), key=lambda x: x.size)
        assert leaf.sharding.mesh.devices.size == n and set(leaf.devices()) == set(jax.devices()[:n])
        if n == 4:
            assert "fsdp" in leaf.sharding.spec
            assert leaf.addressable_shards[0].data.size * 4 == leaf.size
        _assert_trees_close(jax.device_get(state), ref)

    # Training continues identically: one more step on 8, 4 and 1 devices.
    finals, params = {}, {}
    for n in (8, 4, 1):
        workdir = str(tmp_path / f"on{n}")
        shutil.copytree(base, workdir)
        finals[n] = loop.train_and_evaluate(configs[n], workdir, devices=jax.devices()[:n])
        assert finals[n]["step"] == 3
        assert sorted(_rows(workdir)) == [1, 2, 3]
        params[n] = _saved_state(workdir, 3)["params"]
    for n in (4, 1):
        for key in ("train/loss", "train/grad_norm", "train/param_norm"):
            np.testing.assert_allclose(finals[n][key], finals[8][key], rtol=1e-5, err_msg=f"{key} on {n}")
        _assert_trees_close(params[n], params[8], rtol=1e-5, atol=1e-6)


# -- (d) -------------------------------------------------------------------------------------------

def test_incompatible_checkpoint_is_refused_and_untouched(tiny_config, tmp_path):
    workdir = str(tmp_path / "wd")
    loop.train_and_evaluate(tiny_config("mae", total_steps=2), workdir)
    before = _snapshot(os.path.join(workdir, "checkpoints"))
    assert _steps(workdir) == [2]

    wider = tiny_config("mae", total_steps=4, **{"model.width": 64})
    with pytest.raises((IncompatibleCheckpointError, ConfigError)) as info:
        loop.train_and_evaluate(wider, workdir)
    msg = str(info.value)
    assert workdir in msg and "new --workdir" in msg and "width" in msg, msg
    assert _snapshot(os.path.join(workdir, "checkpoints")) == before
    assert _steps(workdir) == [2]
    assert max(_rows(workdir)) == 2
