"""MAE: masked-autoencoder pretraining of a ViT.

Default (bundled shapes, 32x32, a small ViT with patch 4, CPU-sized):
    python launch/train.py --config=configs/mae.py --workdir=/tmp/mae
  Reaches (2-core CPU, ~9 min): validation reconstruction loss (eval/val_loss, norm-pix)
  2.62 -> ~0.45, far below the 0.6x gate. The linear probe on the frozen encoder
  (eval/probe_top1, 8 shape classes, chance 0.125) is ~0.22, which does NOT yet beat the
  randomly initialised encoder (step-0 eval, ~0.23) at this CPU budget; see
  tests/train/test_learning.py for the asserted numbers.

Paper presets (He et al. 2021, 800 epochs on ImageNet-1k; needs `imagenet2012` in TFDS):
    python launch/train.py --config=configs/mae.py:vit_b16_imagenet --workdir=DIR
    python launch/train.py --config=configs/mae.py:vit_l16_imagenet --workdir=DIR
  Expected: fine-tuned top-1 83.6 (ViT-B) / 85.9 (ViT-L) after the paper's fine-tuning.
"""
from configs import common


def get_config(arg: str = "default"):
    c = common.base_config()
    c.objective.name = "mae"
    c.objective.feature = "mean"           # pooled patch tokens for kNN / probe
    c.optimizer.update(dict(name="adamw", lr_scaling="linear", b1=0.9, b2=0.95, weight_decay=0.05,
                            min_lr=0.0))
    if arg == "default":
        c.total_steps = 800
        c.batch_size = 128
        c.log_every = 50
        c.eval_every = 400
        c.checkpoint_every = 400
        c.optimizer.blr = 1.5e-3            # small model, short schedule: 10x the paper's blr
        c.optimizer.warmup_steps = 100
        c.data.name = "fmjax_shapes/32"
        c.data.image_size = 32
        c.model = dict(name="mae", variant="Ti/4", width=128, depth=4, num_heads=4, mlp_dim=512,
                       decoder_width=128, decoder_depth=2, decoder_heads=4,
                       mask_ratio=0.75, norm_pix_loss=True)
        _shapes_evals(c, examples=1000, train_examples=2000)
    elif arg in ("vit_b16_imagenet", "vit_l16_imagenet"):
        variant = "B/16" if arg.startswith("vit_b") else "L/16"
        common.imagenet_data(c, 224, scale=(0.2, 1.0))
        c.data.pp_train = "random_resized_crop(224, scale=(0.2, 1.0))|flip_lr|normalize('imagenet')|keep('image')"
        steps_per_epoch = 1281167 // 4096
        c.batch_size = 4096
        c.total_steps = 800 * steps_per_epoch
        c.optimizer.blr = 1.5e-4
        c.optimizer.warmup_steps = 40 * steps_per_epoch
        c.log_every = 100
        c.eval_every = 10 * steps_per_epoch
        c.checkpoint_every = 2000
        c.keep_period = 50 * steps_per_epoch
        c.dtype = "bfloat16"
        c.sharding = "fsdp"
        c.model = dict(name="mae", variant=variant, decoder_width=512, decoder_depth=8,
                       decoder_heads=16, mask_ratio=0.75, norm_pix_loss=True,
                       attention_impl="xla", remat=False)
        c.evals = dict(images=dict(type="images", split="validation", every=c.eval_every))
    else:
        raise ValueError(f"Unknown configs/mae.py preset {arg!r}; valid: default, vit_b16_imagenet, vit_l16_imagenet.")
    return c


def _shapes_evals(c, examples: int, train_examples: int):
    s = c.data.image_size
    c.data.pp_train = (f"random_resized_crop({s}, scale=(0.2, 1.0))|flip_lr|"
                       "normalize('imagenet')|keep('image')")
    c.data.pp_eval = "normalize('imagenet')|keep('image', 'label')"
    c.evals = dict(
        val_loss=dict(type="loss", split="validation", examples=examples),
        probe=dict(type="linear_probe", split="validation", examples=examples,
                   train_split="train", train_examples=train_examples),
        knn=dict(type="knn", split="validation", examples=examples,
                 train_split="train", train_examples=train_examples),
        images=dict(type="images", split="validation"),
    )
