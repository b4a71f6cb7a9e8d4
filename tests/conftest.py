"""Test-wide setup: 8 simulated CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, so it lives here.
"""
import gc
import os
import tempfile

# Extra XLA flags for the whole session, inherited by run_cli's launchers (fmjax.testing.cli_env).
# None by default. Tried: "--xla_backend_optimization_level=0" makes compile-bound files ~30%
# faster (tests/models/test_{swin,unet}.py cold: 139 s -> 99 s) but training runs up to 30%
# slower (the MAE learning gate 100 s -> 132 s); a cold full suite with it had run 22% of its
# tests after 49 minutes, where one without had run 67% after 68.
_XLA_EXTRA = os.environ.setdefault("FMJAX_TEST_XLA_EXTRA", "")
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {_XLA_EXTRA}".strip())
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # inherited by run_cli
_CACHE = os.environ.setdefault(
      "FMJAX_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "fmjax_jax_cache"))

import jax  # noqa: E402
import pytest  # noqa: E402

# Python's cyclic GC with its default thresholds (700, 10, 10) runs a full collection of a
# worker's whole heap every ~70,000 net allocations; tracing and lowering allocate millions of
# short-lived objects, so the suite spent 5-7% of its time in the collector. Measured 2026-12-06,
# `-n 2 -m "not slow" tests/models` alone on the 2-core CPU: 128.9 s default, 120.0 s with
# these thresholds, 119.3 s with the collector off (not worth the memory risk); two hours later,
# on a slower moment of the same machine, 163.5 s default vs 155.1 s with these thresholds.
gc.set_threshold(50_000, 20, 100)

from fmjax.testing import load_config, one_torch_thread  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _CACHE)
# Every compilation is cached, not only those over jax's 1 s default: most of the suite's
# compile time is thousands of small jits (measured on tests/models/test_{vit,swin}.py, warm
# cache: 90 s with a 0.5 s floor, 37 s with none; cold: 106 s vs 113 s).
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _generator_fingerprint():
    """A hash of the code that writes the bundled dataset: a changed generator prepares afresh."""
    import hashlib
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for rel in ("fmjax/data/shapes.py", "fmjax/data/sources.py"):
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def shapes_data_dir():
    """One prepared copy of the bundled dataset shared by every test, by both xdist workers and
    by later runs on the host (prepare_shapes takes a file lock, so the first user prepares it
    and the others wait); keyed by the generator's code. Tests only read it. Set
    FMJAX_TEST_DATA_DIR to choose the folder."""
    path = os.environ.get("FMJAX_TEST_DATA_DIR") or os.path.join(
        tempfile.gettempdir(), "fmjax_test_tfds", _generator_fingerprint())
    os.makedirs(path, exist_ok=True)
    return path


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




@pytest.fixture
def tiny_config(shapes_data_dir):
    """Factory: a config of ``configs/<name>.py`` shrunk to a few seconds of CPU training."""
    def make(name: str = "mae", **overrides):
        c = load_config(name)
        c.data.data_dir = shapes_data_dir
        c.total_steps, c.batch_size = 4, 16
        c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 2
        c.eval_at_start = False
        c.optimizer.warmup_steps = 2
        if name == "diffusion":  # a tiny U-Net (the default preset's DiT runs in test_learning)
            c.model = dict(name="unet", channels=8, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(16,), num_groups=4, dropout=0.1,
                           num_classes=c.model.num_classes, sample_size=32)
            c.objective.sample.update(dict(num_steps=2))
        elif name == "blip":  # the image tower is a sub-config
            c.model.image.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
            c.model.update(dict(text_width=32, text_depth=1, text_heads=2, text_mlp_dim=64,
                                embed_dim=16))
            c.objective.queue_size = 2 * c.batch_size
        elif name == "flamingo":  # vision tower and LM are sub-configs; 4 sequences of 5
            c.model.vision.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
            c.model.lm.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
            c.model.update(dict(xattn_heads=2, xattn_dim_head=16, resampler_depth=1,
                                resampler_heads=2, resampler_dim_head=16, num_latents=4))
            c.batch_size, c.objective.shots_per_sequence, c.objective.seq_length = 20, 5, 80
        elif name == "owl":  # the detector's CLIP is a sub-config
            c.model.clip.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64, text_width=32, text_depth=1,
                                     text_heads=2, text_mlp_dim=64, embed_dim=32))
        else:
            c.model.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
        if name == "mae":
            c.model.update(dict(decoder_width=32, decoder_depth=1, decoder_heads=2))
        if name == "clip":
            c.model.update(dict(text_width=32, text_depth=1, text_heads=2, text_mlp_dim=64,
                                embed_dim=16))
        if name == "dino":
            c.objective.update(dict(out_dim=64, hidden_dim=32, bottleneck_dim=16,
                                    freeze_last_layer_steps=1, warmup_teacher_temp_steps=3))
        c.evals = {}
        for k, v in overrides.items():
            target = c
            *path, last = k.split(".")
            for p in path:
                target = target[p]
            target[last] = v
        return c
    return make


@pytest.fixture
def default_config(shapes_data_dir):
    """Factory: ``configs/<name>.py`` as shipped, reading the session's prepared data."""
    def make(name: str, preset: str = "default"):
        c = load_config(name, preset)
        c.data.data_dir = shapes_data_dir
        return c
    return make


# Fast compiles. Most of the suite's time is XLA compiling thousands of small programs that
# then run a step or two; jax's ``jax_disable_most_optimizations`` (XLA backend optimization
# level 0, no expensive LLVM passes) compiles them faster. Tests marked ``optimized`` keep the
# real pipeline: the training-bound learning gates (hundreds of steps, up to 30% slower without
# optimization) and tests that inspect compiled programs (memory analysis, collectives in the
# HLO, TPU AOT). Slow tests that are compile-bound (a few steps through launchers, notebooks,
# drills) compile fast too: two of the notebooks 132 s -> 116 s. The setting is per test (an
# autouse fixture) and reaches run_cli's launchers through the environment.
# FMJAX_TEST_FAST_COMPILE=0 turns it off.
_FAST_COMPILE = os.environ.get("FMJAX_TEST_FAST_COMPILE", "1") == "1"


@pytest.fixture(autouse=True)
def _compile_effort(request, monkeypatch):
    node = request.node
    if not _FAST_COMPILE or node.get_closest_marker("optimized"):
        yield
        return
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", False)


# One torch thread per test. Two xdist workers share two cores; torch's OpenMP workers spin
# while they wait, so a reference transcription with torch's default 2 threads beside a busy
# worker ran ~11x slower (CI: the BLIP and Flamingo trajectory tests 126 s each, 11 s and 9 s
# alone). Only where the test module imported torch; its outputs do not depend on the count.
@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def pytest_collection_modifyitems(session, config, items):
    """Run the test files longest first, so two xdist workers finish together.

    ``--dist loadfile`` hands out whole files; with xdist's default order (most tests first)
    the few-test files that train for minutes (tests/train/test_learning.py, the kill drills)
    came last and one worker ran them alone. pytest.ini turns that reorder off and this
    orders files by an estimate of their cost: a slow-marked test counts as 90 s (they take
    45-170 s), any other as 1.5 s (the suite's mean). Order inside a file is kept; files of
    equal estimate keep their collection order. Every worker computes the same order.
    """
    cost, first = {}, {}
    for i, item in enumerate(items):
        f = item.nodeid.split("::", 1)[0]
        first.setdefault(f, i)
        cost[f] = cost.get(f, 0.0) + (90.0 if item.get_closest_marker("slow") else 1.5)
    items.sort(key=lambda it: (-cost[it.nodeid.split("::", 1)[0]],
                               first[it.nodeid.split("::", 1)[0]]))


# Where a run's time went, printed at its end: each xdist worker's busy seconds (the sum of its
# tests' setup, call and teardown) and the number of tests it ran. Two workers far apart mean
# the file order above left one worker alone at the end.
# The same per test file (the 25 costliest): --durations lists single tests, and a file of many
# quick tests (each compiling its own programs) can cost more than one slow test.
_BUSY: dict = {}
_FILES: dict = {}


def pytest_runtest_logreport(report):
    node = getattr(report, "node", None)  # set on the reports an xdist controller receives
    worker = getattr(getattr(node, "gateway", None), "id", None) or "main"
    busy, count = _BUSY.get(worker, (0.0, 0))
    _BUSY[worker] = (busy + report.duration, count + (report.when == "call"))
    f = report.nodeid.split("::", 1)[0]
    busy, count = _FILES.get(f, (0.0, 0))
    _FILES[f] = (busy + report.duration, count + (report.when == "call"))


def pytest_terminal_summary(terminalreporter):
    if _BUSY:
        terminalreporter.write_line("busy seconds per worker: " + ", ".join(
            f"{w} {b:.0f} s / {n} tests" for w, (b, n) in sorted(_BUSY.items())))
    if len(_FILES) > 1:
        top = sorted(_FILES.items(), key=lambda kv: -kv[1][0])[:25]
        terminalreporter.write_line("busy seconds per file: " + ", ".join(
            f"{f.removeprefix('tests/')} {b:.0f} s / {n}" for f, (b, n) in top))
