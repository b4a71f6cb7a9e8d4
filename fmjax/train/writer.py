"""Metric writing: ``DIR/metrics.jsonl``, TensorBoard events, and a progress line.

Only process 0 writes. Metric names are flat, e.g. ``train/loss``, ``eval/knn_top1``.
"""
from __future__ import annotations

import json
import math
import sys
import time

import jax
import numpy as np

from fmjax.train import files


def truncate_metrics(workdir: str, after_step: int) -> int:
    """Drops the rows of ``DIR/metrics.jsonl`` logged after ``after_step`` (a resume from that
    step logs them again), moving them to ``metrics_discarded.jsonl``; returns how many.

    Rows that are not valid JSON (a line cut by a kill) are dropped the same way.
    """
    path = files.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not files.exists(path):
        return 0
    keep, drop = [], []
    for line in files.read_text(path).splitlines(True):
        if not line.strip():
            continue
        try:
            ok = int(json.loads(line)["step"]) <= after_step
        except (ValueError, KeyError, TypeError):
            ok = False
        (keep if ok else drop).append(line if line.endswith("\n") else line + "\n")
    if drop:
        discarded = files.AppendFile(files.join(workdir, "metrics_discarded.jsonl"))
        discarded.write("".join(drop))
        discarded.close()
        files.write_text(path, "".join(keep))
    return len(drop)


class MetricWriter:
    """``metrics.jsonl`` and TensorBoard events in the workdir (a bucket too: the events are
    staged locally and copied up every ``flush_secs`` and at ``close``)."""

    def __init__(self, workdir: str, total_steps: int, enabled: bool | None = None, flush_secs: float = 30.0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.total_steps = total_steps
        self.workdir = workdir
        self.flush_secs = flush_secs
        self._tb = self._stage = None
        if self.enabled:
            files.makedirs(workdir)
            self._jsonl = files.AppendFile(files.join(workdir, "metrics.jsonl"), flush_secs)
            if files.is_remote(workdir):
                self._stage = files.LocalStage(workdir, prefix="fmjax_tb_")
            self._synced = time.monotonic()
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(logdir=self._stage.local if self._stage else workdir,
                                         flush_secs=flush_secs)
            except ImportError:  # pragma: no cover - tensorboardX is a hard dependency
                self._tb = None

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = np.asarray(v)
            if v.size == 1:
                v = float(v)
                row[k] = v if math.isfinite(v) else None  # NaN / inf: JSON null (NaN is not JSON)
        self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(k, v, int(step))
        self._maybe_sync()

    def _maybe_sync(self, force: bool = False):
        if self._stage is not None and (force or time.monotonic() - self._synced >= self.flush_secs):
            if self._tb is not None:
                self._tb.flush()
            self._stage.sync()
            self._synced = time.monotonic()

    def flush(self):
        """Everything written so far reaches the workdir (called before each checkpoint)."""
        if self.enabled:
            self._jsonl.flush()
            self._maybe_sync(force=True)

    def write_image(self, step: int, name: str, image: np.ndarray):
        """Writes ``DIR/images/<name>_<step>.png`` and a TensorBoard image."""
        if not self.enabled:
            return None
        import io
        from PIL import Image
        folder = files.join(self.workdir, "images")
        path = files.join(folder, f"{name}_{int(step):07d}.png")
        files.makedirs(folder)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
        files.write_bytes(path, buf.getvalue())
        if self._tb is not None:
            self._tb.add_image(name, np.asarray(image, np.uint8), int(step), dataformats="HWC")
        return path

    def close(self):
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
            if self._stage is not None:
                self._stage.close()


class Progress:
    """Measures steps/s and items/s between log points and prints a one-line status."""

    def __init__(self, total_steps: int, global_batch: int, start_step: int, clock=None):
        self.total_steps, self.global_batch = total_steps, global_batch
        self._t, self._step = time.perf_counter(), start_step
        self.clock = clock  # fmjax.train.observe.StepClock: data wait / compute, TFLOP/s, MFU

    def rates(self, step: int) -> dict:
        now = time.perf_counter()
        dt, ds = now - self._t, step - self._step
        self._t, self._step = now, step
        sps = ds / dt if dt > 0 and ds > 0 else 0.0
        out = {"train/steps_per_s": sps, "train/items_per_s": sps * self.global_batch}
        if self.clock is not None:
            out.update(self.clock.metrics(ds, dt))
        return out

    def line(self, step: int, metrics: dict) -> str:
        sps = metrics.get("train/steps_per_s", 0.0)
        eta = (self.total_steps - step) / sps if sps > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        extra = ""
        if "train/data_wait_frac" in metrics:
            extra += f" data {metrics['train/data_wait_frac']:.0%}"
        if "train/mfu" in metrics:
            extra += f" MFU {metrics['train/mfu']:.1%}"
        return (f"[step {step}/{self.total_steps}] loss {metrics.get('train/loss', float('nan')):.4f} "
                f"lr {metrics.get('train/lr', 0.0):.2e} {sps:.2f} steps/s "
                f"{metrics.get('train/items_per_s', 0.0):.1f} items/s{extra} ETA {eta_s}")


def log(msg: str):
    if jax.process_index() == 0:
        print(msg, flush=True, file=sys.stdout)
