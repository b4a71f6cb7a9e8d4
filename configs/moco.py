"""MoCo v3: momentum contrast with a predictor, symmetric InfoNCE (and MoCo v2's queue as an option).

Default (bundled coloured shapes, two 32px views, a small ViT, CPU-sized):
    python launch/train.py --config=configs/moco.py --workdir=/tmp/moco
  Measured 2026-12-02 (600 steps; 2-core CPU SHARED with 1-2 other jobs for the whole run:
  9.0 min wall at ~1.3-1.8 steps/s; alone ~3.3 steps/s, i.e. ~3.5 min): the loss falls 3.33
  (ln 64 x 2T x 2 terms, at init) -> 3.05 (step 25) -> 2.79 (100) -> 2.40 (200) -> 2.33-2.65
  (400-600), and the views grid (images/images_views_*.png: view 1, view 2, and the view 2
  whose key is nearest to view 1's query) is written. As DINO's default, the kNN on the shape
  label does not beat the random init on the coloured shapes: 0.182 (step 0) -> 0.168 (300)
  -> 0.162 (600) (chance 0.125): the views share colour, background and position, which is
  what an instance-discrimination loss learns there. tests/objectives/test_moco.py runs its
  first 200 steps (slow): mean loss of steps 10-20 3.11 -> 2.58 over steps 160-200.

CPU recipe that learns (silhouettes of the shapes, rot90 views; configs/dino.py:cpu's idea):
    python launch/train.py --config=configs/moco.py:cpu --workdir=/tmp/moco_cpu
    python launch/eval.py --config=configs/moco.py:cpu --random_init_seeds=8 --evals=knn \
        --out=/tmp/moco_cpu_random.json                      # the baseline
  What changed against the default: fmjax_shapes/simple_32 as `silhouette`s (same labels and
  splits), every view turned by a random multiple of 90 degrees (two_views rot90=True), 3000
  steps, warm-up 150, kNN every 1000. Nothing else (same model, heads, lr, T, momentum).
  Measured 2026-12-02 (18.8 min wall, the first third shared with another job; alone ~4.7
  steps/s, i.e. ~11 min of steps plus compile and 4 evals): base-encoder kNN top-1
  (eval/knn_top1, validation, k 20, 1000 examples against 2000 train)
      0.756 (step 0) -> 0.799 (1000) -> 0.847 (2000) -> 0.870 (3000)
  vs the best of 8 random initialisations 0.772 (mean 0.757, worst 0.748): +0.098, target
  +0.05 (already +0.075 at step 2000). 10-shot ridge (eval/fewshot_10shot_top1) 0.434 ->
  0.530 -> 0.599 -> 0.634; loss 3.32 (step 25) -> 2.99 (1000) -> 2.78-2.94 (2000-3000).

MoCo v2's queue on the same recipe (objective.queue_size > 0; a multiple of the keys enqueued
per step, 2 x batch_size with the symmetric loss; 4096 = the keys of the last 32 steps):
    python launch/train.py --config=configs/moco.py:cpu_queue --workdir=/tmp/moco_cpu_queue
  Measured 2026-12-05 (14.3 min wall, ~4 steps/s, the second half shared with short test
  runs): base-encoder kNN top-1 (eval/knn_top1, as above) 0.756 (step 0) -> 0.807 (1000) ->
  0.865 (2000) -> 0.875 (3000) vs the best of 8 random initialisations 0.772 (the cpu
  preset's baseline: the same model and evaluation): +0.103, target +0.05 (0.870 without the
  queue). 10-shot ridge 0.434 -> 0.586 -> 0.626 -> 0.668 (0.634 without); the loss (each
  query against its key, the other batch keys and the 4096 queued ones) 6.65 (step 25) ->
  6.34 (1000) -> 6.07-6.28 (2400-3000). The queue's updates, wrap-around, sharding and exact
  resume are tested in tests/objectives/test_moco.py.

Paper presets (facebookresearch/moco-v3 CONFIG.md, ViT 300 epochs, batch 4096, AdamW,
lr 1.5e-4 x batch / 256, wd 0.1, warm-up 40 epochs, T 0.2, m 0.99 with the cosine to 1,
--stop-grad-conv1; needs `imagenet2012` in TFDS):
    python launch/train.py --config=configs/moco.py:vit_s16_imagenet --workdir=DIR
    python launch/train.py --config=configs/moco.py:vit_b16_imagenet --workdir=DIR
  Expected (README / CONFIG.md, linear probe on ImageNet-1k with main_lincls.py): 73.2 (ViT-S/16),
  76.7 (ViT-B/16); end-to-end fine-tuning 81.4 / 83.2.
    python launch/train.py --config=configs/moco.py:resnet50_imagenet --workdir=DIR
  `resnet50_imagenet`: CONFIG.md's ResNet-50 100-epoch command (main_moco.py defaults plus
  --moco-m-cos --crop-min=.2): torchvision's ResNet-50 with zero_init_residual
  (fmjax.models.resnet; SyncBN = BatchNorm over the global batch, base and momentum encoders
  each with their own running statistics), LARS (momentum 0.9, trust 1e-3, no decay or
  adaptation for <= 1-D params: fmjax's 'lars') at lr 0.6 x B/256 = 9.6, weight decay 1e-6,
  10 warm-up epochs then cosine, batch 4096, T 1.0, m 0.99 -> 1, a 2-layer projector with
  a last BN without affine, a 2-layer predictor without a last BN (MoCo_ResNet); expected
  68.9% linear top-1 (README: 100 epochs); 300 / 1000 epochs: --config.total_steps and lr 0.3
  (1000: wd 1.5e-6, m 0.996), 72.8 / 74.6%. MoCo v2's queue (65,536 keys) is
  --config.objective.queue_size=65536 with symmetric=False, predictor_layers=0, scale_2t=False
  (v2 also shuffled per-GPU BatchNorm, which global statistics make unnecessary). The queue
  option itself also runs on a ViT (cpu_queue, tests).

Reference options (every preset; tests/reference/test_moco_trajectory.py runs main_moco.py's
step beside fmjax's for 27 steps):
  model.pos_embed='sincos_moco'   vits.py build_2d_sincos_position_embedding: fixed, and NOT
                                  MAE's table ('sincos'): torch.meshgrid's 'ij' indexing puts the
                                  row in the first half and the column in the second.
  optimizer.frozen=('backbone/patch_embed/.*',)
                                  --stop-grad-conv1: the random patch projection stays fixed (no
                                  update, no weight decay, no Adam state: torch's requires_grad=False).
  optimizer.decay_all=True        torch.optim.AdamW(model.parameters()): one group, every param
                                  decays (biases, LayerNorm and BN affine params, cls_token).
  optimizer.min_lr=0, warmup_mode='linear'
                                  adjust_learning_rate per iteration: lr * step / warmup, then the
                                  half-cycle cosine to 0.
  objective.param_init='reference' cls_token ~ N(0, 1e-6) (vits.py), the heads' Linear layers with
                                  torch's default init (the ViT's own init already equals vits.py's:
                                  xavier_uniform per q / k / v and on the patch projection).
  pool='cls'                      timm VisionTransformer's forward_features (the class token).
"""
from configs import common

IMAGENET_TRAIN = 1281167


def get_config(arg: str = "default"):
    c = common.base_config()
    c.objective = dict(
        name="moco", dim=256, mlp_dim=4096, projector_layers=3, predictor_layers=2,
        predictor_last_bn="plain", temperature=0.2, momentum=0.99, momentum_cos=True,
        symmetric=True, scale_2t=True, queue_size=0, param_init="reference")
    c.optimizer.update(dict(name="adamw", lr_scaling="linear", blr=1.5e-4, b1=0.9, b2=0.999,
                            eps=1e-8, weight_decay=0.1, min_lr=0.0, warmup_mode="linear",
                            decay_all=True, frozen=("backbone/patch_embed/.*",)))
    reference_model = dict(pos_embed="sincos_moco", pool="cls")
    if arg in ("default", "cpu", "cpu_queue"):
        c.total_steps = 600
        c.batch_size = 64
        c.log_every = 25
        c.eval_every = 300
        c.checkpoint_every = 300
        c.data.name = "fmjax_shapes/32"
        c.data.image_size = 32
        c.objective.update(dict(dim=128, mlp_dim=512))
        c.optimizer.update(dict(blr=5e-3, warmup_steps=60))
        views = "two_views(32, recipe='byol')"
        c.data.pp_train = f"{views}|keep('global_crops')"
        c.data.pp_eval = "normalize('imagenet')|keep('image', 'label')"
        c.model = dict(name="vit", variant="S/8", width=128, depth=4, num_heads=4, mlp_dim=512,
                       drop_path=0.0, stem="patch", **reference_model)
        c.evals = dict(
            knn=dict(type="knn", split="validation", examples=1000, train_split="train",
                     train_examples=2000, k=20, temperature=0.07),
            fewshot=dict(type="fewshot", split="validation", examples=1000, train_split="train",
                         train_examples=2000),
            images=dict(type="images", split="validation", pp=c.data.pp_train),
        )
        if arg in ("cpu", "cpu_queue"):
            c.data.name = "fmjax_shapes/simple_32"
            c.total_steps = 3000
            c.eval_every = 1000
            c.checkpoint_every = 1000
            c.optimizer.warmup_steps = 150
            views = "silhouette|two_views(32, recipe='byol', rot90=True)"
            c.data.pp_train = f"{views}|keep('global_crops')"
            c.data.pp_eval = "silhouette|normalize('imagenet')|keep('image', 'label')"
            c.evals.images.pp = c.data.pp_train
            if arg == "cpu_queue":
                c.objective.queue_size = 4096   # 32 steps of 2 x 64 keys
    elif arg in ("vit_s16_imagenet", "vit_b16_imagenet"):
        small = arg.startswith("vit_s")
        epochs, warmup_epochs = 300, 40
        c.batch_size = 4096
        steps_per_epoch = IMAGENET_TRAIN // c.batch_size       # drop_last=True
        c.total_steps = epochs * steps_per_epoch
        common.imagenet_data(c, 224)
        # main_moco.py: BYOL's asymmetric pair (blur 1.0 / 0.1, solarize 0 / 0.2), crop-min 0.08.
        c.data.pp_train = "two_views(224, recipe='byol', scale=(0.08, 1.0))|keep('global_crops')"
        c.optimizer.update(dict(warmup_steps=warmup_epochs * steps_per_epoch))
        c.model = dict(name="vit", variant="S/16" if small else "B/16", drop_path=0.0,
                       attention_impl="xla", remat="none", scan_layers=False, **reference_model)
        common.ssl_imagenet_run(c, steps_per_epoch, keep_epochs=50, images=dict(
            split="validation", pp="two_views(224, recipe='byol')|keep('global_crops')"))
    elif arg == "resnet50_imagenet":   # CONFIG.md's ResNet-50, 100 epochs (docstring)
        c.batch_size = 4096
        steps_per_epoch = IMAGENET_TRAIN // c.batch_size
        c.total_steps = 100 * steps_per_epoch
        common.imagenet_data(c, 224)
        c.data.pp_train = "two_views(224, recipe='byol', scale=(0.2, 1.0))|keep('global_crops')"
        c.optimizer = common.base_config().optimizer
        c.optimizer.update(dict(name="lars", lr_scaling="linear", blr=0.6, momentum=0.9,
                                trust_coefficient=1e-3, weight_decay=1e-6, min_lr=0.0, decay="cosine",
                                warmup_mode="linear", warmup_steps=10 * steps_per_epoch, clip_norm=0.0))
        c.objective.update(dict(projector_layers=2, predictor_layers=2, predictor_last_bn="none",
                                temperature=1.0, momentum=0.99, momentum_cos=True))
        c.model = dict(name="resnet", variant="50", zero_init_residual=True, remat="none")
        common.ssl_imagenet_run(c, steps_per_epoch, keep_epochs=10, images=dict(
            split="validation", pp="two_views(224, recipe='byol')|keep('global_crops')"))
    else:
        raise ValueError(f"Unknown configs/moco.py preset {arg!r}; valid: default, cpu, cpu_queue, "
                         "vit_s16_imagenet, vit_b16_imagenet, resnet50_imagenet.")
    return c
