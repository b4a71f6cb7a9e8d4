"""Metric writing: ``DIR/metrics.jsonl``, TensorBoard events, and a progress line.

Only process 0 writes. Metric names are flat, e.g. ``train/loss``, ``eval/knn_top1``.
"""
from __future__ import annotations

import functools
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


WRITERS = ("jsonl", "tensorboard", "wandb")


def check_writers(writers) -> tuple:
    """``config.writers`` as a tuple; ValueError naming the fix for unknown names or a missing
    package. ``jsonl`` is always written (resume and evals read ``metrics.jsonl``)."""
    if isinstance(writers, str):
        writers = tuple(w.strip() for w in writers.split(",") if w.strip())
    writers = tuple(writers or ())
    unknown = [w for w in writers if w not in WRITERS]
    if unknown:
        raise ValueError(f"config.writers has unknown writer(s) {unknown}; valid: {list(WRITERS)}, "
                         "e.g. --config.writers=\"('jsonl', 'tensorboard', 'wandb')\".")
    if "wandb" in writers:
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise ValueError("config.writers includes 'wandb' but the wandb package is not installed: "
                             "pip install wandb (set WANDB_MODE=offline to log without an account), "
                             "or drop 'wandb' from config.writers.")
    return writers


def _summary_writer():
    """tensorboardX's ``SummaryWriter``, imported without torch. tensorboardX's writer module
    imports torch when it can, only to name ``torch.Tensor`` in type hints: 1.3 s and a few
    hundred MiB in every launch of a JAX program. A torch already imported is left alone."""
    import sys
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None   # ``import torch`` raises ImportError: the numpy fallback
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """``metrics.jsonl`` (always), TensorBoard events and Weights & Biases (``writers``) for a
    workdir, a bucket too (TensorBoard's events are staged locally and copied up every
    ``flush_secs`` and at ``close``; W&B keeps its local files in a temporary folder then).

    W&B: the run id is derived from the workdir, so a resume continues the same W&B run;
    ``WANDB_MODE=offline`` logs without an account (tests do); the project is
    ``config.wandb_project`` (default 'fmjax')."""

    def __init__(self, workdir: str, total_steps: int, enabled: bool | None = None, flush_secs: float = 30.0,
                 writers=("jsonl", "tensorboard"), run_config=None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.total_steps = total_steps
        self.workdir = workdir
        self.flush_secs = flush_secs
        self.writers = check_writers(writers)
        self._tb = self._stage = self._wandb = None
        if self.enabled:
            files.makedirs(workdir)
            self._jsonl = files.AppendFile(files.join(workdir, "metrics.jsonl"), flush_secs)
            self._synced = time.monotonic()
            if "tensorboard" in self.writers:
                if files.is_remote(workdir):
                    self._stage = files.LocalStage(workdir, prefix="fmjax_tb_")
                self._tb = _summary_writer()(logdir=self._stage.local if self._stage else workdir,
                                             flush_secs=flush_secs)
            if "wandb" in self.writers:
                self._wandb = _start_wandb(workdir, run_config)

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
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=int(step))
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
        if self._wandb is not None:
            import wandb
            self._wandb.log({f"images/{name}": wandb.Image(np.asarray(image, np.uint8))}, step=int(step))
        return path

    def close(self):
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
            if self._stage is not None:
                self._stage.close()
            if self._wandb is not None:
                self._wandb.finish()


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


def _start_wandb(workdir: str, run_config):
    import hashlib
    import tempfile
    import wandb
    cfg = run_config.to_dict() if hasattr(run_config, "to_dict") else dict(run_config or {})
    project = cfg.get("wandb_project") or "fmjax"
    local = tempfile.mkdtemp(prefix="fmjax_wandb_") if files.is_remote(workdir) else workdir
    run_id = "fmjax-" + hashlib.sha1(workdir.encode()).hexdigest()[:12]  # a resume continues the run
    return wandb.init(project=project, name=workdir.rstrip("/").rsplit("/", 1)[-1], id=run_id, resume="allow",
                      dir=local, config=json.loads(json.dumps(cfg, default=str)))


@functools.lru_cache(maxsize=1)
def _host_logger():
    """(a python logger under absl's handler, ``[process i/n host] ``): on a pod every host's
    lines carry absl's prefix (level, time, pid, file:line) and this one, so they can be filtered."""
    import logging
    import socket
    logger = logging.getLogger("fmjax")
    logger.setLevel(logging.INFO)
    return logger, f"[process {jax.process_index()}/{jax.process_count()} {socket.gethostname()}] "


def log(msg: str):
    """The progress output: stdout on one process; on several, every host logs the line through
    absl logging (stderr: level, time, pid, file:line) prefixed with its process and host name,
    so each pod worker's log has it once and the hosts' logs can be merged and filtered."""
    if jax.process_count() > 1:
        logger, prefix = _host_logger()
        logger.info(prefix + msg)
    elif jax.process_index() == 0:
        print(msg, flush=True, file=sys.stdout)
