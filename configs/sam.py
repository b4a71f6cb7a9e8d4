"""SAM: promptable segmentation with simulated interaction (fmjax/objectives/sam.py) on the
bundled shapes' instance masks.

Default (64 px shapes scenes, up to 3 instances each; the small SAM of fmjax/models/sam: 8 px
patches, an encoder 128 wide and 4 deep (4x4 windows, global attention in blocks 1 and 3), a
64-channel prompt encoder / mask decoder; 1 box-or-point prompt + 2 correction rounds):
    python launch/train.py --config=configs/sam.py --workdir=/tmp/sam
  Evals: eval/seg_miou_box, eval/seg_miou_1pt (the mask the IoU head is most confident of),
  eval/seg_miou_1pt_oracle (the best of the three), eval/seg_miou_3pt (one point + 2 corrections,
  single-mask); validation mIoU per image, 512 images. Measured 2026-12-02 on the 2-core CPU
  (1500 steps, ~7.5 min, 3.6 steps/s, 1.07M params; box prompts and corrections predict one mask,
  a single point three, as the paper): step 0 all ~0.054 -> step 1000 box 0.421, point 0.548
  (oracle 0.750), 3 points 0.553 -> step 1500 box 0.410, point 0.561 (oracle 0.764), 3 points
  0.564. Issue 19's bar (box >= 0.75, point >= 0.6) is NOT reached: the single-mask output (box,
  corrections) learns far worse than the best of the three point masks, and the IoU head picks
  badly. (With boxes on the three-mask output and the min loss instead, box reached 0.568.)
  eval/amg_recall@0.5, eval/amg_masks_per_image, eval/amg_best_iou: automatic mask generation
  (fmjax/evals/amg_recall.py: 16x16 point grid, IoU / stability filters, box NMS) on 64
  validation images, ~4 s per eval (~6 s with compilation). Measured 2026-12-02 after only 250
  steps (the default otherwise): recall 0.25 with 0.48 masks per image (without the filters
  0.29 with 3.4) - the model still segments the salient object from most points, so the bar
  (>= 0.7) is not reached there; not measured after the full 1500 steps.
  Explorations 2026-12-04 (2-core CPU): the box's tight mask-bounds box itself, filled, scores
  mIoU 0.614 on the same validation images (512; occluded and triangular shapes fill it least),
  so the learned box masks (0.41) are below that trivial answer. Boxes only (box_prob=1,
  correction_rounds=0, 600 steps): box mIoU 0.258 (step 300) -> 0.394 (600): the box prompt
  learns slowly on its own too, not only beside the point prompts. iou_weight=10 (the IoU head
  picks badly at 1): the masks collapsed (every mIoU < 0.05 at step 750) and the run ended at
  box 0.348, point 0.344 - worse; iou_weight stays 1.
  CPU preset (the default for 4000 steps; AMG scored on 512 validation images):
    python launch/train.py --config=configs/sam.py:cpu --workdir=/tmp/sam_cpu
  Measured 2026-12-04 (2-core CPU, 27.5 min, ~2.8 steps/s): step 1000 box 0.434, point 0.543
  (oracle 0.745), 3 points 0.550 -> step 4000 box 0.442, point 0.579 (oracle 0.807), 3 points
  0.580; AMG recall@0.5 0.672 (1000) -> 0.723 (4000) on the 64 images the run then used, but
  0.661 on 512 images (1018 instances; launch/eval.py --workdir=/tmp/sam_cpu
  --config=configs/sam.py:cpu --config.evals.amg.examples=512 --evals=amg), 1.44 masks per
  image: the 64-image number was sampling luck, so the preset now scores 512. Issue 19's bars
  (box >= 0.75, point >= 0.6, AMG >= 0.7) are NOT reached.
  Masks for one picture: python launch/segment.py --workdir=/tmp/sam --image=PATH --auto
  (or --points='x,y;x,y' --labels=1,0, --boxes='x0,y0,x1,y1').
"""
from configs import common


def get_config(arg: str = "default"):
    c = common.base_config()
    c.objective.name = "sam"
    c.objective.update(dict(correction_rounds=2, box_prob=0.5, box_noise=0.1, box_noise_max=20.0,
                            focal_weight=20.0, dice_weight=1.0, iou_weight=1.0))
    if arg in ("default", "cpu"):
        c.total_steps = 1500 if arg == "default" else 4000
        c.batch_size = 32
        c.log_every = 50
        c.eval_every = 500
        c.checkpoint_every = 500
        c.optimizer.update(dict(name="adamw", lr=1e-3, b1=0.9, b2=0.999, weight_decay=0.1,
                                warmup_steps=100, clip_norm=1.0))
        c.data.name = "fmjax_shapes/64"
        c.data.image_size = 64
        c.data.pp_train = ("flip_lr(keys=('image', 'masks'))|normalize('imagenet')|"
                           "keep('image', 'masks', 'num_objects')")
        c.data.pp_eval = "normalize('imagenet')|keep('image', 'masks', 'num_objects')"
        c.model = dict(name="sam", image_size=64, patch_size=8, width=128, depth=4, num_heads=4,
                       window_size=4, global_attn_indexes=(1, 3), prompt_dim=64, decoder_heads=4,
                       decoder_mlp_dim=256, iou_head_hidden_dim=64)
        c.evals = dict(seg=dict(type="metrics", split="validation", examples=512),
                       amg=dict(type="amg_recall", split="validation", examples=64 if arg == "default" else 512))
    else:
        raise ValueError(f"Unknown configs/sam.py preset {arg!r}; valid: default, cpu.")
    return c
