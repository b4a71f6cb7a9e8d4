"""What a training run reports about its own speed: model TFLOP/s and MFU per chip, the split
of step time into data wait and compute, and ``jax.profiler`` traces on request.

MFU is model FLOPs per step (``fmjax.aot.flops.model_flops_per_chip``: analytic where the
objective has a count, else XLA's count of the step as written) times steps/s, over the
chip's peak. The peak comes from ``config.peak_tflops`` when set, else the datasheet table
below (dense bf16 per chip, the convention MFU is quoted in), else (the CPU, an unknown chip)
a dense matmul measured once at start-up, in which case the log says ``measured``.

``config.profile = (start_step, num_steps)`` writes a trace of those steps to
``DIR/profile/`` (TensorBoard's profile plugin reads it; ``(0, 0)``: off).
"""
from __future__ import annotations

import time

import jax

from fmjax.aot import chips as chips_lib
from fmjax.train import files

# Dense bf16 peak TFLOP/s per chip (vendor datasheets, without sparsity), keyed by a
# substring of jax's ``device_kind``.
GPU_PEAK_BF16_TFLOPS = {
    "H200": 989.0,   # NVIDIA H200 SXM
    "H100": 989.0,   # NVIDIA H100 SXM5 (PCIe: 756)
    "A100": 312.0,
    "L4": 121.0,
    "A10G": 70.0,
    "V100": 125.0,   # fp16 tensor cores
}


def table_peak_tflops(device) -> float | None:
    """The datasheet peak of ``device`` (bf16 dense, per chip), or None when not in the table."""
    kind = getattr(device, "device_kind", "") or ""
    if device.platform == "tpu":
        for chip in chips_lib.CHIPS.values():
            if kind == chip.device_kind:
                return chip.peak_bf16_tflops
        return None
    if device.platform == "gpu":
        for name, peak in GPU_PEAK_BF16_TFLOPS.items():
            if name in kind:
                return peak
    return None


def measured_peak_tflops(dtype="float32", n: int = 512, reps: int = 10, trials: int = 5) -> float:
    """Dense ``n x n`` matmul TFLOP/s on the default device (the practical peak): the fastest of
    ``trials`` timings of ``reps`` matmuls. One timing (the former measure, ~15 ms on the 2-core
    CPU at n = 512) read 0.157-0.246 TFLOP/s in nine launches of 2026-12-07, so a run's MFU
    moved by 1.5x with nothing else changed; the best of 5 is what the chip can do when
    nothing competes with it (the training pipeline's threads start at the same moment)."""
    import jax.numpy as jnp
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(max(1, int(trials))):
        t = time.perf_counter()
        for _ in range(reps):
            out = f(a)
        out.block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * reps / best / 1e12


def peak_tflops(config, device=None) -> tuple[float, str]:
    """(peak TFLOP/s per chip, where it came from: 'config' | 'datasheet' | 'measured')."""
    override = float(config.get("peak_tflops", 0) or 0)
    if override > 0:
        return override, "config"
    device = device or jax.devices()[0]
    table = table_peak_tflops(device)
    if table:
        return table, "datasheet"
    return measured_peak_tflops("bfloat16" if config.get("dtype") == "bfloat16" else "float32"), "measured"


class StepClock:
    """Splits wall time between log points into data wait (the host fetching and assembling
    the next batch) and compute (everything else: dispatch, and waiting on the device when
    the host gets ahead); with ``flops_per_step`` (per chip) and ``peak`` (TFLOP/s per chip)
    it also gives model TFLOP/s and MFU."""

    def __init__(self, flops_per_step: float = 0.0, peak: float = 0.0):
        self.flops_per_step, self.peak = float(flops_per_step or 0.0), float(peak or 0.0)
        self._data = 0.0
        self._t0 = None

    def data_start(self):
        self._t0 = time.perf_counter()

    def data_end(self):
        if self._t0 is not None:
            self._data += time.perf_counter() - self._t0
            self._t0 = None

    def metrics(self, steps: int, seconds: float) -> dict:
        """Per-step averages over the last ``steps`` steps (``seconds`` of wall time); resets."""
        data, self._data = self._data, 0.0
        if steps <= 0 or seconds <= 0:
            return {}
        out = {"train/data_wait_s": data / steps, "train/compute_s": max(seconds - data, 0.0) / steps,
               "train/data_wait_frac": min(data / seconds, 1.0)}
        if self.flops_per_step > 0:
            tflops = self.flops_per_step * steps / seconds / 1e12
            out["train/model_tflops_per_chip"] = tflops
            if self.peak > 0:
                out["train/mfu"] = tflops / self.peak
        return out


def check_profile(config) -> tuple[int, int]:
    """``config.profile`` as (start step, number of steps); ValueError on a bad value."""
    value = config.get("profile", None)
    if value in (None, "", 0):
        return 0, 0
    try:
        start, num = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"config.profile must be (start_step, num_steps), got {value!r}; e.g. "
                         "--config.profile='(10, 5)' traces steps 11-15.") from None
    if start < 0 or num < 0:
        raise ValueError(f"config.profile must be non-negative (start_step, num_steps), got {value!r}.")
    return start, num


class Profiler:
    """Traces steps ``start+1 .. start+num`` (``config.profile``) into ``DIR/profile``."""

    def __init__(self, config, workdir: str):
        self.start, self.num = check_profile(config)
        self.dir = files.join(workdir, "profile")  # jax.profiler writes gs:// itself
        self.active = False

    def before_step(self, step: int):
        """Called with the number of steps done, before running the next one."""
        if self.num and step == self.start and not self.active:
            jax.profiler.start_trace(self.dir)
            self.active = True

    def after_step(self, step: int, outputs=None):
        if self.active and step >= self.start + self.num:
            self.stop(outputs)

    def stop(self, outputs=None):
        if self.active:
            if outputs is not None:
                jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False


def apply_xla_flags(config) -> str:
    """Adds ``config.xla_flags`` (a recipe's own XLA flags, e.g. the diffusion ``cpu`` preset's
    YNNPACK reduce fusion, 1.8x faster U-Net steps on a CPU) to ``XLA_FLAGS`` for the backend
    this process is about to start; returns the flags added. A flag whose name ``XLA_FLAGS``
    already sets is left to the environment (the user's choice wins). Once the XLA backend runs
    in this process (e.g. a test calling the loop in-process) they cannot take effect any more:
    a warning says so and nothing changes. A malformed value is a ConfigError."""
    import os
    import sys
    from fmjax.errors import ConfigError
    flags = str(config.get("xla_flags", "") or "").split()
    if not flags:
        return ""
    bad = [f for f in flags if not (f.startswith("--xla_") and "=" in f)]
    if bad:
        raise ConfigError(f"config.xla_flags: {bad} are not XLA flags; write each as --xla_NAME=VALUE, "
                          "separated by spaces.")
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        print(f"fmjax: warning: config.xla_flags {' '.join(flags)} not applied: the XLA backend "
              "already runs in this process (set XLA_FLAGS before it starts).", file=sys.stderr, flush=True)
        return ""
    current = os.environ.get("XLA_FLAGS", "")
    have = {f.split("=")[0] for f in current.split()}
    added = [f for f in flags if f.split("=")[0] not in have]
    if added:
        os.environ["XLA_FLAGS"] = " ".join(current.split() + added)
    return " ".join(added)


def enable_compile_cache(config) -> str:
    """Turns on jax's persistent compilation cache at ``config.compile_cache_dir`` (``~``
    expanded; a ``gs://`` path works through etils.epath); returns the directory, '' if off.

    A cache directory already set (``JAX_COMPILATION_CACHE_DIR``, or by the caller) wins.
    A re-run of the same config then loads its step from the cache instead of compiling.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = str(config.get("compile_cache_dir", "") or "")
    if not path:
        return ""
    path = files.resolve(path)
    jax.config.update("jax_compilation_cache_dir", path)  # entries: compiles over 1 s (jax's default)
    return path
