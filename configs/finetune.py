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
NOT done (fmjax has no such ops yet): mixup, cutmix, RandAugment, random erasing, and an EMA
of the weights (the supervised objective keeps none).
"""
from configs import common


def get_config(arg: str = "default"):
    c = common.base_config()
    c.objective.name = "supervised"
    c.objective.label_smoothing = 0.1
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
    else:
        raise ValueError(f"Unknown configs/finetune.py preset {arg!r}; valid: default.")
    return c


def _num_shape_classes() -> int:
    from fmjax.data import shapes
    return len(shapes.CLASS_NAMES)
