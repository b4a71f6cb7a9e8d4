"""Export a trained checkpoint for PyTorch:
``python launch/export.py --workdir=DIR --format=hf|open_clip|diffusers --out=PATH [--step=N]``.

Writes safetensors plus a config in the reference layout to the new directory PATH:
``hf`` (ViT -> transformers ViTModel / ViTForImageClassification, or Dinov2Model /
Dinov2WithRegistersModel with layer scale / registers; MAE -> ViTMAEForPreTraining;
CLIP -> CLIPModel): config.json + model.safetensors, loadable with ``from_pretrained(PATH)``.
``open_clip`` (CLIP): open_clip_model.safetensors + open_clip_config.json
(``open_clip.create_model('local-dir:PATH')``). ``diffusers`` (U-Net -> UNet2DModel):
config.json + diffusion_pytorch_model.safetensors. Also fmjax_export.json (source workdir,
step, notes). DINO workdirs export the EMA teacher's ViT backbone and diffusion workdirs the
EMA weights (``--weights=params``: the student / non-EMA weights).

Bad input (an unknown format, a format that does not fit the workdir's model, a model option
with no equivalent in the reference layout, an existing non-empty --out, a missing workdir)
is one ``fmjax: error:`` line and exit code 2, with nothing written; PATH is never
overwritten.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("workdir", None, "A workdir written by launch/train.py.")
flags.DEFINE_enum("format", None, ["hf", "open_clip", "diffusers"], "Output layout.")
flags.DEFINE_string("out", None, "New directory to write (must not exist, or be empty).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_enum("weights", "auto", ["auto", "params"], "auto: DINO's EMA teacher, diffusion's "
                  "EMA, the params otherwise; params: the optimised (student / non-EMA) params.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Stored precision.")
FLAGS = flags.FLAGS


def _check_flags():
    """One-line errors that need only the flags and DIR/config.json, before jax is imported."""
    import json
    from fmjax.cli import _fail
    from fmjax.errors import ConfigError
    from fmjax.interop.export import check_format, check_out
    for name in ("workdir", "format", "out"):
        if not getattr(FLAGS, name):
            _fail(f"--{name} is required: launch/export.py --workdir=DIR "
                  "--format=hf|open_clip|diffusers --out=PATH [--step=N].")
    workdir = os.path.abspath(os.path.expanduser(FLAGS.workdir))
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        _fail(f"{path} not found: --workdir must be a directory written by launch/train.py.")
    try:
        with open(path) as f:
            name = (json.load(f).get("model") or {}).get("name")
        check_out(FLAGS.out)
        check_format(name, FLAGS.format, workdir)
    except (ConfigError, ValueError, OSError) as e:
        _fail(str(e))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from fmjax.train.errors import run_with_clean_errors
    from fmjax.train.export import export_workdir
    run_with_clean_errors(export_workdir, FLAGS.workdir, FLAGS.format, FLAGS.out, step=FLAGS.step,
                          weights=FLAGS.weights, dtype=FLAGS.dtype)


def _parse(argv):
    from fmjax.cli import parse_flags
    rest = parse_flags(argv)
    _check_flags()
    return rest


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
