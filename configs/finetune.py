"""Supervised fine-tuning of a ViT from any `config.model_init` (issue 13, "Prove it with transfer").

Default (bundled shapes, 32x32 -> 8 shape classes, CPU-sized) from a pretrained workdir:
    python launch/train.py --config=configs/finetune.py --workdir=/tmp/ft_mae \
        --config.model_init.workdir=/tmp/mae_cpu
  and the from-scratch baseline is the SAME command without the flag (random init):
    python launch/train.py --config=configs/finetune.py --workdir=/tmp/ft_scratch
  Measured 2026-12-01 (600 steps, eval/val_accuracy on validation, 1000 examples, 8 shape
  classes, chance 0.125; 2-core CPU shared with a diffusion run, ~200 s wall each, ~3.5
  steps/s; --config.seed changes the head init, drop path and data order):
    from /tmp/mae_cpu (configs/mae.py:cpu, step 9000)   seed 0: 0.550 @300 -> 0.673 @600
                                                        seed 1: 0.555 @300 -> 0.673 @600
    random init (same command without the flag)         seed 0: 0.449 @300 -> 0.532 @600
                                                        seed 1: 0.422 @300 -> 0.520 @600
    from /tmp/mae_default (configs/mae.py default, 2500) seed 0: 0.488 @300 -> 0.585 @600
  So MAE pretraining beats the same recipe from scratch by +0.14 at 600 steps (worst MAE
  seed vs best scratch seed); a shorter pretraining (2500 steps) gives +0.05.
  tests/train/test_finetune.py checks the loading on a tiny run.

The model is a ViT of the MAE default encoder's architecture (configs/mae.py default / cpu:
width 128, depth 4, heads 4, mlp 512, patch 8, linear patch stem, class token, FIXED sin-cos
positions) with a zero-initialised 8-way head on the mean patch token (`pool='mean'`, the
closest ViT pooling to MAE's probe feature 'gap'; note fmjax's ViT pools AFTER the encoder's
final norm, MAE's 'gap' before it). Param names: MAE's encoder subtree is `patch_embed/proj`,
`cls_token`, `encoder/{block_i,norm}` - the same names and shapes as the ViT's (no name map
needed, only the prefix `params/`); MAE's `decoder*` and `mask_token` are not mapped.
So `model_init.mapping` maps those three subtrees and `dont_load=('head/.*',)` (the head is
new anyway). From a supervised workdir (configs/supervised.py default: conv stem, learned
pos_embed), match its model: `--config.model.stem=conv --config.model.pos_embed=learned`
and add `"--config.model_init.mapping={'params': ''}"` (then the old head is also skipped by
dont_load).

Recipe (MAE's main_finetune.py, scaled to a 600-step CPU run): AdamW (0.9, 0.999), lr 2e-3
(fmjax's supervised default), weight decay 0.05, warm-up 50 steps then cosine, clip 1.0;
layer-wise lr decay 0.75 (`optimizer.llrd`, MAE's lr_decay.py: embeddings 0.75**5, block i
0.75**(4 - i), head / final norm 1); drop path 0.1; label smoothing 0.1; random resized crop
(0.5, 1) + flip. Batch 128, 600 steps.
Mixup / CutMix and an EMA of the weights are options of the supervised objective
(fmjax/objectives/supervised.py; timm's Mixup in batch mode on device, timm's ModelEmaV2), OFF
in this preset (its numbers above were measured without them; nobody has measured them on the
shapes yet): e.g. --config.objective.mixup_alpha=0.8 --config.objective.cutmix_alpha=1.0
(DeiT / MAE: mix_prob 1.0, switch_prob 0.5, smoothing = label_smoothing) and
--config.objective.ema_decay=0.999 (then eval/val_ema_accuracy beside eval/val_accuracy).
RandAugment and random erasing are pp ops (`randaugment(2, 9)`, `random_erasing(0.25)`,
fmjax/data/autoaugment.py), not in this preset's pp (not measured here either).

Paper preset (needs `imagenet2012` in TFDS), MAE's fine-tuning of ViT-B/16 (He et al. 2021,
facebookresearch/mae FINETUNE.md + main_finetune.py + util/lr_decay.py, util/lr_sched.py,
util/datasets.py; expected 83.6 top-1 from MAE's 1600-epoch checkpoint), from the released
pre-training checkpoint or an fmjax MAE workdir (configs/mae.py:vit_b16_imagenet):
    python launch/train.py --config=configs/finetune.py:mae_vit_b16_imagenet --workdir=DIR \
        --config.model_init.torch=mae_pretrain_vit_base.pth        # format 'timm_mae' (set)
    python launch/train.py --config=configs/finetune.py:mae_vit_b16_imagenet --workdir=DIR \
        --config.model_init.workdir=MAE_WORKDIR
  - batch 1024, 100 epochs (1251 steps each, drop_last), lr = blr 5e-4 * 1024 / 256 = 2e-3,
    linear warm-up 5 epochs from 0 then half-cycle cosine to min_lr 1e-6 (per step, as
    lr_sched.adjust_learning_rate per iteration); AdamW (0.9, 0.999), weight decay 0.05 on
    >= 2-D weights, none on biases, norms, cls_token, pos_embed (fmjax's default no_decay
    list, the same set for this model as param_groups_lrd's); no clipping; layer decay 0.65
    (embeddings 0.65**13, block i 0.65**(12 - i), fc_norm / head 1); drop path 0.1;
  - mixup 0.8, cutmix 1.0, prob 1.0, switch 0.5, label smoothing 0.1 (soft-target CE); no
    model EMA (MAE's fine-tuning keeps none);
  - global pool: ViT(pool='mean', fc_norm=True) (models_vit.py global_pool: mean of the patch
    tokens, then fc_norm; the pre-trained final `norm` is unused, as MAE drops it);
  - data (timm create_transform): random_resized_crop(224, (0.08, 1)) bicubic, flip,
    randaugment(2, 9) (= rand-m9-mstd0.5-inc1), normalize, random_erasing(0.25) ('pixel');
    eval resize 256 (bicubic) + center crop 224.
  Not reproduced: the head's trunc_normal(std=2e-5) init (fmjax: zeros); MAE's fine-tuned
  pos_embed (learned, initialised to the sin-cos table; here the fixed sin-cos table, which
  the 'timm_mae' converter checks and which an fmjax MAE workdir has no param for); float16
  autocast (bfloat16 here); per-GPU mixup pairing (here the whole global batch is reversed).
  DINO ViT-S/16 and CLIP ViT-B/16 presets are not given: DINO publishes no fine-tuning
  script (its eval_linear.py is a linear probe: configs/linear_probe.py), and FT-CLIP's recipe
  (LightDXY/FT-CLIP scripts/bash_fine_Openai_CLIP_P16.sh: batch 2048, lr 6e-4, 50 epochs,
  warm-up 10, layer decay 0.6, wd 0.05, no drop path, no mixup / cutmix, model EMA 0.9998,
  CLIP mean / std) runs on their own CLIP-ViT fine-tuning model, whose head and pooling are
  not checked against fmjax's ViT here.
"""
from configs import common


def get_config(arg: str = "default"):
    c = common.base_config()
    c.objective.name = "supervised"
    c.objective.label_smoothing = 0.1
    # Mixup / CutMix (timm Mixup, mode 'batch') and a weight EMA; 0 = off (see the docstring).
    c.objective.update(dict(mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0, switch_prob=0.5,
                            ema_decay=0.0))
    if arg == "default":
        c.total_steps = 600
        c.batch_size = 128
        c.log_every = 50
        c.eval_every = 300
        c.checkpoint_every = 600
        c.optimizer.update(dict(name="adamw", lr=2e-3, b1=0.9, b2=0.999, weight_decay=0.05,
                                warmup_steps=50, clip_norm=1.0))
        c.optimizer.llrd.decay = 0.75
        c.data.name = "fmjax_shapes/32"
        c.data.image_size = 32
        c.data.pp_train = "random_resized_crop(32, scale=(0.5, 1.0))|flip_lr|normalize('imagenet')|keep('image', 'label')"
        c.data.pp_eval = "normalize('imagenet')|keep('image', 'label')"
        # configs/mae.py's default encoder, as a classifier.
        c.model = dict(name="vit", variant="Ti/8", width=128, depth=4, num_heads=4, mlp_dim=512,
                       num_classes=_num_shape_classes(), pool="mean", pos_embed="sincos",
                       stem="patch", drop_path=0.1)
        c.evals = dict(val=dict(type="metrics", split="validation"))
        # MAE workdir -> ViT: the encoder subtrees keep their names (see the docstring).
        c.model_init.mapping = {"params/patch_embed": "patch_embed", "params/cls_token": "cls_token",
                                "params/encoder": "encoder"}
        c.model_init.dont_load = ("head/.*",)
    elif arg == "mae_vit_b16_imagenet":
        epoch = 1281167 // 1024                       # 1251 steps (drop_last)
        common.imagenet_data(c, 224, scale=(0.08, 1.0))
        # timm create_transform as MAE's util/datasets.py calls it: RandAugment
        # rand-m9-mstd0.5-inc1 on the uint8 crop, random erasing (0.25, 'pixel') after normalize.
        c.data.pp_train = ("random_resized_crop(224, scale=(0.08, 1.0))|flip_lr|randaugment(2, 9)|"
                           "normalize('imagenet')|random_erasing(0.25)|keep('image', 'label')")
        c.batch_size = 1024
        c.total_steps = 100 * epoch
        c.optimizer.update(dict(name="adamw", lr_scaling="linear", blr=5e-4, b1=0.9, b2=0.999,
                                weight_decay=0.05, warmup_steps=5 * epoch, min_lr=1e-6,
                                clip_norm=0.0))
        c.optimizer.llrd.decay = 0.65
        c.optimizer.wd_groups = "mae_finetune"   # timm no_weight_decay(): pos_embed, cls_token, dist_token
        c.objective.update(dict(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0, switch_prob=0.5,
                                label_smoothing=0.1))
        c.model = dict(name="vit", variant="B/16", num_classes=1000, pool="mean", fc_norm=True,
                       pos_embed="sincos", drop_path=0.1, attention_impl="xla", remat=False)
        c.dtype = "bfloat16"
        c.sharding = "fsdp"
        c.log_every = 100
        c.eval_every = 5 * epoch
        c.checkpoint_every = 2000
        c.keep_period = 10 * epoch
        c.evals = dict(val=dict(type="metrics", split="validation"))
        # The released mae_pretrain_vit_base.pth (--config.model_init.torch=FILE) or an fmjax MAE
        # workdir (--config.model_init.workdir=DIR, which ignores format): both give
        # params/{patch_embed, cls_token, encoder}; encoder/norm stays unused (fc_norm instead).
        c.model_init.format = "timm_mae"
        c.model_init.mapping = {"params/patch_embed": "patch_embed", "params/cls_token": "cls_token",
                                "params/encoder": "encoder"}
        c.model_init.dont_load = ("head/.*",)
    else:
        raise ValueError(f"Unknown configs/finetune.py preset {arg!r}; valid: default, mae_vit_b16_imagenet.")
    return c


def _num_shape_classes() -> int:
    from fmjax.data import shapes
    return len(shapes.CLASS_NAMES)
