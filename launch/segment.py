"""Segment an image with a trained SAM workdir (configs/sam.py):

    python launch/segment.py --workdir=DIR --image=PATH --points='x,y;x,y' [--labels=1,0]
    python launch/segment.py --workdir=DIR --image=PATH --boxes='x0,y0,x1,y1;...'
    python launch/segment.py --workdir=DIR --image=PATH --auto [--points_per_side=16 ...]
    python launch/segment.py --workdir=DIR --image=PATH --prompt='a red circle' --detector_workdir=OWL_DIR
        [--out=PNG] [--step=N]

``--points``: one prompt of all the points (pixel coordinates of the image; ``--labels`` 1
foreground / 0 background, default all 1; a single point keeps the best of SAM's three masks
by the IoU head); ``--boxes``: one mask per box (inclusive pixel bounds); ``--prompt``: one
mask per ';'-separated phrase, from the top box the open-vocabulary detector of
``--detector_workdir`` (configs/owl.py) finds for it (Grounded-SAM); ``--auto``: automatic
mask generation (a point grid, batched prompts, IoU / stability filters, box NMS:
``fmjax/models/sam/amg.py``) with the workdir's ``amg_recall`` eval settings or that eval's
defaults, overridable by the flags below. The image is resized to the model's input as the
eval pipeline expects it (``fmjax/train/segment.py``); masks come back at its own size.

Writes a PNG overlay (each mask in a colour, prompts drawn) to ``--out`` (default
``DIR/images/segment_<image name>.png``) and prints one line per mask: predicted IoU,
stability score, area, bbox x,y,w,h. Bad input (a missing workdir or image, malformed
points / labels / boxes, prompts outside the image, a workdir that is not SAM) is one
``fmjax: error:`` line on stderr and exit code 2, before the checkpoint is read.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("workdir", None, "A SAM workdir written by launch/train.py --config=configs/sam.py.")
flags.DEFINE_string("image", None, "The image to segment (any format Pillow reads).")
flags.DEFINE_string("points", None, "';'-separated x,y pixel coordinates: one prompt, e.g. '12,30;40,8'.")
flags.DEFINE_string("labels", None, "With --points: one 1 (foreground) / 0 (background) per point "
                    "(default all 1), e.g. 1,0.")
flags.DEFINE_string("boxes", None, "';'-separated x0,y0,x1,y1 boxes, one mask each.")
flags.DEFINE_string("prompt", None, "';'-separated phrases, one mask each via --detector_workdir's boxes, "
                    "e.g. 'a red circle;a blue square'.")
flags.DEFINE_string("detector_workdir", None, "With --prompt: an open-vocabulary detector workdir "
                    "(launch/train.py --config=configs/owl.py).")
flags.DEFINE_bool("auto", False, "Automatic mask generation over a grid of point prompts.")
flags.DEFINE_string("out", None, "The PNG to write (default DIR/images/segment_<image name>.png).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_integer("points_per_side", None, "--auto: grid points per side.")
flags.DEFINE_integer("points_per_batch", None, "--auto: prompts per decoder call.")
flags.DEFINE_float("pred_iou_thresh", None, "--auto: keep masks whose predicted IoU is above this.")
flags.DEFINE_float("stability_score_thresh", None, "--auto: keep masks at least this stable.")
flags.DEFINE_float("stability_score_offset", None, "--auto: the logit offset of the stability score.")
flags.DEFINE_float("box_nms_thresh", None, "--auto: box IoU above which NMS drops the lower-scored mask.")
FLAGS = flags.FLAGS

AMG_FLAGS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
             "stability_score_offset", "box_nms_thresh")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from fmjax.train.errors import run_with_clean_errors
    from fmjax.train.segment import segment_image
    run_with_clean_errors(segment_image, FLAGS.workdir, FLAGS.image, points=FLAGS.points,
                          labels=FLAGS.labels, boxes=FLAGS.boxes, auto=FLAGS.auto, out=FLAGS.out,
                          prompt=FLAGS.prompt, detector_workdir=FLAGS.detector_workdir,
                          step=FLAGS.step, **{k: FLAGS[k].value for k in AMG_FLAGS})


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    flags.mark_flag_as_required("image")
    from fmjax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
