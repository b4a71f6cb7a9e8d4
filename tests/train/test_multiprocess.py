"""Two processes (4 CPU devices each, one 8-device mesh) train like one process does.

``launch/train.py`` runs twice with the coordinator variables
(``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``); each
process loads half of every global batch. The reference is the trainer's own
state creation and jitted step in this (single) process on 8 devices, fed the
same global batches: the two processes' shards of the pipeline
(``process_index=p, process_count=2``) concatenated in process order.
Losses per step and the saved params must agree.
"""
import json
import os
import pathlib
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from fmjax import testing
from fmjax.data import pipeline, sources, transforms
from fmjax.objectives.base import make_objective
from fmjax.parallel.mesh import batch_sharding, make_mesh
from fmjax.parallel.rules import get_rules
from fmjax.train import setup
from fmjax.train import optimizer as opt_lib
from fmjax.train.state import create_state, mesh_context
from fmjax.train.step import jit_train_step, make_train_step

STEPS = 3
# tiny_config('mae') as flags, plus SGD at a constant lr (the update is linear in the
# gradient, so params compare tightly; Adam amplifies float noise in zero gradients).
OVERRIDES = {
    "total_steps": STEPS, "batch_size": 16, "log_every": 1, "eval_every": 0,
    "eval_at_start": False, "checkpoint_every": STEPS,
    "mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1,
    "model.width": 32, "model.depth": 2, "model.num_heads": 2, "model.mlp_dim": 64,
    "model.decoder_width": 32, "model.decoder_depth": 1, "model.decoder_heads": 2,
    "optimizer.name": "sgd", "optimizer.lr": 0.5, "optimizer.lr_scaling": "none",
    "optimizer.warmup_steps": 0, "optimizer.decay": "constant",
}


def _launch(workdir, data_dir, tmp_path):
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    args = ["--config=configs/mae.py", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"] + flags
    procs, logs = testing.launch_processes("train", [args, args], devices_per_process=4, log_dir=str(tmp_path))
    return procs, [pathlib.Path(log) for log in logs]


def _wait(procs, logs, timeout):
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            assert not failed, "\n".join(f"-- process {i}:\n{logs[i].read_text()[-3000:]}" for i in failed)
            assert time.time() < deadline, "\n".join(
                f"-- process {i} timed out:\n{log.read_text()[-3000:]}" for i, log in enumerate(logs))
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, logs[i].read_text()[-3000:]


def _reference(config):
    """Single process, 8 devices, the global batches two processes would assemble."""
    objective = make_objective(config)
    mesh = make_mesh(config.mesh, jax.devices()[:8])
    rules = get_rules(config.sharding)
    tx, schedule = opt_lib.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    source = sources.get_source(config.data.name, "train", config.data.data_dir)
    transform = transforms.parse(config.data.pp_train)
    spec = setup.batch_spec(source, transform, objective.batch_keys, config.batch_size)
    iters = [pipeline.make_train_iterator(source, global_batch_size=config.batch_size, transform=transform,
                                          seed=config.seed, process_index=p, process_count=2)
             for p in range(2)]
    state, shardings = create_state(objective, tx, spec, mesh, rules, config.seed)
    step_fn = make_train_step(objective, tx, schedule, rules, config.grad_accum_steps)
    jitted = jit_train_step(step_fn, shardings, jax.tree.map(lambda _: batch_sharding(mesh), spec))
    losses = []
    with mesh_context(mesh):
        for _ in range(config.total_steps):
            locals_ = [next(it) for it in iters]
            batch = {k: np.concatenate([np.asarray(b[k]) for b in locals_]) for k in spec}
            state, metrics = jitted(state, pipeline.global_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
    return np.array(losses), state


def test_two_processes_match_one(tiny_config, shapes_data_dir, tmp_path):
    config = tiny_config("mae")
    for k, v in OVERRIDES.items():
        *path, last = k.split(".")
        target = config
        for p in path:
            target = target[p]
        target[last] = v
    sources.get_source(config.data.name, "train", shapes_data_dir)  # prepare before the children start
    workdir = str(tmp_path / "wd")

    procs, logs = _launch(workdir, shapes_data_dir, tmp_path)
    try:
        ref_losses, ref_state = _reference(config)  # meanwhile, in this process
    finally:
        _wait(procs, logs, timeout=240)

    out0 = logs[0].read_text()
    assert "2 process(es), 8 device(s)" in out0, out0[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    losses = np.array([r["train/loss"] for r in rows if "train/loss" in r])
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)

    # Each process saved its own data-iterator state; the params agree with the reference.
    ckpt_dir = os.path.join(workdir, "checkpoints", str(STEPS))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(os.path.join(ckpt_dir, "data")))
    # (Saved by devices of two processes: restore onto this process's layout of the same mesh.)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), ref_state)
    restored = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, "state"), target)
    params, ref_params = jax.device_get(restored.params), jax.device_get(ref_state.params)
    assert int(restored.step) == STEPS
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
