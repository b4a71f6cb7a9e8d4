"""Evaluate a trained checkpoint: ``python launch/eval.py --workdir=DIR [--step=N] [--evals=a,b]``.

Uses the config saved in ``DIR/config.json`` (override keys with ``--config.KEY=VALUE`` by
passing ``--config=configs/<name>.py`` instead) and runs its ``config.evals`` (e.g. zero-shot,
retrieval, kNN, linear probe) on the latest checkpoint; results are appended to
``DIR/metrics.jsonl`` and printed.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Optional config file (default: DIR/config.json).",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "A workdir written by launch/train.py.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_list("evals", None, "Names in config.evals to run (default: all).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from fmjax.parallel.mesh import maybe_initialize_distributed
    maybe_initialize_distributed()
    from fmjax.train.errors import run_with_clean_errors
    from fmjax.train.eval_only import evaluate_checkpoint
    run_with_clean_errors(evaluate_checkpoint, FLAGS.workdir, FLAGS.config, FLAGS.step, FLAGS.evals)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    from fmjax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
