"""SimMIM: masked image modelling with a linear decoder and an L1 loss on the masked pixels.

Default (bundled shapes, 32 px, a small ViT with patch 4 - 64 tokens, all of them encoded -
masked in 8-px squares, 60% of them; CPU-sized):
    python launch/train.py --config=configs/simmim.py --workdir=/tmp/simmim
  Measured 2026-12-02, partial (the 2-core machine ran three other trainings the whole session,
  so the full run and its time are still to be measured alone): loss (masked L1 on normalised
  pixels) 0.54 (step 10) -> 0.36 (100) -> 0.34 (200) at ~0.5 steps/s shared; validation loss
  0.569 -> 0.436 after 30 steps; reconstructions in DIR/images/. A step costs about a DINO
  default step (65 tokens x 64 images), i.e. ~4 steps/s alone: 2000 steps ~ 8 min + evals.

CPU recipe (issue 16's gate: linear probe >= best of 8 random encoders + 0.03), 4000 steps:
    python launch/train.py --config=configs/simmim.py:cpu --workdir=/tmp/simmim_cpu
    python launch/eval.py --config=configs/simmim.py:cpu --random_init_seeds=8 --evals=probe,knn \
        --out=/tmp/simmim_random.json
  The 8 random encoders of this architecture (seeds 0-7, measured 2026-12-02): probe
  (eval/probe_top1, validation 1000, probe trained on 2000 train examples) best 0.194, mean
  0.185, worst 0.159; kNN best 0.145. Measured 2026-12-02 with the preset's earlier 8000-step
  length (lr decay at 6400; stopped at step 6100; 2-core CPU, 3.3-4.5 steps/s with short test
  runs beside it): probe 0.159 (step 0) -> 0.216 (2000) -> 0.232 (4000) -> 0.248 (6000), kNN
  0.129 -> 0.151 -> 0.161; validation loss 0.569 -> 0.267. So +0.038 over the best random
  encoder at step 4000 and +0.054 at 6000. The preset is now 4000 steps (decay at 3200) to fit
  30 minutes. Its own run (measured 2026-12-02, 16.6 min wall alone on the 2-core CPU, evals
  included): probe 0.159 -> 0.184 (1000) -> 0.216 (2000) -> 0.227 (3000) -> 0.232 (4000), kNN
  0.129 -> 0.157, validation loss 0.569 -> 0.267: +0.038 over the best random encoder (gate
  +0.03).

Paper preset (Xie et al. 2022, ViT-B/16, 800 epochs on ImageNet-1k; needs `imagenet2012` in TFDS):
    python launch/train.py --config=configs/simmim.py:vit_b16_imagenet --workdir=DIR
  microsoft/SimMIM configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml:
  224 px, mask patch 32, ratio 0.6, batch 2048, AdamW (0.9, 0.999) lr 1e-4 x batch / 512
  (= blr 5e-5 per 256), warm-up 10 epochs from 5e-7 x batch / 512, multistep decay x0.1 at
  epoch 700, weight decay 0.05, clip 5.0, drop path 0.1, layer scale 0.1, a shared relative
  position bias and no absolute one. Expected (paper, Table 1): 83.8 top-1 after fine-tuning.

Reference options (every preset): the training step is SimMIM's main_simmim.py, checked by
tests/reference/test_simmim_trajectory.py:
  optimizer.wd_groups='simmim_vit'   build_pretrain_optimizer: 1-D params and biases skip decay,
                                     plus ViT.no_weight_decay() = {pos_embed, cls_token}; the
                                     mask_token ([1, 1, D]) and the relative position tables
                                     (2-D) DECAY (only the Swin encoder adds mask_token to the skip list).
  optimizer.warmup_init              timm's warmup_lr_init (5e-7 x batch / 512 in the paper).
  optimizer.decay='multistep', milestones, gamma
                                     MultiStepLRScheduler: lr x gamma^(number of milestones <= t).
  optimizer.schedule_steps_per_epoch=1, schedule_epoch_lag=1
                                     lr_scheduler.step_update(t) runs AFTER optimizer.step(), so
                                     step t uses the schedule's value at t - 1 (steps 0 and 1 both
                                     use warmup_lr_init).
  optimizer.frozen=('.*/attn/key/bias',)
                                     BEiT's attention has q and v biases only: fmjax's key bias
                                     stays 0 (its gradient is rounding noise, which Adam would
                                     turn into lr-sized steps), and stays out of the clip norm.
  optimizer.clip_norm=5.0, clip_eps=1e-6
                                     torch.nn.utils.clip_grad_norm_ (max_norm / (norm + 1e-6)).

SimMIM on its own hierarchical backbone (issue 17; SimMIM's SwinTransformerForSimMIM), CPU-sized,
with issue 16's probe gate (best of 8 random encoders + 0.03):
    python launch/train.py --config=configs/simmim.py:swin --workdir=/tmp/simmim_swin
    python launch/eval.py --config=configs/simmim.py:swin --random_init_seeds=8 --evals=probe,knn \
        --out=/tmp/simmim_swin_random.json                  # the baseline
  Swin v1, patch 2 (16x16 grid), windows of 4, stages (2, 2, 2) x (32, 64, 128): 16 -> 8 -> 4
  grids, encoder stride 8; the mask token goes in after the patch norm, the 8-px masks are drawn
  on the 2-px patch grid, and the one-layer decoder maps each of the 4x4 final tokens to 8 x 8 x 3
  pixels; weight-decay groups 'swin'; 5000 steps, lr x0.1 from step 4000.
  The 8 random encoders (seeds 0-7, measured 2026-12-06): probe (eval/probe_top1) best 0.252,
  mean 0.230, worst 0.210; kNN best 0.167, mean 0.147. The preset's run (measured 2026-12-06,
  22.7 min wall alone on the 2-core CPU, ~3.9 steps/s, evals included): probe 0.241 (step 0)
  -> 0.258 (1000) -> 0.312 (2000) -> 0.332 (3000) -> 0.338 (4000) -> 0.332 (5000), i.e.
  +0.080 over the best random encoder at the end (gate +0.03); validation masked-pixel L1
  (eval/val_loss) 0.585 -> 0.284 -> 0.261 -> 0.255 -> 0.250 -> 0.248. The kNN does not move
  (0.150 -> 0.145 / 0.120 / 0.131 / 0.143 / 0.150, below the best random 0.167): the gain is
  linear, not in the nearest-neighbour geometry.
  Fine-tuning from it, SimMIM's own measure (configs/supervised.py:swin, the same Swin, 300 steps;
  scratch: without the two model_init flags):
    python launch/train.py --config=configs/supervised.py:swin --workdir=/tmp/ft_simmim_swin \
        --config.total_steps=300 --config.eval_every=150 --config.model_init.workdir=/tmp/simmim_swin \
        --config.model_init.mapping=params/backbone:
  (114 arrays loaded, the head fresh) eval/val_accuracy at step 150 / 300, seeds 0 / 1: from
  SimMIM 0.354 / 0.562 and 0.324 / 0.529; from scratch 0.365 / 0.555 and 0.264 / 0.479. At step
  300 both seeds favour SimMIM (+0.007, +0.050); two seeds are too few to call it a transfer gain.
  History: the first Swin preset (patch 4: 8x8 grid, encoder stride 16, each of the 2x2 final
  tokens decoding 16 x 16 pixels; 1500 steps, lr x0.1 from 1200; 2026-12-03, 3.3 min) learned
  to reconstruct (validation loss 0.604 -> 0.306) but its probe fell (0.197 -> 0.178, kNN 0.148
  -> 0.126): at a 16-px decoder stride on 32-px scenes the reconstruction is a blur the encoder
  learns without the shapes. Patch 2 on that short schedule (1500 steps, decay at 1200;
  2026-12-05) reached 0.252 (probe 0.241 -> 0.232 -> 0.258 -> 0.252 at 500-step evals), and
  300-step fine-tuning from it matched scratch (configs/supervised.py:swin; eval/val_accuracy at
  step 300, seeds 0 / 1: 0.538 / 0.510 from SimMIM, 0.555 / 0.479 from scratch). The probe gain
  came with the longer schedule: 0.312 by step 2000 once the lr is not cut at 1200.
  (The pp's simmim_mask must draw on the model's patch grid: the check phase says so in one line.)
"""
from configs import common

IMAGENET_TRAIN = 1281167


def _pp_train(image_size: int, mask_patch: int, model_patch: int, mask_ratio: float = 0.6) -> str:
    """SimMIM's augmentation, then its mask drawn in ``mask_patch`` squares on the model's patch grid."""
    return (f"random_resized_crop({image_size}, scale=(0.67, 1.0))|flip_lr|normalize('imagenet')|"
            f"simmim_mask({image_size}, {mask_patch}, {model_patch}, {mask_ratio})|keep('image', 'mask')")


def get_config(arg: str = "default"):
    c = common.base_config()
    c.objective = dict(name="simmim", mask_patch_size=32, mask_ratio=0.6)
    c.optimizer.update(dict(name="adamw", lr_scaling="linear", b1=0.9, b2=0.999, eps=1e-8,
                            weight_decay=0.05, wd_groups="simmim_vit", clip_norm=5.0, clip_eps=1e-6,
                            decay="multistep", milestones=(), gamma=0.1,
                            schedule_steps_per_epoch=1, schedule_epoch_lag=1,
                            frozen=(r".*/attn/key/bias",)))
    if arg in ("default", "cpu", "swin"):
        c.total_steps = 2000
        c.batch_size = 64
        c.log_every = 100
        c.eval_every = 1000
        c.checkpoint_every = 500
        c.data.name = "fmjax_shapes/32"
        c.data.image_size = 32
        c.objective.update(dict(mask_patch_size=8, mask_ratio=0.6))
        # blr 1e-3 per 256 (SimMIM's 1e-4 per 512 is for ViT-B at batch 2048), warm-up from 0,
        # decay x0.1 for the last 20% (the paper's 700 / 800).
        c.optimizer.update(dict(blr=1e-3, warmup_steps=100, warmup_init=0.0, milestones=(1600,)))
        c.model = dict(name="vit", variant="Ti/4", width=128, depth=4, num_heads=4, mlp_dim=512,
                       patch_size=4, pool="mean", drop_path=0.0, layerscale=0.1,
                       pos_embed="none", rel_pos_bias="shared")
        c.data.pp_eval = "normalize('imagenet')|keep('image', 'label')"
        ex, tr = 1000, 2000
        c.evals = dict(
            val_loss=dict(type="loss", split="validation", examples=ex),
            probe=dict(type="linear_probe", split="validation", examples=ex, train_split="train",
                       train_examples=tr),
            knn=dict(type="knn", split="validation", examples=ex, train_split="train", train_examples=tr),
            images=dict(type="images", split="validation"),
        )
        if arg == "cpu":
            c.total_steps = 4000
            c.eval_every = 1000
            c.checkpoint_every = 1000
            c.optimizer.milestones = (3200,)
        if arg == "swin":  # SimMIM's own hierarchical backbone (SwinTransformerForSimMIM), CPU-sized
            c.total_steps = 5000
            c.eval_every = c.checkpoint_every = 1000
            c.optimizer.milestones = (4000,)
            c.optimizer.wd_groups = "swin"   # SimMIM-Swin: SwinTransformer's no_weight_decay lists
            # patch 2 (16x16 grid), windows of 4: 16 -> 8 -> 4 grids, encoder stride 8 (each final
            # token decodes 8x8 pixels); the masks are drawn on the same 2-px patch grid
            c.model = dict(name="swin", embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=4,
                           patch_size=2, drop_path=0.0)
        c.data.pp_train = _pp_train(32, 8, c.model.patch_size)   # masks on the model's patch grid
    elif arg == "vit_b16_imagenet":
        c.batch_size = 2048
        steps_per_epoch = IMAGENET_TRAIN // c.batch_size
        c.total_steps = 800 * steps_per_epoch
        common.imagenet_data(c, 224)
        c.data.pp_train = _pp_train(224, 32, 16)
        c.objective.update(dict(mask_patch_size=32, mask_ratio=0.6))
        # lr = 1e-4 * batch / 512 = blr 5e-5 per 256; warmup_lr 5e-7 * batch / 512.
        c.optimizer.update(dict(blr=5e-5, warmup_steps=10 * steps_per_epoch,
                                warmup_init=5e-7 * c.batch_size / 512,
                                milestones=(700 * steps_per_epoch,)))
        c.model = dict(name="vit", variant="B/16", pool="mean", drop_path=0.1, layerscale=0.1,
                       pos_embed="none", rel_pos_bias="shared", attention_impl="xla",
                       remat="none", scan_layers=False)
        c.dtype = "bfloat16"
        c.log_every = 100
        c.eval_every = 10 * steps_per_epoch
        c.checkpoint_every = 2000
        c.keep_period = 50 * steps_per_epoch
        c.evals = dict(images=dict(type="images", split="validation", every=c.eval_every))
    else:
        raise ValueError(f"Unknown configs/simmim.py preset {arg!r}; valid: default, cpu, swin, vit_b16_imagenet.")
    return c
