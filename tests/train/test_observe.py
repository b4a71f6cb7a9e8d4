"""What a run reports about its speed: data wait vs compute, model TFLOP/s and MFU (every core
objective), ``config.profile`` traces, the peak table and the compile-cache switch."""
import glob
import json
import os
import types

import jax
import pytest

from fmjax.errors import ConfigError
from fmjax.train import observe
from fmjax.train.loop import train_and_evaluate


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("name", ["mae", "clip", "dino", "diffusion"])
def test_mfu_and_data_wait_logged(tiny_config, tmp_path, name, capsys):
    config = tiny_config(name, total_steps=3, checkpoint_every=100)
    train_and_evaluate(config, str(tmp_path / "wd"))
    rows = [r for r in _rows(str(tmp_path / "wd")) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows[1:]:
        assert r["train/model_tflops_per_chip"] > 0 and 0 < r["train/mfu"] < 5, r
        assert r["train/data_wait_s"] >= 0 and r["train/compute_s"] > 0, r
        assert 0 <= r["train/data_wait_frac"] <= 1
    out = capsys.readouterr().out
    assert "GFLOP per step per chip" in out and " MFU " in out and " data " in out, out[-2000:]


def test_profile_writes_a_trace(tiny_config, tmp_path):
    config = tiny_config("mae", total_steps=4, profile=(1, 2))
    train_and_evaluate(config, str(tmp_path / "wd"))
    traces = glob.glob(str(tmp_path / "wd" / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_no_profile_no_trace(tiny_config, tmp_path):
    train_and_evaluate(tiny_config("mae", total_steps=2), str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd" / "profile")


@pytest.mark.parametrize("value", [(1,), ("a", 2), (-1, 2)])
def test_bad_profile_is_one_line(tiny_config, tmp_path, value):
    config = tiny_config("mae")
    config.profile = value
    with pytest.raises(ConfigError, match="config.profile must be"):
        train_and_evaluate(config, str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd")


def test_peak_sources(tiny_config):
    config = tiny_config("mae")
    assert observe.peak_tflops(config) [1] == "measured"  # the CPU has no datasheet entry
    config.peak_tflops = 123.0
    assert observe.peak_tflops(config) == (123.0, "config")
    h200 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")
    v5e = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")
    assert observe.table_peak_tflops(h200) == 989.0 and observe.table_peak_tflops(v5e) == 197.0
    assert observe.table_peak_tflops(types.SimpleNamespace(platform="gpu", device_kind="Mystery")) is None


def test_step_clock_split():
    clock = observe.StepClock(flops_per_step=2e12, peak=4.0)
    clock._data = 1.0  # 1 s of data wait over 4 steps in 4 s
    m = clock.metrics(4, 4.0)
    assert m["train/data_wait_s"] == 0.25 and m["train/compute_s"] == 0.75
    assert m["train/model_tflops_per_chip"] == 2.0 and m["train/mfu"] == 0.5
    assert clock.metrics(1, 1.0)["train/data_wait_s"] == 0.0  # reset after reading


def test_compile_cache_respects_an_existing_dir(tiny_config):
    config = tiny_config("mae")
    current = jax.config.jax_compilation_cache_dir
    assert current  # tests/conftest.py's cache
    config.compile_cache_dir = "/somewhere/else"
    assert observe.enable_compile_cache(config) == current


def test_launcher_turns_the_compile_cache_on(shapes_data_dir, tmp_path):
    from fmjax import testing
    cache = tmp_path / "cache"
    args = ["--config=configs/mae.py", f"--workdir={tmp_path / 'wd'}", f"--config.data.data_dir={shapes_data_dir}",
            "--config.total_steps=2", "--config.batch_size=8", "--config.eval_every=0",
            "--config.eval_at_start=False", "--config.model.width=32", "--config.model.depth=1",
            "--config.model.num_heads=2", "--config.model.mlp_dim=64", "--config.model.decoder_width=32",
            "--config.model.decoder_depth=1", "--config.model.decoder_heads=2",
            f"--config.compile_cache_dir={cache}"]
    proc = testing.run_cli("train", *args, env={"JAX_COMPILATION_CACHE_DIR": "", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any("step_fn" in f for f in os.listdir(cache)), os.listdir(cache)


def test_xla_flags_join_the_environment_before_the_backend(monkeypatch, capsys):
    """config.xla_flags: appended to XLA_FLAGS when no backend runs yet, a flag the environment
    already names is left to it, malformed values are one ConfigError, and once the backend runs
    (as here, in-process) a warning says the flags were not applied."""
    from jax._src import xla_bridge
    cfg = types.SimpleNamespace(get=lambda k, d=None: {"xla_flags": flags}.get(k, d))
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_cpu_enable_fast_math=false")
    flags = "--xla_cpu_experimental_ynn_fusion_type=reduce  --xla_cpu_enable_fast_math=true"
    assert observe.apply_xla_flags(cfg) == "--xla_cpu_experimental_ynn_fusion_type=reduce"
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 --xla_cpu_enable_fast_math=false "
                                       "--xla_cpu_experimental_ynn_fusion_type=reduce")
    flags = ""
    assert observe.apply_xla_flags(cfg) == ""
    for flags in ("xla_cpu_enable_fast_math=true", "--xla_cpu_enable_fast_math", "-O3"):
        with pytest.raises(ConfigError, match="are not XLA flags; write each as --xla_NAME=VALUE"):
            observe.apply_xla_flags(cfg)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    flags = "--xla_cpu_enable_fast_math=true"
    before = os.environ["XLA_FLAGS"]
    assert observe.apply_xla_flags(cfg) == "" and os.environ["XLA_FLAGS"] == before
    assert "not applied: the XLA backend already runs" in capsys.readouterr().err
