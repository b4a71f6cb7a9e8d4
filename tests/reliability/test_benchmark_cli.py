"""``launch/benchmark.py`` through its real command line (issue 11, item 10).

Every objective runs (MAE, supervised, CLIP with hard negatives, DINO multi-crop,
text-conditional DiT diffusion) on a tiny model; the batch shapes come from
``config.data.pp_train`` on the first real example (bundled data prepared) or on a
synthetic one (an empty data dir). Bad input is one ``fmjax: error:`` line, exit 2.

The method runs are independent processes, so a module fixture starts them two at a time
(the compile dominates, and XLA compiles on one core); each test waits for its own.
"""
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from fmjax.testing import assert_one_line_error, run_cli

TINY_VIT = ("--config.model.width=32", "--config.model.depth=1", "--config.model.num_heads=2",
            "--config.model.mlp_dim=64")
RUN = ("--config.batch_size=8", "--steps=2", "--warmup=1")

# method: (config, tiny-model overrides, data ("real" | "synthetic"), flops source, batch shapes)
METHODS = {
    "mae": ("configs/mae.py", TINY_VIT + (
        "--config.model.decoder_width=32", "--config.model.decoder_depth=1",
        "--config.model.decoder_heads=2"), "synthetic", "analytic", {"image": [8, 32, 32, 3]}),
    "supervised": ("configs/supervised.py", TINY_VIT + ("--config.model.stem=patch",), "real",
                   "analytic", {"image": [8, 32, 32, 3], "label": [8]}),
    "clip": ("configs/clip.py", TINY_VIT + (
        "--config.model.text_width=32", "--config.model.text_depth=1",
        "--config.model.text_heads=2", "--config.model.text_mlp_dim=64",
        "--config.model.embed_dim=16"), "synthetic", "xla",
        {"image": [8, 32, 32, 3], "tokens": [8, 32], "neg_tokens": [8, 32], "neg_valid": [8]}),
    "dino": ("configs/dino.py", TINY_VIT + (
        "--config.objective.out_dim=64", "--config.objective.hidden_dim=32",
        "--config.objective.bottleneck_dim=16"), "real", "xla",
        {"global_crops": [8, 2, 32, 32, 3], "local_crops": [8, 4, 16, 16, 3]}),
    "moco": ("configs/moco.py", TINY_VIT + (
        "--config.objective.dim=16", "--config.objective.mlp_dim=32"), "real", "xla",
        {"global_crops": [8, 2, 32, 32, 3]}),
    "simclr": ("configs/simclr.py", TINY_VIT, "real", "xla", {"global_crops": [8, 2, 32, 32, 3]}),
    "diffusion": ("configs/diffusion.py:text", TINY_VIT + (
        "--config.objective.text.width=32", "--config.objective.text.depth=1",
        "--config.objective.text.num_heads=2", "--config.objective.text.mlp_dim=64"), "synthetic",
        "xla", {"image": [8, 32, 32, 3], "tokens": [8, 32]}),
}


def _env():
    """The test session's persistent compilation cache, so reruns compile quickly, and XLA's
    CPU backend at -O0: the compile dominates a tiny benchmark and takes half as long."""
    return dict(JAX_COMPILATION_CACHE_DIR=os.environ["FMJAX_TEST_JAX_CACHE"],
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")


@pytest.fixture(scope="module")
def method_runs(shapes_data_dir, tmp_path_factory):
    """{method: Future of (CompletedProcess, --out path)}: every method's benchmark, started
    two at a time; "synthetic" ones read an empty data dir and start at once, "real" ones
    the bundled data, prepared meanwhile (~10 s unless an earlier test did it)."""
    from fmjax.data import sources
    empty = str(tmp_path_factory.mktemp("no_data"))
    out_dir = tmp_path_factory.mktemp("bench_out")
    pool = ThreadPoolExecutor(max_workers=2)
    runs = {}

    def start(name, data_dir):
        config, tiny = METHODS[name][:2]
        out = str(out_dir / f"{name}.json")
        args = (f"--config={config}", f"--config.data.data_dir={data_dir}", f"--out={out}", *tiny, *RUN)
        runs[name] = pool.submit(lambda: (run_cli("benchmark", *args, timeout=300, env=_env()), out))

    for name in METHODS:
        if METHODS[name][2] == "synthetic":
            start(name, empty)
    sources.prepare_shapes(32, shapes_data_dir)
    for name in METHODS:
        if METHODS[name][2] == "real":
            start(name, shapes_data_dir)
    yield runs
    pool.shutdown(wait=True)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_benchmark_runs_every_objective(method, method_runs, shapes_data_dir):
    proc, out = method_runs[method].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    with open(out) as f:
        assert json.load(f) == result  # --out holds the printed result
    _, _, data, flops_source, shapes = METHODS[method]
    # The fields it always printed ...
    for key in ("config", "device", "devices", "global_batch", "dtype", "step_s", "compile_s",
                "items_per_s_per_chip", "model_tflops_per_chip", "measured_peak_tflops", "mfu",
                "xla_counted_tflops_per_chip", "loss"):
        assert key in result, key
    assert result["items_per_s_per_chip"] > 0 and result["global_batch"] == 8
    assert math.isfinite(result["loss"])
    assert result["model_tflops_per_chip"] > 0
    # ... and the new ones: where the FLOPs and the batch shapes came from.
    assert result["flops_source"] == flops_source
    assert {k: v["shape"] for k, v in result["batch_spec"].items()} == shapes
    assert result["batch_spec_from"] == ("fmjax_shapes/32:train[0]" if data == "real" else "synthetic")
    if data == "synthetic":
        assert "not available" in proc.stderr


# name: (args after --config, simulated devices, texts the error line must contain)
ERRORS = {
    "steps_zero": (("--steps=0",), 1, ("--steps", "at least 1", "got 0")),
    "steps_negative": (("--steps=-5",), 1, ("--steps", "got -5")),
    "warmup_negative": (("--warmup=-1",), 1, ("--warmup", "got -1")),
    "batch_not_divisible": (("--config.batch_size=3",), 2,
                            ("batch_size=3", "not divisible", "data-parallel size 2")),
    "unknown_objective": (("--config.objective.name=simclrr",), 1, ("Unknown objective 'simclrr'",)),
    "unknown_model": (("--config.model.name=resnett",), 1, ("Unknown model 'resnett'",)),
    "model_field_mismatch": (("--config.model.name=vit",), 1, ("config.model", "decoder_")),
    "out_folder_missing": (("--out={tmp}/missing/result.json",), 1, ("--out", "does not exist")),
    "out_is_folder": (("--out={tmp}",), 1, ("--out", "is a folder")),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_is_one_line(case, tmp_path):
    args, devices, texts = ERRORS[case]
    args = [a.format(tmp=tmp_path) for a in args]
    proc = run_cli("benchmark", "--config=configs/mae.py", *args, devices=devices, timeout=180)
    assert_one_line_error(proc, *texts)
    assert not proc.stdout.strip()  # nothing was benchmarked
