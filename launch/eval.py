"""Evaluate a trained checkpoint: ``python launch/eval.py --workdir=DIR [--step=N] [--evals=a,b]``.

Random-feature baseline: ``python launch/eval.py --config=configs/mae.py --random_init_seeds=8
[--evals=probe,knn] --out=FILE.json`` evaluates 8 freshly initialised models with the config's
evals and writes ``{"seeds": [...], "<metric>": [per-seed values], "summary": {...}}``.

``--quantize=int8`` (or ``int8_w8a8``) runs the evals again with every dense projection
quantized (``fmjax/adapt/quant.py``) and reports each metric's change and the bytes saved.

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
flags.DEFINE_integer("random_init_seeds", None, "Evaluate this many randomly initialised models of "
                     "--config instead of a checkpoint (the random-feature baseline).")
flags.DEFINE_enum("quantize", None, ["int8", "int8_w8a8"], "Also run the evals with every dense "
                  "projection quantized (int8 weights; int8_w8a8: weights and activations) and "
                  "report each metric's change and the bytes saved.")
flags.DEFINE_string("out", None, "With --random_init_seeds: write the per-seed results to this JSON file.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from fmjax.parallel.mesh import maybe_initialize_distributed
    maybe_initialize_distributed()
    from fmjax.train.errors import run_with_clean_errors
    from fmjax.train.eval_only import evaluate_checkpoint, evaluate_random_inits, load_workdir_config
    if FLAGS.random_init_seeds is not None:
        def baseline():
            config = FLAGS.config or load_workdir_config(FLAGS.workdir)
            return evaluate_random_inits(config, FLAGS.random_init_seeds, FLAGS.evals, FLAGS.out)
        run_with_clean_errors(baseline)
    else:
        run_with_clean_errors(evaluate_checkpoint, FLAGS.workdir, FLAGS.config, FLAGS.step, FLAGS.evals,
                              FLAGS.quantize)


def _check_flags():
    """One-line errors for flag combinations, before jax is imported."""
    from fmjax.cli import _fail
    if FLAGS.random_init_seeds is not None:
        if FLAGS.random_init_seeds < 1:
            _fail(f"--random_init_seeds={FLAGS.random_init_seeds}; give the number of random "
                  "initialisations, e.g. --random_init_seeds=8.")
        if FLAGS.step is not None:
            _fail("--step names a checkpoint; --random_init_seeds evaluates fresh models: give one of them.")
        if FLAGS.quantize:
            _fail("--quantize evaluates a trained checkpoint (--workdir); drop it with --random_init_seeds.")
        if not FLAGS["config"].present and not FLAGS.workdir:
            _fail("--random_init_seeds needs --config=configs/<name>.py (or a --workdir whose config to use).")
        if FLAGS.out and not os.path.isdir(os.path.dirname(os.path.abspath(os.path.expanduser(FLAGS.out)))):
            _fail(f"--out={FLAGS.out}: its folder does not exist.")
    else:
        if FLAGS.out:
            _fail("--out is for --random_init_seeds; checkpoint evals go to DIR/metrics.jsonl.")
        if not FLAGS.workdir:
            _fail("--workdir is required: a directory written by launch/train.py "
                  "(or --config=... --random_init_seeds=N for the random-feature baseline).")


def _parse(argv):
    from fmjax.cli import parse_flags
    rest = parse_flags(argv)
    _check_flags()
    return rest


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
