"""Store a teacher's sparse top-k probabilities for every training example once (TinyViT's fast
distillation), so later distillation runs replay them instead of running the teacher:

    python launch/store_logits.py --config=configs/distill.py:cpu \\
        --config.objective.teacher.workdir=/tmp/sup --out=/tmp/kd_logits --topk=4
    python launch/train.py --config=configs/distill.py:cpu --workdir=/tmp/kd_stored \\
        --config.objective.teacher.logits=/tmp/kd_logits \\
        "--config.data.pp_train=<the same pp>|teacher_topk('/tmp/kd_logits')|keep('image', 'label', 'teacher_probs', 'teacher_index')"

The store covers the config's ``total_steps`` (``--steps`` to change) of exactly the batches the
training run will draw (same data, seed, augmentation, batch size, mixup / CutMix draws); the
replay refuses a config that would draw others. Format and replay: ``fmjax/data/stored_logits.py``.
Bad input is one ``fmjax: error:`` line (exit 2) before anything is written; an existing store
is never overwritten.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "A distill config file[:preset].", lock_config=True)
flags.DEFINE_string("out", None, "New directory for the stored logits.")
flags.DEFINE_integer("topk", 10, "Probabilities kept per example (TinyViT: 10 of ImageNet's 1000).")
flags.DEFINE_integer("steps", None, "Training steps to cover (default: config.total_steps).")
flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "Stored precision (TinyViT: float16).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from fmjax.cli import _fail
    if not FLAGS.out:
        _fail("--out is required: a new directory for the stored logits.")
    if FLAGS.config.objective.get("name") != "distill":
        _fail(f"--config is a {FLAGS.config.objective.get('name')!r} config; store_logits takes a "
              "distill config (e.g. configs/distill.py:cpu) with objective.teacher.workdir.")
    from fmjax.objectives.distill import store_topk
    from fmjax.train.errors import run_with_clean_errors

    def run():
        meta = store_topk(FLAGS.config, FLAGS.out, FLAGS.topk, FLAGS.steps, FLAGS.dtype,
                          log=lambda m: print(m, flush=True))
        print(f"stored top-{meta['topk']} of {meta['num_classes']} for {meta['steps']} steps "
              f"({meta['rows']} examples) in {os.path.abspath(os.path.expanduser(FLAGS.out))}")
    run_with_clean_errors(run)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    from fmjax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
