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
from fmjax.train import files


def resolve(workdir: str) -> str:
    """``~`` expanded, absolute (``--workdir=~/x`` is ``$HOME/x``, not ``./~/x``); a bucket
    URL (``gs://b/wd``) as given."""
    return files.resolve(workdir)


class WorkdirLock:
    """An exclusive lock on ``DIR/.lock``; a held lock is a one-line ``WorkdirBusyError``."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, ".lock")
        self.enabled = enabled and not files.is_remote(workdir)  # a bucket has no locks
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
    path = files.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2, sort_keys=True) if hasattr(config, "to_json_best_effort") \
        else json.dumps(config, indent=2, sort_keys=True)
    if files.exists(path):
        old = files.read_text(path)
        if old == text:
            return
        hist = files.join(workdir, "config_history")
        files.makedirs(hist)
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
        files.write_text(files.join(hist, f"config_step{step}_{stamp}.json"), old)
    files.write_text(path, text)
