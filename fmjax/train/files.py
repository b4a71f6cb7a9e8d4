"""Workdir files on any filesystem: local paths, or a bucket (``gs://``, ``s3://``, any
``etils.epath`` backend) for runs on pods where hosts share no disk.

Everything the trainer writes into a workdir (``config.json``, ``metrics.jsonl``,
TensorBoard events, images, ``final_metrics.json``) and the checkpoints (Orbax, which
reads and writes ``gs://`` itself) go through these helpers. Local paths keep their
plain-file behaviour (atomic renames, appends, ``fsync``). A remote path has no appends and
no locks, so:

- ``AppendFile`` keeps the rows and rewrites the object at most every ``flush_secs`` (and at
  ``flush()``/``close()``); a kill loses at most those seconds of rows, which the resume
  logs again anyway;
- TensorBoard writes to a local staging folder that ``LocalStage.sync`` copies up;
- the workdir lock is skipped (a second job on the same bucket path is not detected).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

from etils import epath


def is_remote(path) -> bool:
    return "://" in str(path)


def resolve(path) -> str:
    """``~`` expanded and absolute for local paths; URLs as given (no trailing ``/``)."""
    path = str(path)
    if is_remote(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def join(*parts) -> str:
    return str(epath.Path(parts[0]).joinpath(*parts[1:])) if is_remote(parts[0]) else os.path.join(*parts)


def Path(path) -> epath.Path:  # noqa: N802 - a constructor
    return epath.Path(path)


def exists(path) -> bool:
    return epath.Path(path).exists()


def isdir(path) -> bool:
    return epath.Path(path).is_dir()


def makedirs(path) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def listdir(path) -> list[str]:
    return sorted(p.name for p in epath.Path(path).iterdir()) if isdir(path) else []


def read_text(path) -> str:
    return epath.Path(path).read_text()


def write_text(path, text: str) -> None:
    """Atomic on local disks (temporary file, fsync, rename); one object write on a bucket."""
    if is_remote(path):
        epath.Path(path).write_text(text)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes(path, data: bytes) -> None:
    if is_remote(path):
        epath.Path(path).write_bytes(data)
        return
    with open(path, "wb") as f:
        f.write(data)


def move(src, dst) -> None:
    if is_remote(src) or is_remote(dst):
        epath.Path(src).rename(dst)
    else:
        os.replace(src, dst)


def remove(path) -> None:
    try:
        epath.Path(path).unlink()
    except (FileNotFoundError, OSError):
        pass


class AppendFile:
    """A text file grown by appends: a real append locally, a buffered rewrite on a bucket."""

    def __init__(self, path: str, flush_secs: float = 30.0):
        self.path, self.flush_secs = path, flush_secs
        self.remote = is_remote(path)
        if self.remote:
            self._text = read_text(path) if exists(path) else ""
            self._dirty, self._last = False, time.monotonic()
        else:
            self._f = open(path, "a")

    def write(self, text: str) -> None:
        if not self.remote:
            self._f.write(text)
            self._f.flush()
            return
        self._text += text
        self._dirty = True
        if time.monotonic() - self._last >= self.flush_secs:
            self.flush()

    def flush(self) -> None:
        if self.remote and self._dirty:
            epath.Path(self.path).write_text(self._text)
            self._dirty, self._last = False, time.monotonic()

    def close(self) -> None:
        if self.remote:
            self.flush()
        else:
            self._f.close()


class LocalStage:
    """A local folder standing in for ``remote`` (for writers that need a local disk, e.g.
    TensorBoard's event files); ``sync()`` copies new and grown files up."""

    def __init__(self, remote: str, prefix: str = "fmjax_stage_"):
        self.remote = remote
        self.local = tempfile.mkdtemp(prefix=prefix)
        self._sizes: dict[str, int] = {}

    def sync(self) -> None:
        for dirpath, _, names in os.walk(self.local):
            for name in names:
                src = os.path.join(dirpath, name)
                rel = os.path.relpath(src, self.local)
                size = os.path.getsize(src)
                if self._sizes.get(rel) == size:
                    continue
                dst = epath.Path(self.remote) / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                with open(src, "rb") as f:
                    dst.write_bytes(f.read())
                self._sizes[rel] = size

    def close(self) -> None:
        self.sync()
        shutil.rmtree(self.local, ignore_errors=True)
