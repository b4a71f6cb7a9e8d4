"""Train a model: ``python launch/train.py --config=configs/mae.py[:preset] --workdir=DIR``.

Override any config key with ``--config.KEY=VALUE`` (e.g. ``--config.total_steps=100``).
Re-running the same command with the same ``--workdir`` resumes from its latest checkpoint.
Bad input ends with one line on stderr naming the problem and the fix, and exit code 2.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mae.py[:preset].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl, TensorBoard events and images go "
                    "(default: workdirs/<config name>).")
flags.DEFINE_bool("check_only", False, "Run every config check (config, data, pipeline, optimizer, "
                  "sharding, workdir), print a summary and exit without writing or compiling.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax / tfds INFO lines would drown the progress line
    from fmjax.train.errors import run_with_clean_errors
    config = FLAGS.config
    from fmjax.train.observe import apply_xla_flags, enable_compile_cache
    added = run_with_clean_errors(apply_xla_flags, config)  # before anything starts the XLA backend
    if added:
        print(f"== XLA flags from config.xla_flags: {added}", flush=True)
    from fmjax.parallel.mesh import maybe_initialize_distributed
    maybe_initialize_distributed()
    from fmjax.train.loop import train_and_evaluate
    enable_compile_cache(config)  # re-runs and resumes load the compiled step
    from fmjax.cli import config_path
    workdir = FLAGS.workdir or os.path.join(
        "workdirs", os.path.splitext(os.path.basename(config_path(FLAGS["config"].config_filename)))[0])
    run_with_clean_errors(train_and_evaluate, config, workdir, check_only=FLAGS.check_only)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    from fmjax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
