"""Helpers for tests of fmjax models (also handy when checking a converted checkpoint).

``perturb`` moves every param off its initial value: freshly initialised diffusion models
(U-Net, DiT) zero their output layers, so a parity or gradient test on raw init would
compare zeros.
"""
import contextlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np


@contextlib.contextmanager
def one_torch_thread():
    """Runs the block with torch on one intra-op thread, then restores the count (a no-op
    when torch was never imported). The PyTorch references of the parity and trajectory tests
    use it: beside a busy core, torch's spinning OpenMP workers made them ~10-100x slower
    (the BLIP and Flamingo trajectory tests took 126 s each in CI, 11 s and 9 s alone). Their
    outputs do not depend on the count."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def perturb(params, seed: int = 0, scale: float = 0.1):
    """``params`` plus ``scale`` * N(0, 1) noise on every leaf (NumPy RNG ``seed``), dtypes kept."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(np.shape(p)), p.dtype),
        params)


# Logical-axis rules of the model sharding tests: the batch over 'data', MLP and heads over 'model'.
MESH_RULES = (("batch", "data"), ("mlp", "model"), ("heads", "model"), ("embed", None), ("length", None),
              ("kv", None), ("patch", None), ("norm", None), ("classes", None))


def init_and_apply_on_mesh(init, apply, x):
    """``(variables, apply(variables, x))`` with ``init(PRNGKey(0), x)`` sharded by its logical
    axes (``MESH_RULES``) on a (4, 2) ('data', 'model') mesh of 8 devices, both jitted."""
    import flax.linen as nn
    from jax.sharding import Mesh
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(MESH_RULES):
        abstract = jax.eval_shape(init, jax.random.PRNGKey(0), x)
        specs = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, MESH_RULES)
        variables = jax.jit(init, out_shardings=specs)(jax.random.PRNGKey(0), x)
        return variables, jax.jit(apply)(variables, x)


def normal_images(b: int = 2, size: int = 16, c: int = 3, seed: int = 0) -> jax.Array:
    """(b, size, size, c) float32 N(0, 1) images (channels last)."""
    return jax.random.normal(jax.random.PRNGKey(seed), (b, size, size, c))


def initial_state(config, devices=None):
    """``(state, log)``: the TrainState a fresh run of ``config`` starts from (its
    ``model_init`` applied, sharded as the trainer shards it) and model_init's log lines."""
    from fmjax.train import optimizer, restore, setup, state as state_lib
    objective, mesh, rules = setup.build(config, devices)
    spec = restore.train_batch_spec(config, objective)
    tx, _ = optimizer.make_optimizer(config.optimizer, config.total_steps, config.batch_size)
    _, shardings, _ = state_lib.state_shardings(objective, tx, spec, mesh, rules, config.seed)
    lines = []
    state = restore.fresh_state(config, objective, tx, spec, mesh, rules, shardings, log=lines.append)
    return state, "\n".join(lines)


def checkpoint_params(workdir: str):
    """The params of ``workdir``'s latest checkpoint, as NumPy arrays."""
    from fmjax.train import restore
    state = restore.load_checkpoint(workdir)[4]
    return jax.tree.map(np.asarray, state.params)


# -- Command-line drills (tests/reliability): run a launcher, check its one-line error. --------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stop_after(n: int):
    """A stand-in for the training loop's preemption handler (``fmjax.train.loop._Preemption``)
    that asks to stop after ``n`` steps, as a SIGTERM would; use with
    ``monkeypatch.setattr(loop, "_Preemption", stop_after(n))``."""
    from fmjax.train import loop

    class StopAfter(loop._Preemption):  # pylint: disable=protected-access
        calls = 0

        def sync(self, step=None):
            StopAfter.calls += 1
            return StopAfter.calls >= n
    return StopAfter


def train_rows(workdir: str, key: str = "train/loss") -> dict:
    """``{step: metrics row}`` of ``workdir``'s metrics.jsonl rows that hold ``key``."""
    import json
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, filter(str.strip, f)) if key in r}


def resume_drill(config, root: str, monkeypatch, n: int = 3, devices=None,
                 keys=("train/loss",), rtol: float = 1e-6):
    """Trains ``config`` (total_steps = 2n) in ``root/resumed`` stopped after n steps (as a
    SIGTERM would) and resumed, and in ``root/straight`` without a stop; asserts both log every
    step 1..2n with the same ``keys`` (rtol). Returns the two workdirs."""
    from fmjax.train import loop
    config.total_steps = 2 * n
    resumed, straight = os.path.join(str(root), "resumed"), os.path.join(str(root), "straight")
    with monkeypatch.context() as m:
        m.setattr(loop, "_Preemption", stop_after(n))
        assert loop.train_and_evaluate(config, resumed, devices=devices)["step"] == n
    loop.train_and_evaluate(config, resumed, devices=devices)
    loop.train_and_evaluate(config, straight, devices=devices)
    a, b = train_rows(resumed), train_rows(straight)
    assert sorted(a) == sorted(b) == list(range(1, 2 * n + 1))
    for s in b:
        for key in keys:
            np.testing.assert_allclose(a[s][key], b[s][key], rtol=rtol, err_msg=f"{key} @ {s}")
    return resumed, straight


def load_config(name: str, preset: str = "default"):
    """``configs/<name>.py`` ``get_config(preset)`` (the repo's ``configs`` package put on
    ``sys.path`` first, as the launchers do)."""
    import importlib
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    return importlib.import_module(f"configs.{name}").get_config(preset)


def cli_env(devices: int = 1, env=None) -> dict:
    """The environment ``run_cli`` gives a launcher: ``devices`` simulated CPU devices, the
    test session's persistent compilation cache and extra XLA flags (``FMJAX_TEST_XLA_EXTRA``, set
    by tests/conftest.py), no FMJAX_TRACEBACK."""
    xla = f"--xla_force_host_platform_device_count={devices} {os.environ.get('FMJAX_TEST_XLA_EXTRA', '')}"
    full_env = dict(os.environ, XLA_FLAGS=xla.strip(),
                    JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    full_env.pop("FMJAX_TRACEBACK", None)
    if os.environ.get("FMJAX_TEST_JAX_CACHE"):  # tests/conftest.py's persistent compilation cache
        full_env.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["FMJAX_TEST_JAX_CACHE"])
        full_env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    full_env.update(env or {})
    return full_env


def run_cli(script: str, *args: str, devices: int = 1, timeout: float = 600, env=None):
    """Runs ``launch/<script>.py args`` from the repository root in a fresh process.

    Returns the ``subprocess.CompletedProcess`` (text stdout / stderr). ``devices``
    simulated CPU devices; the persistent compilation cache of the test session is kept.
    """
    full_env = cli_env(devices, env)
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", f"{script}.py"), *args],
                          cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


_TRAIN_CHILD = """
import pickle, sys
sys.path.insert(0, sys.argv[4])
import jax
from fmjax.train import loop
with open(sys.argv[1], "rb") as f:
    config = pickle.load(f)
final = loop.train_and_evaluate(config, sys.argv[2], devices=jax.devices()[:1])
with open(sys.argv[3], "wb") as f:
    pickle.dump(jax.device_get(final), f)
"""


def train_in_fresh_process(config, workdir: str, timeout: float = 1800, env=None) -> dict:
    """``loop.train_and_evaluate(config, workdir)`` on one CPU device in a fresh process (the
    environment of ``cli_env(1)``: one simulated device, the test session's compilation
    cache); returns its final metrics. Its output is echoed to this process's stdout / stderr.

    For training-bound tests (learning gates): the 8 simulated devices of a test session
    (tests/conftest.py) slow a one-device run in the same process: configs/clip.py's default
    steps at 1.36/s there and 1.52/s alone (2026-12-06, 2-core CPU). A config that does not
    pickle, or a failed run, raises with the child's stderr."""
    import pickle
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        config_path, out_path = os.path.join(tmp, "config.pkl"), os.path.join(tmp, "final.pkl")
        with open(config_path, "wb") as f:
            pickle.dump(config, f)
        proc = subprocess.run([sys.executable, "-c", _TRAIN_CHILD, config_path, str(workdir), out_path, REPO],
                              cwd=REPO, env=cli_env(1, env), capture_output=True, text=True, timeout=timeout)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr[-20000:])
        if proc.returncode != 0:
            raise RuntimeError(f"training in a fresh process exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        with open(out_path, "rb") as f:
            return pickle.load(f)


def assert_one_line_error(proc, *texts: str, code: int = 2) -> str:
    """``proc`` exited with ``code`` and its stderr ends in exactly one ``fmjax: error:`` line
    containing every string of ``texts``, with no traceback anywhere. Returns that line."""
    err = proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines, f"empty stderr; stdout:\n{proc.stdout[-2000:]}"
    errors = [ln for ln in lines if ln.startswith("fmjax: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    for text in texts:
        assert text in errors[0], errors[0]
    return errors[0]


def launch_processes(script: str, per_process_args, devices_per_process: int = 4, log_dir: str = "/tmp",
                     env=None, fake_gcs_root: str | None = None):
    """Starts ``launch/<script>.py`` once per entry of ``per_process_args`` (a list of arg
    lists), as the processes of one jax.distributed job on 127.0.0.1. Returns
    ``(popens, log paths)``; each process writes stdout and stderr to its log.
    ``fake_gcs_root``: every process sees ``gs://`` as that folder (``install_fake_gcs``)."""
    import portpicker
    port = portpicker.pick_unused_port()
    n = len(per_process_args)
    procs, logs = [], []
    for i, args in enumerate(per_process_args):
        full_env = cli_env(devices_per_process, dict(
            env or {}, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
            JAX_PROCESS_ID=str(i)))
        log = os.path.join(log_dir, f"process_{i}.log")
        logs.append(log)
        with open(log, "w") as f:  # the child keeps its own copy of the descriptor
            cmd = (run_with_fake_gcs(fake_gcs_root, script, *args) if fake_gcs_root
                   else [sys.executable, os.path.join(REPO, "launch", f"{script}.py"), *args])
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT))
    return procs, logs


def wait_processes(procs, logs, timeout: float) -> list[int]:
    """Waits for every process (killing all of them after ``timeout`` s); returns exit codes."""
    import time
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs]


def read_log(path: str) -> str:
    with open(path) as f:
        return f.read()


def install_fake_gcs(root: str):
    """Makes ``gs://bucket/path`` a local-emulated bucket under ``root`` for this process:
    etils.epath (through fsspec's ``gcs`` protocol) and Orbax's TensorStore payloads (its GCS
    kvstore spec) both land in ``root/bucket/path``. Nothing contacts the network, and any
    code that handles a ``gs://`` path with plain ``os``/``open`` fails (no such local file).
    Returns a function that undoes it (tests in one process)."""
    import importlib
    import fsspec
    from fsspec.implementations.local import LocalFileSystem
    from etils.epath import backend as epath_backend
    from orbax.checkpoint._src.path import gcs_utils

    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)

    def to_local(path: str) -> str:
        path = str(path)
        if not path.startswith("gs://"):
            return path
        rest = path[len("gs://"):]
        if ("/" + rest + "/").startswith(root + "/"):  # a local path that a caller prefixed with gs://
            return "/" + rest
        return os.path.join(root, rest)

    class FakeGCS(LocalFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, finalize_on_close=None, **kwargs):
            super().__init__(*args, **kwargs)

        @classmethod
        def _strip_protocol(cls, path):
            if isinstance(path, (list, tuple)):
                return [cls._strip_protocol(p) for p in path]
            return LocalFileSystem._strip_protocol(to_local(path))

        def unstrip_protocol(self, name):
            name = str(name)
            return "gs://" + os.path.relpath(name, root) if name.startswith(root + os.sep) else name

    registry = importlib.import_module("fsspec.registry")._registry
    saved = ({p: registry.get(p) for p in ("gs", "gcs")}, gcs_utils.get_kvstore_for_gcs,
             gcs_utils.is_hierarchical_namespace_enabled)

    def undo():
        for proto, cls in saved[0].items():
            registry.pop(proto, None)
            if cls is not None:
                registry[proto] = cls
        gcs_utils.get_kvstore_for_gcs, gcs_utils.is_hierarchical_namespace_enabled = saved[1:]
        epath_backend.fsspec_backend._get_filesystem.cache_clear()

    fsspec.register_implementation("gs", FakeGCS, clobber=True)
    fsspec.register_implementation("gcs", FakeGCS, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()

    def kvstore(path):
        return {"driver": "file", "path": to_local(path)}
    gcs_utils.get_kvstore_for_gcs = kvstore
    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False  # asks the GCS API
    return undo


def run_with_fake_gcs(root: str, script: str, *args: str) -> list[str]:
    """The command line that runs ``launch/<script>.py args`` with ``install_fake_gcs(root)``."""
    code = ("import sys, runpy; from fmjax.testing import install_fake_gcs; "
            f"install_fake_gcs({root!r}); sys.argv = {[os.path.join(REPO, 'launch', script + '.py'), *args]!r}; "
            f"runpy.run_path(sys.argv[0], run_name='__main__')")
    return [sys.executable, "-c", code]
