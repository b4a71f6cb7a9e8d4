"""The workdir's own files: its path, its lock, and ``config.json`` (written last, atomically).

A workdir holds one run. ``WorkdirLock`` keeps a second run off it (an ``flock`` on
``DIR/.lock``, released by the kernel when the process dies, even by kill -9; the file says
which PID and host hold it). ``write_config`` replaces ``config.json`` atomically and keeps
the config it replaces in ``DIR/config_history/``, so the config that trained a checkpoint
is never lost.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

from fmjax.errors import WorkdirBusyError


def resolve(workdir: str) -> str:
    """``~`` expanded, absolute (``--workdir=~/x`` is ``$HOME/x``, not ``./~/x``)."""
    return os.path.abspath(os.path.expanduser(str(workdir)))


class WorkdirLock:
    """An exclusive lock on ``DIR/.lock``; a held lock is a one-line ``WorkdirBusyError``."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, ".lock")
        self.enabled = enabled
        self._fd = None

    def __enter__(self):
        if not self.enabled:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            finally:
                os.close(fd)
            raise WorkdirBusyError(
                f"workdir {os.path.dirname(self.path)} is in use by another run ({holder}); wait for it "
                "to finish or stop it, or pass another --workdir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()} on host {socket.gethostname()} since "
                       f"{datetime.datetime.now().isoformat(timespec='seconds')}\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


def write_config(workdir: str, config, step: int) -> None:
    """Writes ``DIR/config.json`` atomically (temporary file, then rename). A different
    existing config (e.g. a resume with more steps) moves to
    ``DIR/config_history/config_step<step>_<time>.json`` first."""
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2, sort_keys=True) if hasattr(config, "to_json_best_effort") \
        else json.dumps(config, indent=2, sort_keys=True)
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old == text:
            return
        hist = os.path.join(workdir, "config_history")
        os.makedirs(hist, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
        with open(os.path.join(hist, f"config_step{step}_{stamp}.json"), "w") as f:
            f.write(old)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
