"""Linear probing: a linear classifier (BatchNorm without affine + linear) on the frozen pooled
features of any pretrained backbone (fmjax/objectives/linear_probe.py; issue 13).

Default (bundled shapes, 32x32 -> 8 shape classes, CPU-sized) from a pretrained workdir:
    python launch/train.py --config=configs/linear_probe.py --workdir=/tmp/lp_mae \
        --config.model_init.workdir=/tmp/mae_cpu
  and the random-feature baseline is the SAME command without the flag (a frozen random
  encoder). The default maps a MAE workdir's encoder (configs/mae.py default / cpu
  architecture) onto the probed ViT: `params/{patch_embed,cls_token,encoder}` ->
  `backbone/...`; from another workdir, set the model to its architecture and the mapping
  (e.g. a DINO workdir's teacher: "--config.model_init.mapping={'extra/teacher/backbone': 'backbone'}").
  Recipe: MAE's main_linprobe.py head (BatchNorm1d(affine=False) + linear, trunc-normal 0.01,
  frozen encoder in eval mode) and augmentation (random resized crop (0.5, 1) + flip), batch
  256, 600 steps, warm-up 60 then cosine, no weight decay; but AdamW lr 1e-2 instead of LARS:
  LARS's step is trust (0.001) * |w| * lr and MAE gets its lr from batch 16384 (blr 0.1 * 64);
  at batch 256 it barely moves the head (measured with LARS blr 0.1: 0.146 from MAE, 0.140
  from random after 600 steps). Measured 2026-12-01 (eval/val_accuracy, 1000 validation
  images, 8 classes, chance 0.125; ~1.5 min per run on the 2-core CPU, shared):
    from /tmp/mae_cpu (configs/mae.py:cpu, step 9000)   0.117 @0 -> 0.341 @300 -> 0.356 @600
    frozen random encoder (same command, no workdir)    0.134 @0 -> 0.256 @300 -> 0.268 @600
  (one seed each; the closed-form probe eval of configs/mae.py:cpu, on un-augmented images,
  gives 0.404 for the same encoder.)

Paper preset (He et al. 2022, MAE ViT-B/16 linear probing; needs `imagenet2012` in TFDS):
    python launch/train.py --config=configs/linear_probe.py:mae_vit_b16_imagenet --workdir=DIR \
        --config.model_init.torch=mae_pretrain_vit_base.pth
  main_linprobe.py: LARS, blr 0.1, batch 16384, 90 epochs, 10 warm-up epochs, weight decay
  0, class-token feature (global_pool=False: after the encoder's final norm), head
  BatchNorm1d(affine=False, eps=1e-6) + linear (trunc_normal std 0.01), RandomResizedCrop(224)
  + flip. The released encoder checkpoint is in timm's layout (format 'timm_vit').
  Expected (paper): 68.0% top-1 (ViT-B/16, 1600-epoch pretraining).
"""
from configs import common

IMAGENET_TRAIN = 1281167


def get_config(arg: str = "default"):
    c = common.base_config()
    c.objective = dict(name="linear_probe", num_classes=1000, batch_norm=True, bn_momentum=0.1,
                       bn_eps=1e-6, head_init_std=0.01)
    c.optimizer.update(dict(name="lars", lr_scaling="linear", blr=0.1, momentum=0.9,
                            trust_coefficient=0.001, weight_decay=0.0, clip_norm=0.0,
                            decay="cosine", min_lr=0.0))
    c.optimizer.frozen = ("backbone/.*",)
    if arg == "default":
        c.objective.num_classes = _num_shape_classes()
        c.total_steps = 600
        c.batch_size = 256
        c.log_every = 50
        c.eval_every = 300
        c.checkpoint_every = 600
        c.optimizer.warmup_steps = 60
        # LARS's step is trust * |w| * lr: at batch 256 (lr 0.1) it moves a 0.01-std head by
        # ~1e-4 of its norm per step, nothing in 600 steps (measured: 0.146 from MAE, 0.140 from
        # random). MAE's recipe gets its lr from batch 16384 and 90 epochs; here AdamW instead.
        c.optimizer.update(dict(name="adamw", lr_scaling="none", lr=1e-2, b1=0.9, b2=0.999))
        c.data.name = "fmjax_shapes/32"
        c.data.image_size = 32
        c.data.pp_train = ("random_resized_crop(32, scale=(0.5, 1.0))|flip_lr|normalize('imagenet')|"
                           "keep('image', 'label')")
        c.data.pp_eval = "normalize('imagenet')|keep('image', 'label')"
        # configs/mae.py's default encoder (its probe feature 'mean' ~ pool='mean').
        c.model = dict(name="vit", variant="Ti/8", width=128, depth=4, num_heads=4, mlp_dim=512,
                       num_classes=0, pool="mean", pos_embed="sincos", stem="patch")
        c.evals = dict(val=dict(type="metrics", split="validation"))
        c.model_init.mapping = {"params/patch_embed": "backbone/patch_embed",
                                "params/cls_token": "backbone/cls_token",
                                "params/encoder": "backbone/encoder"}
    elif arg == "mae_vit_b16_imagenet":
        c.batch_size = 16384
        steps_per_epoch = IMAGENET_TRAIN // c.batch_size
        c.total_steps = 90 * steps_per_epoch
        c.optimizer.warmup_steps = 10 * steps_per_epoch
        common.imagenet_data(c, 224, scale=(0.08, 1.0))
        c.model = dict(name="vit", variant="B/16", num_classes=0, pool="cls", pos_embed="learned",
                       attention_impl="xla")
        c.dtype = "bfloat16"
        c.model_init.update(dict(format="timm_vit", mapping={"params": "backbone"}))
        c.log_every = 20
        c.eval_every = 10 * steps_per_epoch
        c.checkpoint_every = steps_per_epoch
        c.evals = dict(val=dict(type="metrics", split="validation", every=c.eval_every))
    else:
        raise ValueError(f"Unknown configs/linear_probe.py preset {arg!r}; valid: default, mae_vit_b16_imagenet.")
    return c


def _num_shape_classes() -> int:
    from fmjax.data import shapes
    return len(shapes.CLASS_NAMES)
