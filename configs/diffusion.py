"""Diffusion: DDPM training with a U-Net or DiT; DDPM / DDIM sampling with classifier-free guidance.

Default (bundled shapes, 32x32, class-conditional small DiT, CPU-sized):
    python launch/train.py --config=configs/diffusion.py --workdir=/tmp/diff
    python launch/sample.py --workdir=/tmp/diff            # PNG grids in /tmp/diff/samples/
  Measured (2-core CPU, ~3 steps/s): denoising MSE 0.8 -> ~0.03; after 1500 steps the
  conditional-generation accuracy (EMA samples, 25 DDIM steps, guidance 2) is 0.125, chance,
  scored by the configs/supervised.py default classifier (0.892 on real images; the older
  linear-stem classifier, 0.749 on real images, gave 0.195). Far from the 0.7 target: the
  samples are colour specks on a background, not shapes. The model barely uses the label yet
  (conditional and null-class MSE agree to 0.1%), and at t=400 its x0 estimate of a real
  image shows the background without the objects. Tried for 800 steps: label_init_std=1.0
  (conditional MSE 0.5-4% below the null class; no better samples) and cosine schedule +
  v-prediction + min-SNR-5 weighting (more object-like colour blobs; 0.145).

CPU recipe (issue 12: generation accuracy >= 0.5) - reached in 29.8 min:
    python launch/train.py --config=configs/supervised.py:simple --workdir=runs/classifier_simple_32
    python launch/train.py --config=configs/diffusion.py:cpu --workdir=/tmp/diff_cpu
  A small class-conditional U-Net (channels 32, mult (1, 2, 2), one res block per level,
  attention at 8x8, scale-shift (AdaGN) conditioning: resnet_time_scale_shift='scale_shift';
  ~1.2M params) on fmjax_shapes/simple_32 (the main object on a plain background), eps
  prediction with min-SNR-5 loss weighting (objective.loss_weighting='min_snr_gamma'), Adam
  1e-3 cosine to 1e-4, batch 64, 1800 steps; scored by the generation eval (16 EMA samples per
  class, 25 DDIM steps, guidance 5) with the classifier of configs/supervised.py:simple (0.941
  on real simple_32 validation images). config.xla_flags turns on YNNPACK's reduce fusion
  (--xla_cpu_experimental_ynn_fusion_type=reduce): XLA's own CPU reductions are the slow part
  of the U-Net's GroupNorms. Measured 2026-12-04 on the 2-core CPU, alone: 0.63 steps/s
  without it (--config.xla_flags=), 1.13 steps/s with it (1.8x; the same losses at steps 50 /
  100: 0.6405 / 0.1087); launch/benchmark.py 1.58 -> 0.86 s/step. (Other models: DiT, ViTs,
  ResNets within -12%..+4%, ConvNeXt 23% slower, so it is this preset's flag, not a default.)
    This preset, 2026-12-04: generation accuracy 0.141 (step 0) -> 0.352 (900) -> 0.539 (1800);
      29.8 min wall clock from the command to the final metrics (compile, 3 evals); per class at
      1800: ring 1.00, square 0.88, heart 0.81, triangle 0.56, cross 0.44, hexagon 0.38, star
      0.25, circle 0.00 (circles come out as blobs the classifier calls something else).
    Before the flag (2026-12-01, the same recipe): 0.141 -> 0.328 (900) -> 0.547 (1800) in 32.7
      min; 2500 steps 0.570; 1500 steps (another day, 0.74-0.83 steps/s) 0.406 in 35.5 min.
  What made the difference, against the first version of this preset (additive time
  embedding, plain eps-MSE, guidance 2; 0.133 at step 1250, 0.250 at 2500): AdaGN, min-SNR-5
  and guidance 5 together, changed at once. The old run's checkpoint sampled with more
  guidance gave 0.27 (guidance 4) and 0.34 (guidance 7), and 100 DDIM steps did not help (0.21
  at guidance 4), so most of the gain is the training change. A DiT-S/4 (the default's model)
  on the same data: 0.156 at step 1500 of 4500 (patch-sized colour specks).

LoRA for a class the base never saw (issue 18; measured below):
    python launch/train.py --config=configs/supervised.py:simple --workdir=/tmp/classifier_simple_32
    python launch/train.py --config=configs/diffusion.py:cpu --workdir=/tmp/diff_base \
        --config.data.exclude_classes=heart \
        --config.evals.generation.classifier_workdir=/tmp/classifier_simple_32
    python launch/train.py --config=configs/diffusion.py:lora --workdir=/tmp/diff_lora \
        --config.model_init.workdir=/tmp/diff_base \
        --config.evals.generation.classifier_workdir=/tmp/classifier_simple_32
  The base is the cpu recipe without the heart class (config.data.exclude_classes; 1800 steps,
  29 min alone): generation accuracy 0.484 (0.554 over its 7 classes; heart 0.000, and circle
  0.000 as in every run here). The lora preset loads the base's EMA weights as its frozen params
  (model_init.mapping='extra/ema:') and trains 400 steps on every class with each heart
  example listed 7 times per pass (config.data.repeat_classes='heart:7': about half of every
  batch is the new class): rank-8 LoRA on the U-Net's attention (query / key / value / out),
  every resnet's time_emb_proj (AdaGN's scale-shift of the time + class embedding) and its
  conv1 / conv2 (PEFT's Conv2d LoRA through the conv injection point), and beside it, trained
  whole, every bias and norm scale (as BitFit), the time-embedding MLP and the class-embedding
  table (the new row at 10x the lr): 13.70% of the params train. The scorer is the
  configs/supervised.py:simple classifier (0.941 on real images).
    Measured 2026-12-06 (12.9 min wall alone, 3 generation evals): heart 0.000 -> 0.375 (200)
      -> 0.4375 (400), overall 0.484 -> 0.516 -> 0.477 (cross 0.31 -> 0.13 and triangle 0.94
      -> 0.75 lose what heart gains); with --config.seed=1: heart 0.000 -> 0.375 -> 0.4375,
      overall 0.484 -> 0.602 -> 0.539. The runs below are one seed each. In 10.5 min (--config.total_steps=300
      --config.eval_every=150 --config.checkpoint_every=150 --config.optimizer.warmup_steps=30):
      heart 0.000 -> 0.0625 (150) -> 0.25 (300), overall 0.469. Without the repeats (the same
      preset with --config.data.repeat_classes=): heart 0.000 -> 0.0625 (200) -> 0.25 (400),
      overall 0.461 -> 0.555 (the other classes keep more).
  What did not learn the heart (heart 0.000 at 200 and 400 steps in each; the 1200-step base
  at 0.289 unless said): LoRA on the attention and time_emb_proj alone, training only the class
  row beside it (3.13% of the params; overall 0.289 -> 0.383); on hearts alone
  (--config.data.classes=heart: the other classes fall apart, 0.289 -> 0.180, as label dropout
  retrains the unconditional branch on hearts alone); rank 32 (11.2%); LoRA on conv1 / conv2
  too (11.6%); 5x the lr; the 1800-step base with those conv targets (0.484 -> 0.469); the
  1800-step base with half of every batch on hearts but no biases / norms trained (0.484 ->
  0.469). At step 0 the heart row of the samples is pure noise (its N(0, 1) class-embedding row
  is off the trained rows' distribution); under those runs it became small blobs the scorer
  does not call hearts. Full fine-tuning (--config.adapter.name=, the 1200-step base, no
  repeats) drew 3 of 16 (0.1875) at 400 steps, overall 0.367: the norms and biases that full
  fine-tuning also trains are what LoRA lacked.

Text-conditional (the CLIP text tower, trained jointly, on the shapes captions):
    python launch/train.py --config=configs/diffusion.py:text --workdir=/tmp/diff_text

Paper presets (need the dataset in TFDS):
    python launch/train.py --config=configs/diffusion.py:ddpm_cifar10 --workdir=DIR
  Ho et al. 2020: unconditional CIFAR-10, 35.7M-param U-Net, Adam 2e-4, batch 128, warmup 5000,
  clip 1.0, dropout 0.1, EMA 0.9999, 800k steps, fixed_large DDPM sampling; FID 3.17.
    python launch/train.py --config=configs/diffusion.py:dit_b2_imagenet256 --workdir=DIR
  Peebles & Xie 2023 recipe for DiT-B/2 (AdamW 1e-4, no weight decay, batch 256, EMA 0.9999,
  label dropout 0.1, 400k steps). fmjax has no VAE yet, so instead of 32x32x4 SD-VAE latents
  of 256px images this preset trains on 32x32 RGB ImageNet images: the same token count
  (256) and compute per step as the paper's model, but not its FID. Like the reference
  (tests/reference/test_diffusion_trajectory.py) it sets objective.schedule_precision='float64'
  (sqrt(a_t), sqrt(1 - a_t) of q_sample from float64 tables, cast to float32) and
  objective.ema.mode='constant' (EMA decay 0.9999 from the first step, no warm-up) and
  model.freq_precision='float32' (the timestep frequencies' exponent rounded in float32).

Defaults elsewhere: objective.schedule_precision='float32' (diffusers' float32 tables, what
tests/diffusion/test_process_parity.py checks) and objective.ema.mode='diffusers' (EMAModel's
decay with its warm-up, (1+s)/(10+s) unless use_ema_warmup). The model does not learn sigma
(no VB term; DiT's learn_sigma=True adds one), so the preset trains the eps-MSE only.

Reference notes (issue 12; the trajectory tests in tests/reference/):
- objective.schedule_precision='float64' (the DiT preset) also builds the DDPM sampler's
  posterior coefficients (mean coefficients, variance, clipped log variance, sqrt(1/a_t),
  sqrt(1/a_t - 1)) in float64 NumPy on the host, as guided-diffusion's / DiT's GaussianDiffusion
  (for respaced chains as its SpacedDiffusion), cast to float32 at use
  (fmjax.diffusion.sampling.posterior_coefficients); the chain's last step then adds no noise.
  With the default 'float32' they are diffusers' float32 ones, up to 4.4e-4 relative off the
  float64 tables at t <= 10 (tests/diffusion/test_posterior_float64.py). DDIM uses the (cast)
  alphas_cumprod either way.
- The DDPM U-Net as diffusers' examples/unconditional_image_generation/train_unconditional.py
  trains it (tests/reference/test_unet_trajectory.py: loss, params and EMA agree to 8e-7 relative
  over 25 steps): on top of ddpm_cifar10 (which follows Ho et al., not the script) set
    optimizer: name='adamw', lr=1e-4, b1=0.95, b2=0.999, eps=1e-8, weight_decay=1e-6,
      decay_all=True (default False: biases, norms and < 2-D params get no decay),
      decay='cosine', min_lr=0.0, warmup_steps=500, warmup_mode='linear' (its LambdaLR: lr 0
      at the first step, s/W), clip_norm=1.0, clip_eps=1e-6 (torch's clip_grad_norm_ factor
      1/(norm + 1e-6); default 0.0: optax's clip_by_global_norm);
    objective.ema: mode='diffusers', decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3/4;
    model: the UNet2DModel layout via fmjax.interop.diffusers_unet.unet_kwargs_from_diffusers_config
      (dropout 0), with freq_precision='float32' (diffusers' float32 timestep frequencies;
      default 'float64').
"""
from configs import common


# The classifier that scores the cpu preset's samples (configs/supervised.py:simple, trained
# on fmjax_shapes/simple_32); override with --config.evals.generation.classifier_workdir=DIR.
CPU_CLASSIFIER_WORKDIR = "runs/classifier_simple_32"


# configs/diffusion.py:lora: LoRA's layers in the U-Net, and the params trained whole beside it
LORA_TARGETS = r"attn/(query|key|value|out)$|time_emb_proj$|conv(1|2)$"
LORA_TRAIN = ("model/.*/(bias|scale)", "model/time_embedding/.*", "model/class_embedding/embedding")


def get_config(arg: str = "default"):
    c = common.base_config()
    c.objective = dict(
        name="diffusion", conditioning="class", schedule="linear", num_timesteps=1000,
        beta_start=1e-4, beta_end=0.02, schedule_precision="float32", prediction_type="epsilon",
        loss_weighting="none", snr_gamma=5.0, cond_drop_prob=0.1, text_lock=False,
        ema=dict(mode="diffusers", decay=0.9999, min_decay=0.0, update_after_step=0,
                 use_ema_warmup=False, inv_gamma=1.0, power=2 / 3),
        sample=dict(sampler="ddim", num_steps=50, eta=0.0, spacing="leading",
                    variance_type="fixed_small", guidance_scale=1.0, clip_sample=True))
    c.optimizer.update(dict(name="adam", lr=2e-4, warmup_steps=5000, clip_norm=1.0,
                            decay="constant", weight_decay=0.0))
    norm = "normalize('half')"   # pixels to [-1, 1]
    if arg in ("default", "text", "cpu", "lora"):
        c.total_steps = 2400
        c.batch_size = 64
        c.log_every = 50
        c.eval_every = 1000
        c.checkpoint_every = 500
        c.data.name = "fmjax_shapes/32"
        c.data.image_size = 32
        c.data.normalization = "half"
        c.optimizer.update(dict(lr=1e-3, warmup_steps=200, decay="cosine", min_lr=1e-4))
        c.objective.ema.update(dict(decay=0.999, use_ema_warmup=True, power=3 / 4))
        c.objective.sample.update(dict(num_steps=25, guidance_scale=2.0))
        # A DiT with patch 4 (64 tokens) runs ~3 steps/s on 2 CPU cores; a U-Net of similar
        # size (channels 16-32) was 2-7x slower per step there. The U-Net is the
        # ddpm_cifar10 preset's model (and --config.model.name=unet works here too).
        c.model = dict(name="dit", variant="S/4", width=128, depth=4, num_heads=4, mlp_dim=512,
                       num_classes=_num_shape_classes(), label_init_std=0.02)
        c.data.pp_train = f"flip_lr|{norm}|keep('image', 'label')"
        c.data.pp_eval = f"{norm}|keep('image', 'label')"
        c.evals = dict(samples=dict(type="images", split="validation"))
        if arg in ("cpu", "lora"):  # the default on the simple shapes, longer, scored (see the docstring)
            c.data.name = "fmjax_shapes/simple_32"
            c.total_steps = 1800
            c.eval_every = 900
            c.checkpoint_every = 500
            # AdaGN (scale-shift conditioning, improved DDPM / ADM) + min-SNR-5 loss weighting
            # + guidance 5: 0.445 at step 1250 where the plain U-Net (additive time embedding,
            # eps-MSE, guidance 2) had 0.133 (see the docstring).
            c.model = dict(name="unet", channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                           attention_resolutions=(8,), num_groups=8, dropout=0.0, sample_size=32,
                           resnet_time_scale_shift="scale_shift", num_classes=_num_shape_classes())
            c.objective.loss_weighting = "min_snr_gamma"
            c.objective.sample.guidance_scale = 5.0
            # XLA's CPU reductions are slow on the U-Net's GroupNorms; YNNPACK's reduce fusion
            # runs its step 1.8x faster (benchmark: 1.58 -> 0.86 s/step, same loss; see the docstring).
            c.xla_flags = "--xla_cpu_experimental_ynn_fusion_type=reduce"
            c.evals.generation = dict(type="generation", split="validation",
                                      classifier_workdir=CPU_CLASSIFIER_WORKDIR, samples_per_class=16,
                                      examples=1000, batch_size=128)
        if arg == "lora":  # LoRA on a cpu run's U-Net for a class its base never saw (docstring)
            # every class, the new one included: on the new class alone the other classes'
            # samples fall apart (label dropout retrains the unconditional branch on it alone);
            # each heart example 7 times per pass: about half of every batch is the new class
            c.data.classes = ""
            c.data.repeat_classes = "heart:7"
            c.total_steps = 400
            c.eval_every = 200
            c.checkpoint_every = 200
            c.optimizer.update(dict(lr=1e-3, warmup_steps=40, decay="cosine", min_lr=1e-4))
            # the base's EMA weights (what its samples come from) are the frozen params
            c.model_init.mapping = "extra/ema:"
            # rank-8 LoRA on the attention (8x8 and the middle block), every resnet's time / class
            # modulation (AdaGN's scale-shift) and its two 3x3 convolutions; trained beside it:
            # the new class's embedding row (its other rows get no gradient: no weight decay
            # here), the time-embedding MLP and every bias and norm scale (as BitFit)
            c.adapter.update(dict(name="lora", rank=8, targets=LORA_TARGETS,
                                  train=LORA_TRAIN))
            # the new row starts at the embedding's N(0, 1) init: 10x the lr moves it in time
            c.optimizer.lr_mult = (("model/class_embedding/embedding", 10.0),)
        if arg == "text":
            c.objective.conditioning = "text"
            c.model.num_classes = 0
            c.objective.text = dict(vocab_size=259, context_length=32, width=64, depth=2, num_heads=4,
                                    mlp_dim=256, embed_dim=64, activation="gelu", pool="argmax")
            c.data.tokenize = dict(context_length=32, tokenizer="bytes")
            c.data.pp_train = f"flip_lr|{norm}|tokenize(32)|keep('image', 'tokens')"
            c.data.pp_eval = f"{norm}|tokenize(32)|keep('image', 'tokens', 'label')"
    elif arg == "ddpm_cifar10":
        c.objective.conditioning = "none"
        c.objective.sample.update(dict(sampler="ddpm", num_steps=1000, variance_type="fixed_large"))
        c.data.name = "cifar10"
        c.data.image_size = 32
        c.data.normalization = "half"
        c.data.pp_train = f"flip_lr|{norm}|keep('image')"
        c.data.pp_eval = f"{norm}|keep('image', 'label')"
        c.batch_size = 128
        c.total_steps = 800_000
        c.log_every = 100
        c.eval_every = 20_000
        c.checkpoint_every = 5000
        c.keep_period = 100_000
        c.model = dict(name="unet", variant="ddpm_cifar10", remat="none")  # the U-Net has no scan
        c.evals = dict(samples=dict(type="images", split="test", every=20_000))
    elif arg == "dit_b2_imagenet256":
        common.imagenet_data(c, 32)
        c.data.normalization = "half"
        c.data.pp_train = f"resize(32)|center_crop(32)|flip_lr|{norm}|keep('image', 'label')"
        c.data.pp_eval = f"resize(32)|center_crop(32)|{norm}|keep('image', 'label')"
        c.batch_size = 256
        c.total_steps = 400_000
        c.dtype = "bfloat16"
        c.optimizer.update(dict(name="adamw", lr=1e-4, weight_decay=0.0, warmup_steps=0,
                                clip_norm=0.0))
        # The reference's GaussianDiffusion tables (float64, cast) and update_ema (constant decay).
        c.objective.schedule_precision = "float64"
        c.objective.ema.mode = "constant"
        c.objective.sample.update(dict(sampler="ddpm", num_steps=250, guidance_scale=1.5))
        c.model = dict(name="dit", variant="B/2", num_classes=1000, freq_precision="float32",
                       remat="none", scan_layers=False)
        c.log_every = 100
        c.eval_every = 20_000
        c.checkpoint_every = 5000
        c.keep_period = 50_000
        c.evals = dict(samples=dict(type="images", split="validation", every=20_000))
    else:
        raise ValueError(f"Unknown configs/diffusion.py preset {arg!r}; valid: default, text, cpu, lora, ddpm_cifar10, "
                         "dit_b2_imagenet256.")
    return c


def _num_shape_classes() -> int:
    from fmjax.data import shapes
    return len(shapes.CLASS_NAMES)
