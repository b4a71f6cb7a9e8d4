"""Sample a trained generator (diffusion or DALL-E): ``python launch/sample.py --workdir=DIR [--step=N]``.

Loads the checkpoint's weights (diffusion: the EMA weights) with ``DIR/config.json`` and writes PNG grids to
``DIR/samples/`` (or ``--outdir``): one per class and ``all_classes.png`` (class-conditional),
one per prompt and ``all_prompts.png`` (text-conditional, ``--prompts="a red circle;a blue
square"``), or ``samples.png`` (unconditional); prints their paths. Sampler flags override
``config.objective.sample``: --sampler / --num_steps / --guidance_scale / --eta for diffusion,
--temperature / --top_k / --top_p / --guidance_scale for DALL-E. ``--rerank_workdir=CLIP_DIR`` draws
``--rerank_from`` samples per prompt and keeps the ``--num_per_class`` that CLIP scores best
(DALL-E's re-ranking). With ``--classifier_workdir=CLF`` (a workdir trained with
configs/supervised.py) it also prints the fraction of samples that classifier assigns to
their conditioning class, beside its accuracy on real validation images.

Bad flags (a non-finite --guidance_scale / --eta, --num_steps outside 1 .. the model's train
timesteps, --batch_size or --num_per_class below 1, class ids out of range, --prompts for a
model that is not text-conditional, --classes for one that is not class-conditional) are one
``fmjax: error:`` line and exit code 2 before the checkpoint is read; a NaN or infinite sample
is the same, naming the checkpoint step, before any PNG is written.
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
flags.DEFINE_integer("num_per_class", 8, "Samples per class / per prompt (unconditional: 8 rows of this).")
flags.DEFINE_list("classes", None, "Class ids to sample, class-conditional models only "
                  "(default: all).")
flags.DEFINE_string("prompts", None, "';'-separated prompts, text-conditional models only "
                    "(default: the first validation captions).")
flags.DEFINE_enum("sampler", None, ["ddim", "ddpm"], "Sampler (default: config.objective.sample).")
flags.DEFINE_integer("num_steps", None, "Sampling steps.")
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (1: none).")
flags.DEFINE_float("eta", None, "DDIM eta (0: deterministic).")
flags.DEFINE_float("temperature", None, "Autoregressive (DALL-E) sampling temperature.")
flags.DEFINE_integer("top_k", None, "Autoregressive sampling: keep the k most likely codes (0: all).")
flags.DEFINE_float("top_p", None, "Autoregressive sampling: nucleus mass (1: all).")
flags.DEFINE_string("rerank_workdir", None, "A CLIP workdir: re-rank --rerank_from samples per prompt "
                    "by image-text similarity and keep the best --num_per_class.")
flags.DEFINE_integer("rerank_from", 32, "Samples drawn per prompt for --rerank_workdir.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("outdir", None, "Where to write the PNGs (default: DIR/samples).")
flags.DEFINE_integer("batch_size", None, "Global sampling batch (default: config.batch_size; "
                     "rounded up to a multiple of the data-parallel devices).")
flags.DEFINE_string("classifier_workdir", None, "A supervised classifier's workdir: print the "
                    "conditional-generation accuracy.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from fmjax.parallel.mesh import maybe_initialize_distributed
    maybe_initialize_distributed()
    from fmjax.train.errors import run_with_clean_errors
    from fmjax.train.sample import sample_checkpoint
    run_with_clean_errors(
        sample_checkpoint, FLAGS.workdir, step=FLAGS.step, num_per_class=FLAGS.num_per_class,
        prompts=FLAGS.prompts, classes=FLAGS.classes, seed=FLAGS.seed, outdir=FLAGS.outdir,
        batch_size=FLAGS.batch_size, classifier_workdir=FLAGS.classifier_workdir, config=FLAGS.config,
        sampler=FLAGS.sampler, num_steps=FLAGS.num_steps, guidance_scale=FLAGS.guidance_scale,
        eta=FLAGS.eta, temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
        rerank_workdir=FLAGS.rerank_workdir, rerank_from=FLAGS.rerank_from)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    from fmjax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
