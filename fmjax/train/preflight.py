"""Pre-flight checks of a multi-process run, on every host, before anything compiles.

Each host publishes what it is about to run through jax.distributed's key-value store: the
config fingerprint and the whole config, the code version (a hash of the ``fmjax`` sources
plus the git commit when there is one), its device counts and platform, and the workdir path.
Every host compares every other host with process 0, so they all stop with the same one-line
``ConfigError`` (exit 2) naming the host that differs. Then process 0 leaves a token in the
workdir and each host checks that it sees it: Orbax's multi-host checkpoints need one
directory that every host reaches (a shared filesystem or a bucket).

One process: nothing to compare (``run`` returns at once).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import subprocess
import uuid

import jax

from fmjax.errors import ConfigError
from fmjax.train import files

TIMEOUT_MS = 300_000  # hosts start minutes apart on a pod (pip install, data preparation)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of every ``fmjax/**/*.py`` file (uncommitted edits count), plus the git commit."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha1()
    for dirpath, dirnames, names in sorted(os.walk(root)):
        dirnames.sort()
        for f in sorted(names):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as fh:
                    h.update(fh.read())
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{commit or 'no-git'}+{h.hexdigest()[:12]}"


def describe(config, workdir: str) -> dict:
    """What this host is about to run."""
    from fmjax.train.checkpoint import fingerprint
    text = config.to_json_best_effort(sort_keys=True) if hasattr(config, "to_json_best_effort") \
        else json.dumps(config, sort_keys=True, default=str)
    return dict(
        host=socket.gethostname(), process=jax.process_index(),
        fingerprint=hashlib.sha1(json.dumps(fingerprint(config), sort_keys=True, default=str).encode()).hexdigest()[:12],
        config=hashlib.sha1(text.encode()).hexdigest()[:12],
        code=code_version(), local_devices=jax.local_device_count(), devices=jax.device_count(),
        platform=jax.devices()[0].platform, workdir=workdir)


# (key, what it is, how to fix a difference)
CHECKS = (
    ("code", "code version", "run the same fmjax commit on every host (and pip install -e . there)"),
    ("fingerprint", "model/objective config", "pass the same --config and --config.* flags to every host"),
    ("config", "config", "pass the same --config and --config.* flags to every host"),
    ("platform", "platform", "use the same accelerator type on every host"),
    ("local_devices", "local device count",
     "give every process the same number of devices (e.g. CUDA_VISIBLE_DEVICES / one task per GPU)"),
    ("devices", "global device count", "start every process with the same cluster settings"),
    ("workdir", "workdir", "pass the same --workdir to every host"),
)


def compare(mine: dict, everyone: list[dict]) -> str | None:
    """The first difference from process 0, as one line naming the host; None if all agree."""
    ref = everyone[0]
    for key, what, fix in CHECKS:
        for other in everyone[1:]:
            if other.get(key) != ref.get(key):
                return (f"pre-flight: process {other['process']} (host {other['host']}) has {what} "
                        f"{other.get(key)!r}, process 0 (host {ref['host']}) has {ref.get(key)!r}; {fix}.")
    return None


def _client():
    from jax._src import distributed
    return distributed.global_state.client


def run(config, workdir: str) -> None:
    """Phase 1b (no write): every host agrees on the run. Raises one-line ``ConfigError``."""
    if jax.process_count() == 1:
        return
    client = _client()
    if client is None:  # several processes without jax.distributed: nothing to talk through
        return
    mine = describe(config, workdir)
    client.key_value_set(f"fmjax/preflight/{mine['process']}", json.dumps(mine))
    everyone = [json.loads(client.blocking_key_value_get(f"fmjax/preflight/{p}", TIMEOUT_MS))
                for p in range(jax.process_count())]
    problem = compare(mine, everyone)
    if problem:
        raise ConfigError(problem)


def check_shared_workdir(workdir: str) -> None:
    """Phase 2b (after process 0 created the workdir): every host sees process 0's token."""
    if jax.process_count() == 1 or _client() is None:
        return
    client = _client()
    if jax.process_index() == 0:
        token = f".preflight-{uuid.uuid4().hex[:12]}"
        files.write_text(files.join(workdir, token), socket.gethostname())
        client.key_value_set("fmjax/preflight/token", token)
    token = client.blocking_key_value_get("fmjax/preflight/token", TIMEOUT_MS)
    seen = files.exists(files.join(workdir, token))
    client.key_value_set(f"fmjax/preflight/seen/{jax.process_index()}", "1" if seen else "0")
    verdicts = [client.blocking_key_value_get(f"fmjax/preflight/seen/{p}", TIMEOUT_MS)
                for p in range(jax.process_count())]
    if jax.process_index() == 0:
        files.remove(files.join(workdir, token))
    missing = [p for p, v in enumerate(verdicts) if v != "1"]
    if missing:
        hosts = json.loads(client.blocking_key_value_get(f"fmjax/preflight/{missing[0]}", TIMEOUT_MS))["host"]
        raise ConfigError(
            f"pre-flight: process {missing[0]} (host {hosts}) does not see the workdir {workdir} that process 0 "
            "wrote to; multi-host checkpoints need one directory every host reaches: use a shared "
            "filesystem or a bucket (gs://...) for --workdir.")
