"""OWL-ViT: open-vocabulary detection on a CLIP (fmjax/objectives/owl.py, fmjax/models/owl.py),
trained on the bundled shapes' instances (boxes from their masks) with "a <colour> <shape>."
phrases; the held-out (shape, colour) combinations are never a training class.

From a CLIP workdir (the detector's CLIP is configs/clip.py's default model; OWL-ViT starts
from a contrastively trained CLIP):
    python launch/train.py --config=configs/clip.py --workdir=/tmp/clip
    python launch/train.py --config=configs/owl.py --workdir=/tmp/owl --config.model_init.workdir=/tmp/clip
Without --config.model_init.workdir the CLIP starts random (the same command, from scratch).
  Evals (fmjax/evals/box_ap.py, 512 images each): eval/box_ap50 (COCO-style AP at IoU 0.5 over
  the phrases, all 64 of them as the vocabulary, on validation: seen combinations) and
  eval/box_heldout_ap50 / _unseen_ap50 (the heldout split, whose main objects are the unseen
  combinations; _unseen_ap50 is their AP alone); _compositional_acc (an instance's phrase
  outscores the phrase with its colour swapped for another instance's colour: ARO-style);
  _grounding_acc (the top box of an instance's phrase covers it at IoU 0.5). With
  --config.evals.box.sam_workdir=SAM_DIR (a configs/sam.py run) also _grounded_miou: the mask
  SAM makes from the top box of each instance's phrase, against the instance's mask.
  Text-prompted masks: python launch/segment.py --workdir=SAM_DIR --detector_workdir=/tmp/owl
  --image=PATH --prompt='a red circle'.
  Measured 2026-12-04 on the 2-core CPU, from a CLIP default run (zero-shot 0.486, held-out
  0.265; its own swap_caption eval: attribute 0.992 / object 0.922), 1500 steps in 7.4 min
  (evals included), at steps 500 / 1000 / 1500:
    validation: box_ap50 0.349 / 0.605 / 0.649 (issue 19's bar: 0.5 on seen combinations),
      compositional_acc 0.664 / 0.845 / 0.864, grounding_acc 0.872 / 0.953 / 0.960;
    heldout split: ap50 0.212 / 0.373 / 0.408, unseen_ap50 (the 8 phrases never trained on,
      all on main objects) 0.724 / 0.870 / 0.866, compositional_acc 0.635 / 0.826 / 0.826.
  (Step 0: AP50 0.000, compositional 0.496: chance.)
  What the CLIP start buys (the same default from a random CLIP, no --config.model_init, 6 min;
  one seed each): validation box_ap50 0.090 / 0.452 / 0.539 at 500 / 1000 / 1500 (from CLIP:
  0.349 / 0.605 / 0.649), compositional_acc 0.524 / 0.764 / 0.821, grounding_acc 0.670 / 0.950 /
  0.963; heldout ap50 0.071 / 0.329 / 0.338, unseen_ap50 0.457 / 0.799 / 0.878. The CLIP start
  is ahead most early (AP50 +0.26 at 500 steps) and still +0.11 AP50, +0.07 held-out AP50 and
  +0.04 compositional at 1500; the grounding of known phrases and the unseen phrases' AP end
  level (both measured on one seed).

Relations (issue 19's compositional eval with swapped relations): every box eval also logs
  relation_acc (does 'a <A> on the left of a <B>.' outscore the same phrase with the opposite
  relation, ARO-style) and relation_grounding_acc (is that phrase's top box A's). The detectors
  above never trained on relation phrases: /tmp/owl (1500 steps) 0.523 / 0.685 on validation,
  0.558 / 0.644 held-out; /tmp/owl_cpu (4000 steps) 0.472 / 0.721, held-out 0.505 / 0.706: chance.
  --config.objective.relation_queries=1 trains one relation pair per image (the swapped phrase
  a hard negative; fmjax/objectives/owl.py), measured 2026-12-05 on the 2-core CPU, same command
  as the default plus that flag, 1500 steps in 10.3 min (the text tower embeds 56 + 128 phrases
  a step: 2.6 instead of 3.8 steps/s), at steps 500 / 1000 / 1500, one seed:
    validation relation_acc 0.680 / 0.779 / 0.788, relation_grounding_acc 0.861 / 0.957 / 0.968;
    heldout relation_acc 0.708 / 0.764 / 0.790, relation_grounding_acc 0.856 / 0.946 / 0.962;
    at the price of the class phrases at the same budget: box_ap50 0.299 / 0.518 / 0.559 (0.649
    without), compositional_acc 0.823 (0.864), heldout ap50 0.379 (0.408), unseen_ap50 0.823 (0.866).

The authors' training step (scenic's OWL-ViT; tests/reference/test_owl_trajectory.py steps
fmjax beside a transcription of it): --config.objective.normalization=per_example
--config.objective.box_l1=xyxy --config.objective.prior_prob=0.01 --config.optimizer.clip_mode=per_example
--config.optimizer.clip_norm=1.0 --config.optimizer.name=adam --config.optimizer.weight_decay=0.0
"--config.optimizer.lr_mult=(('clip/text/.*', 0.04),)" and scenic's class / box / GIoU weights 1 / 1 / 1
and focal alpha 0.3. The defaults here are DETR's loss (global normalisation, L1 on (cx, cy, w, h),
weights 2 / 5 / 2, alpha 0.25) with one global clip, which the numbers above were measured with.

cpu preset: the same recipe for 4000 steps (cosine over 4000):
    python launch/train.py --config=configs/owl.py:cpu --workdir=/tmp/owl_cpu --config.model_init.workdir=/tmp/clip
  Measured 2026-12-04 on the 2-core CPU, 16.7 min, at steps 1000 / 2000 / 3000 / 4000:
    validation box_ap50 0.641 / 0.780 / 0.818 / 0.831, compositional_acc 0.869 / 0.940 / 0.948 /
      0.954, grounding_acc 0.964 / 0.982 / 0.988 / 0.987;
    heldout ap50 0.409 / 0.566 / 0.613 / 0.630, unseen_ap50 0.865 / 0.928 / 0.943 / 0.948.
  Grounded segmentation with the SAM default run (configs/sam.py, 1500 steps):
    python launch/eval.py --workdir=/tmp/owl --config=configs/owl.py \
        --config.evals.box.sam_workdir=/tmp/sam --config.evals.box_heldout.sam_workdir=/tmp/sam
  grounded_miou 0.851, grounded_iou@0.5 0.953 on validation (issue 19's bar: IoU >= 0.5 on seen
  combinations); heldout split 0.860 / 0.964 (41 s for both evals).
"""
from configs import common
from configs.clip import get_config as clip_config


def get_config(arg: str = "default"):
    from fmjax.data import shapes
    c = common.base_config()
    c.objective.name = "owl"
    c.objective.update(dict(
        color_names=tuple(shapes.COLOR_NAMES), shape_names=tuple(shapes.CLASS_NAMES),
        template="a {color} {shape}.", exclude=tuple(tuple(p) for p in sorted(shapes.HELDOUT_COMBOS)),
        class_weight=2.0, l1_weight=5.0, giou_weight=2.0, focal_alpha=0.25,
        # referring expressions with a spatial relation (fmjax/objectives/owl.py): R pairs per
        # image trained as extra queries, the relation-swapped phrase a hard negative; 0: none
        relation_template="a {color} {shape} {relation} a {other_color} {other_shape}.",
        relation_queries=0, relation_weight=1.0, relation_margin=0.1,
        # scenic OWL-ViT's loss (tests/reference/test_owl_trajectory.py): 'per_example' / 'xyxy'
        normalization="global", box_l1="cxcywh", prior_prob=0.0))
    if arg not in ("default", "cpu"):
        raise ValueError(f"Unknown configs/owl.py preset {arg!r}; valid: default, cpu.")
    clip = clip_config("default")
    c.model = dict(name="owl", clip={k: v for k, v in clip.model.items() if k != "name"})
    c.model_init.mapping = {"params": "clip"}   # a CLIP workdir: --config.model_init.workdir=DIR
    c.batch_size = 64
    c.total_steps = 1500 if arg == "default" else 4000   # cpu: the default's recipe, trained longer
    c.log_every = 50
    c.eval_every = 500 if arg == "default" else 1000
    c.checkpoint_every = c.eval_every
    c.optimizer.update(dict(name="adamw", lr=5e-4, b1=0.9, b2=0.999, weight_decay=0.05,
                            warmup_steps=100, clip_norm=1.0))
    c.data.name = "fmjax_shapes/32"
    c.data.image_size = 32
    c.data.tokenize = dict(clip.data.tokenize)
    keep = "keep('image', 'masks', 'num_objects', 'colors', 'shapes')"
    c.data.pp_train = f"flip_lr(keys=('image', 'masks'))|normalize('clip')|{keep}"
    c.data.pp_eval = f"normalize('clip')|{keep}"
    box = dict(type="box_ap", split="validation", examples=512, sam_workdir="")
    c.evals = dict(box=box, box_heldout=dict(box, split="heldout"))
    return c
