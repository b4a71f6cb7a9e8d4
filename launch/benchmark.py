"""Measure train-step throughput and MFU: ``python launch/benchmark.py --config=configs/mae.py:vit_b16_imagenet``.

Runs the real sharded train step (same state creation, shardings and jit as
``launch/train.py``) on synthetic device-resident batches, so the number is the
step's own speed, not the input pipeline's. Works for every objective (MAE,
supervised, CLIP, DINO, diffusion): the batch keys come from the objective and their
shapes / dtypes from ``config.data.pp_train`` applied to the first training example,
or to a synthetic example (a random uint8 image, label 0, a short caption) when the
dataset is not available here (e.g. ImageNet on a benchmarking machine).

Reports per-chip items/s, achieved model TFLOP/s and MFU against the *measured* peak
of a large bf16 (or f32) matmul on the same chip. Model FLOPs are analytic for
ViT / MAE (matmul FLOPs of the transformer, x3 for forward + backward;
``flops_source: "analytic"``); for other models they are XLA's count of the program
(``flops_source: "xla"``), which on GPU misses the cuBLAS / cuDNN custom calls.
Bad flags and configs are one line ``fmjax: error: ...`` and exit code 2, before compiling.
"""
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fmjax.errors import ConfigError  # noqa: E402  (no jax import)

config_flags.DEFINE_config_file("config", None, "Config file[:preset].", lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed steps (after warm-up); at least 1.")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation; 0 or more.")
flags.DEFINE_string("out", None, "Optional JSON file for the result (its folder must exist).")
flags.DEFINE_integer("peak_matmul_n", 0, "Size n of the n x n matmul that measures the peak "
                     "(0: 8192 on GPU / TPU, 1024 on CPU).")
FLAGS = flags.FLAGS

def measured_peak_tflops(dtype, n: int = 8192, reps: int = 10) -> float:
    """Dense matmul TFLOP/s per device: the practical peak that MFU is reported against."""
    from fmjax.train.observe import measured_peak_tflops as measure
    return measure(dtype, n, reps)


# -- Flags and config checks (before jax is imported: each failure is one line, exit 2). ----
def check_flags() -> None:
    if FLAGS.steps < 1:
        raise ConfigError(f"--steps must be at least 1 (the timed steps), got {FLAGS.steps}.")
    if FLAGS.warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more (untimed steps), got {FLAGS.warmup}.")
    if FLAGS.peak_matmul_n < 0:
        raise ConfigError(f"--peak_matmul_n must be 0 (auto) or positive, got {FLAGS.peak_matmul_n}.")
    if FLAGS.out:
        out = os.path.abspath(os.path.expanduser(FLAGS.out))
        if os.path.isdir(out):
            raise ConfigError(f"--out={FLAGS.out!r} is a folder; give a file path, e.g. {os.path.join(FLAGS.out, 'benchmark.json')}.")
        folder = os.path.dirname(out)
        if not os.path.isdir(folder):
            raise ConfigError(f"--out={FLAGS.out!r}: the folder {folder} does not exist; create it first.")
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"--out={FLAGS.out!r}: the folder {folder} is not writable.")


# -- Batch spec: from the real first example when the data is here, else a synthetic one. ---
def first_example(config):
    """(example, where it came from): the first training example when the dataset is
    available here (fmjax_shapes only if already prepared: the benchmark never prepares
    data), else ``synthetic_example``, with a warning naming the reason."""
    from fmjax.aot.spec import synthetic_example
    from fmjax.data import shapes, sources
    name, split = config.data.name, config.data.get("train_split", "train")
    data_dir = config.data.get("data_dir")
    try:
        sources.check_source(name, split, data_dir)
        shapes_config = sources._shapes_config(name)  # noqa: SLF001
        if shapes_config is not None and not shapes.FmjaxShapes(
                config=shapes_config, data_dir=sources.default_data_dir(data_dir),
                file_format="array_record").is_prepared():
            raise FileNotFoundError(f"{name} is not prepared in {sources.default_data_dir(data_dir)} "
                                    "(launch/train.py prepares it)")
        return sources.get_source(name, split, data_dir)[0], f"{name}:{split}[0]"
    except Exception as e:  # noqa: BLE001 - any unavailable dataset: benchmark on synthetic data
        reason = " ".join(str(e).split())[:300]
        print(f"fmjax: benchmark: dataset {name!r} not available ({reason}); shapes come from a "
              "synthetic example (image, label 0, caption).", file=sys.stderr, flush=True)
        return synthetic_example(config), "synthetic"


def batch_spec(config, objective, global_batch):
    """(spec {key: ShapeDtypeStruct of the global batch}, one transformed example, origin)."""
    from fmjax.aot import spec as spec_lib
    raw, origin = first_example(config)
    try:
        spec, example = spec_lib.batch_spec(config, objective, global_batch, example=raw)
    except ConfigError as e:
        if origin != "synthetic":
            raise
        raise ConfigError(f"{e} (the benchmark ran it on a synthetic example with keys "
                          f"{sorted(raw)}, as dataset {config.data.name!r} is not available here)") from None
    from fmjax.data.transforms import parse_pp
    from fmjax.train import validate
    check_pipeline = getattr(validate, "check_pipeline_matches", None)
    if check_pipeline is not None:  # overrides that pp_train does not see, as launch/train.py checks
        check_pipeline(config, parse_pp(config.data.pp_train, "config.data.pp_train"), spec)
    return spec, example, origin


def synthetic_batch(spec, example, mesh, seed: int = 0):
    """Device-resident global batch of ``spec``: floats N(0, 1); ints and bools the
    transformed example's values tiled over the batch (valid labels and token ids)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from fmjax.data import pipeline
    rng = np.random.default_rng(seed + jax.process_index())
    local = {}
    for k, s in spec.items():
        shape = (s.shape[0] // jax.process_count(),) + tuple(s.shape[1:])
        if jnp.issubdtype(s.dtype, jnp.floating):
            local[k] = rng.standard_normal(shape, dtype=np.float32).astype(s.dtype)
        else:
            local[k] = np.ascontiguousarray(np.broadcast_to(np.asarray(example[k], s.dtype), shape))
    return pipeline.global_batch(local, mesh)


def _finite_or_none(x):
    return x if not isinstance(x, float) or math.isfinite(x) else None


def run() -> dict:
    import jax
    import jax.numpy as jnp

    from fmjax.aot import flops as flops_lib
    from fmjax.parallel import mesh as mesh_lib
    from fmjax.train import optimizer as opt_lib, state as state_lib, step as step_lib
    from fmjax.train.setup import build

    config = FLAGS.config
    try:
        objective, mesh, rules = build(config)
    except TypeError as e:  # a model field the chosen model does not take
        raise ConfigError(f"config.model: {e}") from None
    from fmjax.aot.spec import check_without_data
    check_without_data(config, objective, mesh)
    bs = int(config.batch_size)
    spec, example, origin = batch_spec(config, objective, bs)
    try:
        tx, schedule = opt_lib.make_optimizer(config.optimizer, config.total_steps, bs)
        fn = step_lib.make_train_step(objective, tx, schedule, rules, config.get("grad_accum_steps", 1),
                                      config.get("nonfinite", "stop"),
                                      step_lib.per_example_clip_norm(config.optimizer))
    except ValueError as e:  # unknown optimizer / decay / policy names
        raise ConfigError(str(e)) from None
    state, shardings = state_lib.create_state(objective, tx, spec, mesh, rules, config.seed)
    batch_sh = mesh_lib.batch_sharding(mesh)
    batch = synthetic_batch(spec, example, mesh)
    jitted = step_lib.jit_train_step(fn, shardings, {k: batch_sh for k in spec})
    t0 = time.perf_counter()
    with state_lib.mesh_context(mesh):
        lowered = jitted.lower(state, spec)
        compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    n_dev = jax.device_count()
    # XLA's count of the program as written (before fusion / rematerialisation), divided over
    # the devices; the compiled module's own count can miss fused kernels.
    xla_flops = flops_lib.xla_flops(lowered) / n_dev or flops_lib.xla_flops(compiled)
    metrics = None
    for _ in range(FLAGS.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t) / FLAGS.steps

    platform = jax.devices()[0].platform
    peak_n = FLAGS.peak_matmul_n or (1024 if platform == "cpu" else 8192)
    peak = measured_peak_tflops(jnp.bfloat16 if config.get("dtype") == "bfloat16" else jnp.float32, peak_n)
    analytic = flops_lib.analytic_model(objective, spec)
    if analytic is not None:
        model_flops = flops_lib.analytic_train_flops_per_item(*analytic) * bs / n_dev
    else:
        model_flops = xla_flops
    model_tflops = model_flops / dt / 1e12
    result = dict(
        config=FLAGS["config"].config_filename, device=jax.devices()[0].device_kind, devices=n_dev,
        global_batch=bs, dtype=config.get("dtype", "float32"), step_s=dt, compile_s=compile_s,
        items_per_s_per_chip=bs / dt / n_dev, model_tflops_per_chip=model_tflops,
        measured_peak_tflops=peak, mfu=model_tflops / peak if peak and model_flops else float("nan"),
        xla_counted_tflops_per_chip=xla_flops / dt / 1e12,  # misses cuBLAS/cuDNN custom calls
        loss=float(metrics["loss"]),
        # New fields: where the model FLOPs and the batch shapes came from.
        flops_source="analytic" if analytic is not None else "xla",
        objective=config.objective.name, model=config.model.get("name"),
        batch_spec={k: dict(shape=list(s.shape), dtype=str(s.dtype)) for k, s in spec.items()},
        batch_spec_from=origin, steps=FLAGS.steps, warmup=FLAGS.warmup, peak_matmul_n=peak_n)
    result = {k: _finite_or_none(v) for k, v in result.items()}  # JSON has no NaN: null
    print(json.dumps(result, indent=1))
    if FLAGS.out:
        with open(os.path.abspath(os.path.expanduser(FLAGS.out)), "w") as f:
            json.dump(result, f, indent=1)
    return result


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:  # cheap flag checks first, before jax (and the error machinery) is imported
        check_flags()
    except ConfigError as e:
        from fmjax.cli import _fail
        _fail(str(e))
    from fmjax.train.errors import run_with_clean_errors
    from fmjax.train.observe import apply_xla_flags
    run_with_clean_errors(apply_xla_flags, FLAGS.config)  # the recipe's XLA flags, before the backend starts
    run_with_clean_errors(run)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    from fmjax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
