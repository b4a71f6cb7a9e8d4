"""Several hosts (2 processes on 127.0.0.1, 4 CPU devices each): the pre-flight checks stop a
mismatched job with one line naming the host, and a SIGTERM to one host makes every host
save the same step, exit 0, and resume exactly (jax's preemption service; no per-step barrier), in a gs:// workdir too.
"""
import json
import os
import signal
import time

import pytest

from fmjax import testing
from fmjax.train import preflight

FLAGS = {
    "batch_size": 16, "log_every": 1, "eval_every": 0, "eval_at_start": False,
    "mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1,
    "model.width": 32, "model.depth": 2, "model.num_heads": 2, "model.mlp_dim": 64,
    "model.decoder_width": 32, "model.decoder_depth": 1, "model.decoder_heads": 2,
    "optimizer.name": "sgd", "optimizer.lr": 0.5, "optimizer.lr_scaling": "none",
    "optimizer.warmup_steps": 0, "optimizer.decay": "constant",
}


def _args(workdir, data_dir, **extra):
    flags = dict(FLAGS, **extra)
    return ["--config=configs/mae.py", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"] + [
        f"--config.{k}={v}" for k, v in flags.items()]


def _rows(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def test_compare_names_the_host():
    base = dict(host="a", process=0, code="c", fingerprint="f", config="x", platform="cpu",
                local_devices=4, devices=8, workdir="/w")
    assert preflight.compare(base, [base, dict(base, process=1, host="b")]) is None
    line = preflight.compare(base, [base, dict(base, process=1, host="b", local_devices=2)])
    assert line.startswith("pre-flight: process 1 (host b) has local device count 2, process 0 (host a) has 4")
    line = preflight.compare(base, [base, dict(base, process=1, host="b"), dict(base, process=2, host="c", code="d")])
    assert "process 2 (host c) has code version 'd'" in line and "\n" not in line


def test_code_version_is_stable():
    assert preflight.code_version() == preflight.code_version()
    assert "+" in preflight.code_version()


def test_mismatched_config_stops_every_host(shapes_data_dir, tmp_path):
    from fmjax.data import sources
    sources.get_source("fmjax_shapes/32", "train", shapes_data_dir)  # prepared before the children start
    workdir = str(tmp_path / "wd")
    procs, logs = testing.launch_processes("train", [
        _args(workdir, shapes_data_dir, total_steps=2),
        _args(workdir, shapes_data_dir, total_steps=2, **{"model.depth": 3})], log_dir=str(tmp_path))
    codes = testing.wait_processes(procs, logs, timeout=240)
    for i, log in enumerate(logs):
        text = testing.read_log(log)
        assert codes[i] == 2, f"process {i} exit {codes[i]}:\n{text[-3000:]}"
        last = text.strip().splitlines()[-1]
        assert last.startswith("fmjax: error: pre-flight: process 1 (host "), text[-3000:]
        assert "model/objective config" in last and "same --config" in last, last
        assert "Traceback" not in text
        assert f"[process {i}/2 " in text and "] == fmjax: mae" in text  # every host logs, prefixed
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # nothing compiled or saved


@pytest.mark.slow
def test_sigterm_on_one_host_saves_the_same_step_everywhere(shapes_data_dir, tmp_path):
    """In one gs:// workdir (local-emulated: fmjax.testing.install_fake_gcs in each process):
    both hosts write their shards of the checkpoint, process 0 the logs; a SIGTERM to host 1
    makes both save the same step; a re-run resumes and logs the losses of an uninterrupted run."""
    from fmjax.data import sources
    sources.get_source("fmjax_shapes/32", "train", shapes_data_dir)
    root = tmp_path / "bucket_root"
    bucket = "gs://fmjax-test/mh"
    workdir = str(root / "fmjax-test" / "mh")  # where the fake bucket keeps it
    os.makedirs(tmp_path / "a")
    procs, logs = testing.launch_processes("train", [
        _args(bucket, shapes_data_dir, total_steps=2000, checkpoint_every=5000)] * 2,
        log_dir=str(tmp_path / "a"), fake_gcs_root=str(root))
    deadline = time.time() + 240
    while time.time() < deadline and not any(r["step"] >= 5 for r in _rows(workdir)):
        assert all(p.poll() is None for p in procs), testing.read_log(logs[0])[-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # only host 1 is preempted
    codes = testing.wait_processes(procs, logs, timeout=120)
    out0 = testing.read_log(logs[0])
    assert codes == [0, 0], out0[-3000:] + testing.read_log(logs[1])[-3000:]
    assert f"workdir {bucket}" in out0, out0[-3000:]
    saved = [[int(line.split("saved step ")[1].split(";")[0]) for line in testing.read_log(log).splitlines()
              if "SIGTERM: saved step" in line] for log in logs]  # every host logs its own line
    assert len(saved[0]) == 1 and saved[0] == saved[1] and 5 <= saved[0][0] < 2000, (saved, out0[-3000:])
    step = saved[0][0]
    ckpt_dir = os.path.join(workdir, "checkpoints", str(step))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(os.path.join(ckpt_dir, "data")))
    assert max(r["step"] for r in _rows(workdir)) == step

    # Resume for 3 more steps; an uninterrupted run of the same steps logs the same losses.
    os.makedirs(tmp_path / "b")
    procs, logs = testing.launch_processes("train", [
        _args(bucket, shapes_data_dir, total_steps=step + 3, checkpoint_every=5000)] * 2,
        log_dir=str(tmp_path / "b"), fake_gcs_root=str(root))
    assert testing.wait_processes(procs, logs, timeout=240) == [0, 0], testing.read_log(logs[0])[-3000:]
    assert f"resuming from step {step}" in testing.read_log(logs[0])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == sorted([str(step), str(step + 3)])
    straight = str(tmp_path / "straight")
    os.makedirs(tmp_path / "c")
    procs, logs = testing.launch_processes("train", [
        _args(straight, shapes_data_dir, total_steps=step + 3, checkpoint_every=5000)] * 2,
        log_dir=str(tmp_path / "c"))
    assert testing.wait_processes(procs, logs, timeout=240) == [0, 0], testing.read_log(logs[0])[-3000:]
    resumed = {r["step"]: r["train/loss"] for r in _rows(workdir) if "train/loss" in r}
    reference = {r["step"]: r["train/loss"] for r in _rows(straight) if "train/loss" in r}
    assert sorted(resumed) == list(range(1, step + 4))
    for s in range(1, step + 4):
        assert resumed[s] == pytest.approx(reference[s], rel=1e-5, abs=1e-6), s
    assert not os.path.exists(os.path.join(testing.REPO, "gs:"))


def _config_from_flags(tiny_config, **extra):
    config = tiny_config("mae")
    for k, v in dict(FLAGS, **extra).items():
        *path, last = k.split(".")
        target = config
        for p in path:
            target = target[p]
        target[last] = v
    return config


@pytest.mark.slow
def test_global_order_resumes_on_another_process_count(tiny_config, shapes_data_dir, tmp_path):
    """2 processes train 3 steps (config.data.order='global'); 1 process continues to 5: the
    same losses as 1 process for all 5 steps. (The per-process order's one-line refusal of
    such a resume: tests/data/test_elastic_resume.py.)"""
    from fmjax.train.loop import train_and_evaluate
    from fmjax.data import sources
    sources.get_source("fmjax_shapes/32", "train", shapes_data_dir)
    workdir = str(tmp_path / "global")
    procs, logs = testing.launch_processes("train", [
        _args(workdir, shapes_data_dir, total_steps=3, checkpoint_every=3, **{"data.order": "global"})] * 2,
        log_dir=str(tmp_path))
    assert testing.wait_processes(procs, logs, timeout=240) == [0, 0], testing.read_log(logs[0])[-3000:]
    config = _config_from_flags(tiny_config, total_steps=5, checkpoint_every=5, **{"data.order": "global"})
    resumed = train_and_evaluate(config, workdir)
    straight_dir = str(tmp_path / "straight")
    train_and_evaluate(config, straight_dir)
    got = {r["step"]: r["train/loss"] for r in _rows(workdir) if "train/loss" in r}
    want = {r["step"]: r["train/loss"] for r in _rows(straight_dir) if "train/loss" in r}
    assert resumed["step"] == 5 and sorted(got) == [1, 2, 3, 4, 5]
    for s in range(1, 6):
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), (s, got, want)
