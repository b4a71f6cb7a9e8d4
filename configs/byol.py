"""BYOL: an online network predicts an EMA target network's projection of another view.

Default (bundled coloured shapes, two 32px views, a small ViT, the reference's LARS, CPU-sized):
    python launch/train.py --config=configs/byol.py --workdir=/tmp/byol
  Measured 2026-12-02 (2-core CPU, alone under the shared lock; 600 steps, 157 s wall with
  compile and 3 evals, ~5 steps/s): the loss (in [0, 8]; 4 = orthogonal predictions) falls
  3.9 (step 1, in a 6-step run) -> 2.27 (step 25) -> 1.02 (step 575), the online/target cosine
  0.43 -> 0.71, the projections stay spread (train/projection_spread 0.73 -> 0.82: ~1 for
  spread-out unit vectors, 0 collapsed), and DIR/images/images_views_*.png shows validation
  images (row 1) and their two views (rows 2 and 3).
  As configs/dino.py's default, it does NOT learn the shape label on the coloured shapes: kNN
  top-1 0.184 (init) -> 0.151 (300) -> 0.139 (600); the `cpu` preset is the one that does.

CPU recipe that learns (silhouettes of the shapes, rot90 views):
    python launch/train.py --config=configs/byol.py:cpu --workdir=/tmp/byol_cpu
    python launch/eval.py --config=configs/byol.py:cpu --random_init_seeds=8 --evals=knn \
        --out=/tmp/byol_cpu_random.json                      # the baseline
  As configs/dino.py:cpu: the images are `silhouette`s of fmjax_shapes/simple_32 and every
  view is turned by a random multiple of 90 degrees (two_views rot90=True), so the views share
  the shape and nothing else the label does not depend on (colour, background, position).
  Two changes from the reference recipe, both measured (2-core CPU, alone, 3000 steps, online
  kNN top-1 at steps 0 / 1000 / 2000 / 3000):
    LARS (the default's), crops scale (0.08, 1)      0.760 / 0.750 / 0.800 / 0.798  (687 s)
    AdamW blr 2e-3, wd 0.05, crops scale (0.4, 1)     0.760 / 0.753 / 0.805 / 0.814  (560 s)
  vs the best of 8 random initialisations 0.772 (mean 0.759, worst 0.741; 63 s). Crops of 8%
  of a 32px silhouette often keep a blob of the shape and nothing of its outline (see the
  views picture), so the crops keep >= 40% of the image (DINO's global-crop scale); AdamW is
  MoCo v3's optimizer for ViTs (LARS is the ResNet recipe). The preset runs 6000 steps.
  Measured 2026-12-02 (2-core CPU; SHARED with other jobs for the first ~1700 steps, ~2.8
  steps/s, alone after that, ~5.8 steps/s: 1415 s = 23.6 min wall; alone ~19 min): online kNN
  top-1 (eval/knn_top1, validation, k 20, 2000 train examples)
      0.760 (step 0) -> 0.801 (2000) -> 0.840 (4000) -> 0.865 (6000)
  vs the best of 8 random initialisations 0.772 (mean 0.759, worst 0.741): +0.093, target
  +0.05. 10-shot ridge (eval/fewshot_10shot_top1) 0.479 -> 0.453 -> 0.513 -> 0.526. Loss 3.43
  (step 25) -> 0.39, cosine 0.14 -> 0.90, projection spread 0.78 -> 0.68 (no collapse).

Paper presets (need `imagenet2012` in TFDS):
    python launch/train.py --config=configs/byol.py:vit_b16_imagenet --workdir=DIR
  BYOL with a ViT-B/16 as Chen, Xie & He, "An Empirical Study of Training Self-Supervised
  Vision Transformers" (MoCo v3, arXiv 2104.02057) ran it in their comparison of frameworks
  (Table 4, 300 epochs, linear probe): expected ~73.9% top-1 (quoted from memory of that
  table; check it). BYOL's own paper has no ViT. The optimizer is MoCo v3's released ViT-B
  recipe (facebookresearch/moco-v3 CONFIG.md at c349e6e: AdamW over all params, lr 1.5e-4 x
  batch / 256, weight decay 0.1, 40 warm-up epochs then cosine, 300 epochs, batch 4096),
  with BYOL's heads (4096 hidden, 256 out), its asymmetric views and its target EMA 0.996 -> 1
  (cosine). MoCo v3's frozen random patch projection (--stop-grad-conv1) is off here; turn it
  on with --config.optimizer.frozen="('backbone/patch_embed/.*',)".

    python launch/train.py --config=configs/byol.py:resnet50_imagenet --workdir=DIR
  `resnet50_imagenet`, the BYOL paper's own preset (74.3% linear eval): ResNet-50
  (fmjax.models.resnet, v1.5 as haiku's BlockV1, its last BatchNorm per block starting at 0 as
  haiku's scale_init=zeros; BatchNorm statistics per view over the global batch, the
  reference's cross_replica_axis; online and target running statistics of their own), 1000
  epochs at batch 4096, LARS (eta 1e-3, momentum 0.9, biases and batch-norm params excluded
  from decay and adaptation), base lr 0.2 x batch / 256 with 10 warm-up epochs then cosine,
  weight decay 1.5e-6, target EMA 0.996 -> 1 (deepmind-research/byol configs/byol.py); the
  optimizer, lr schedule, heads and EMA are the ones the trajectory test checks. What
  differs: haiku pads its stride-2 convs and the stem's max pool 'SAME' (asymmetric on even
  sizes), fmjax's ResNet symmetrically (torchvision's), a one-pixel shift of those windows.

Reference options (every preset; the training step is deepmind-research/byol's
byol_experiment.py ``_update_fn``, checked step by step over 27 steps by
tests/reference/test_byol_trajectory.py):
  objective.target_init='independent'  the target network is initialised from its own key
                                       (byol_experiment.py _make_initial_state); 'copy' starts
                                       it as the online network.
  optimizer.name='lars', lars_exclude  utils/optimizers.py lars with exclude_bias_and_norm for
                                       weight decay and trust ratio: biases ('b') and every
                                       normalisation's params ('norm' in the module name; here
                                       LayerNorm 'norm*' and the heads' 'bn_*'). Without the list
                                       fmjax's LARS excludes only params of ndim <= 1, and its
                                       2-D q/k/v biases would decay.
  lr_scaling='linear', warmup_mode='linear', min_lr=0, decay='cosine'
                                       schedules.learning_schedule: base_lr * batch / 256, step /
                                       W during W warm-up steps, then cosine to 0.
  The heads (projector, predictor): Linear(bias) -> BatchNorm (batch statistics, per view, for
  the target too) -> ReLU -> Linear(no bias); loss l(p1, z2') + l(p2, z1') averaged over the
  batch (in [0, 8]); EMA tau = 1 - (1 - base) (1 + cos(pi k / K)) / 2 applied after the update.
"""
from configs import common

IMAGENET_TRAIN = 1281167
# utils/optimizers.py exclude_bias_and_norm on fmjax's names: biases, LayerNorms ('norm',
# 'norm1', 'norm2', under any prefix) and the heads' BatchNorm params.
BYOL_LARS_EXCLUDE = (r"bias$", r"norm", r"(^|/)bn_\d+_(scale|bias)$")


def get_config(arg: str = "default"):
    c = common.base_config()
    c.objective = dict(
        name="byol", projector_hidden_dim=4096, predictor_hidden_dim=4096, projection_dim=256,
        base_target_ema=0.996, target_init="independent", bn_eps=1e-5, head_init="lecun_normal")
    # The reference's optimizer (configs/byol.py of deepmind-research/byol, 1000 epochs).
    c.optimizer.update(dict(name="lars", lr_scaling="linear", blr=0.2, momentum=0.9,
                            trust_coefficient=1e-3, weight_decay=1.5e-6, min_lr=0.0, decay="cosine",
                            warmup_mode="linear", lars_exclude=BYOL_LARS_EXCLUDE,
                            lars_lr_in_momentum=False, clip_norm=0.0))
    if arg in ("default", "cpu"):
        c.total_steps = 600
        c.batch_size = 64
        c.log_every = 25
        c.eval_every = 300
        c.checkpoint_every = 300
        c.data.name = "fmjax_shapes/32"
        c.data.image_size = 32
        c.objective.update(dict(projector_hidden_dim=512, predictor_hidden_dim=512, projection_dim=128,
                                base_target_ema=0.99))
        # LARS moves each weight by about lr * eta * |w| per step: at batch 64 the reference's
        # base lr 0.2 gives 1e-5 |w|, too little for a CPU budget; 2.0 is the CPU setting.
        c.optimizer.update(dict(blr=2.0, warmup_steps=60, weight_decay=1e-5))
        c.data.pp_train = "two_views(32, recipe='byol')|keep('global_crops')"
        c.data.pp_eval = "normalize('imagenet')|keep('image', 'label')"
        c.model = dict(name="vit", variant="S/8", width=128, depth=4, num_heads=4, mlp_dim=512,
                       drop_path=0.0, pool="mean", stem="patch")
        c.evals = dict(
            knn=dict(type="knn", split="validation", examples=1000, train_split="train",
                     train_examples=2000, k=20, temperature=0.07),
            fewshot=dict(type="fewshot", split="validation", examples=1000, train_split="train",
                         train_examples=2000),
            images=dict(type="images", split="validation"),
        )
        if arg == "cpu":  # the default on the simple shapes' silhouettes, with rot90 views
            c.data.name = "fmjax_shapes/simple_32"
            c.total_steps = 6000
            c.eval_every = 2000
            c.checkpoint_every = 2000
            # AdamW (MoCo v3's optimizer for ViTs) instead of LARS: see the docstring.
            c.optimizer = common.base_config().optimizer
            c.optimizer.update(dict(name="adamw", lr_scaling="linear", blr=2e-3, weight_decay=0.05,
                                    min_lr=1e-5, warmup_steps=300))
            c.data.pp_train = ("silhouette|two_views(32, recipe='byol', scale=(0.4, 1.0), rot90=True)|"
                               "keep('global_crops')")
            c.data.pp_eval = "silhouette|normalize('imagenet')|keep('image', 'label')"
    elif arg == "vit_b16_imagenet":
        epochs = 300
        c.batch_size = 4096
        steps_per_epoch = IMAGENET_TRAIN // c.batch_size
        c.total_steps = epochs * steps_per_epoch
        common.imagenet_data(c, 224)
        c.data.pp_train = "two_views(224, recipe='byol')|keep('global_crops')"
        c.optimizer = common.base_config().optimizer
        c.optimizer.update(dict(name="adamw", lr_scaling="linear", blr=1.5e-4, b1=0.9, b2=0.999,
                                weight_decay=0.1, decay_all=True, min_lr=0.0, decay="cosine", warmup_mode="linear",
                                warmup_steps=40 * steps_per_epoch, clip_norm=0.0))
        c.model = dict(name="vit", variant="B/16", drop_path=0.0, pool="cls", attention_impl="xla",
                       remat="none", scan_layers=False)
        common.ssl_imagenet_run(c, steps_per_epoch, images=dict(split="validation"))
    elif arg == "resnet50_imagenet":   # BYOL's own (docstring); the optimizer is the shared one above
        c.batch_size = 4096
        steps_per_epoch = IMAGENET_TRAIN // c.batch_size
        c.total_steps = 1000 * steps_per_epoch
        c.optimizer.warmup_steps = 10 * steps_per_epoch
        common.imagenet_data(c, 224)
        c.data.pp_train = "two_views(224, recipe='byol')|keep('global_crops')"
        c.model = dict(name="resnet", variant="50", zero_init_residual=True, remat="none")
        common.ssl_imagenet_run(c, steps_per_epoch, images=dict(split="validation"))
    else:
        raise ValueError(f"Unknown configs/byol.py preset {arg!r}; valid: default, cpu, vit_b16_imagenet, "
                         "resnet50_imagenet.")
    return c
