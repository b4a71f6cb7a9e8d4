"""DALL-E's discrete VAE (the BEiT / DALL-E visual tokenizer): gumbel-softmax relaxation,
logit-Laplace reconstruction, KL to a uniform prior, temperature and KL-weight schedules.

Default (bundled shapes, 32 px, a 3-group dVAE: 4x downsampling to 8x8 tokens of 512 codes;
CPU-sized):
    python launch/train.py --config=configs/dvae.py --workdir=/tmp/dvae
  Measured 2026-12-02 (1500 steps, 10.4 min wall on the 2-core CPU with short test runs beside
  it, ~2.5 steps/s): loss -1.07 (step 200) -> -1.46 (500) -> -1.50 (1000); hard-token
  reconstruction MSE (eval/recon_recon_mse) 0.0090 (500) -> 0.0065 (1000) -> 0.0062 (1500)
  against the patch-mean baseline's 0.0044: ratio 2.07 -> 1.49 -> 1.41 (the gate is 0.5);
  reconstruction PNGs in DIR/images/. It serves as configs/beit.py:cpu's tokenizer.
  Since 2026-12-04 the preset sets config.xla_flags (YNNPACK's reduce fusion): 1.33x faster
  steps on the 2-core CPU, the same learning (200 steps: ratio 8.45 -> 3.30 without, 3.37 with).

CPU recipe (the issue's gate: reconstructions from the HARD tokens with at most 0.5x the MSE of
the 1-token-per-patch mean baseline, every 4x4 patch replaced by its own mean colour; see
fmjax/objectives/dvae.py; eval/recon_recon_ratio is that ratio, PNGs in DIR/images/):
    python launch/train.py --config=configs/dvae.py:cpu --workdir=/tmp/dvae_cpu
  The default's model for 4000 steps, plus options beyond the paper (since 2026-12-06):
  the decoder reads the encoder's argmax codes (objective.straight_through='argmax', the
  relaxed sample's gradients) and a batch-level codebook-usage term
  (objective.diversity_weight=0.3), with the paper's KL weight per pixel value (6.6 / 192 per
  nat for 8x8 patches of 3 channels is 1.65 / 48 for 4x4 ones: kl_weight=1.65), at lr 2e-3
  (twice the default's); since 2026-12-07 the usage term averages softmax(logits / tau), which
  nears the argmax codes' histogram as tau anneals (objective.diversity_of='sharp').
  Measured 2026-12-07 on the 2-core CPU (26.7 min wall, 2.5 steps/s, alone):
  eval/recon_recon_ratio 8.21 (init) -> 0.824 (1000) -> 0.721 (2000) -> 0.685 (3000) -> **0.662**
  (4000), hard-token MSE 0.0029 against the baseline's 0.0044, 99% of the codes in a training
  batch in use. The 0.5 gate is NOT reached.
  With diversity_of='q' (the usage term on softmax(logits), the preset's until 2026-12-07;
  measured 2026-12-06, 27.1 min wall, alone but for a 1-minute profiling run in its first
  minutes): 0.804 (1000) -> 0.729 (2000) -> 0.710 (3000) -> 0.683 (4000), hard-token MSE 0.0030,
  67% of the codes in use. So codebook usage is not what holds the ratio up: every code in
  use gains 0.02. 1000-step ablations (the preset with --config.total_steps=1000
  --config.objective.kl_warmup_steps=100, 7.5 min each, alone, 2026-12-07): 'q' 1.82 (250) ->
  1.00 (500) -> 0.901 (750) -> 0.854 (1000); 'sharp' 1.45 -> 0.983 -> 0.871 -> 0.845.
  A coarser grid, the paper's 8x downsampling (--config.model.group_count=4: 4x4 tokens of 8x8
  pixels; --config.model.vocab_size=2048 --config.objective.kl_weight=6.6, the paper's weight
  for 8x8 patches; the 1000-step ablation, 7.6 min): 3.95 -> 1.44 (250) -> 0.906 (500) -> 0.803
  (750) -> 0.757 (1000), and 0.739 at 1000 with 'sharp'. A better ratio only because its
  baseline, 8x8 patch means (MSE 0.0090), is twice as poor: its hard-token MSE (0.0067) is
  1.8x the 4x4 grid's at the same step (0.0037) and its pictures lose the objects' colours, so the preset keeps 4x4
  patches. k-means oracles for 8x8 patches (as below): 512 centroids 0.526, 1024 0.473, 2048
  0.440, 8192 0.395.
  1024 codes with 'sharp' (the preset with --config.model.vocab_size=1024; 2026-12-07, 33.7 min
  alone, 1.9-2.2 steps/s, over the cpu budget): 0.848 (1000) -> 0.691 (2000) -> 0.647 (3000) ->
  0.629 (4000), hard-token MSE 0.0027, 88% of the codes in a training batch in use.
  With diversity_weight=0.1 (and 'q'; the preset's value until 2026-12-06 evening; 25.7 min
  alone): 0.840 / 0.739 / 0.721 / 0.701, 50% of the
  codes; 1.0 gives 0.812 at step 1000 (0.3: 0.804). The same recipe at lr 1e-3 and diversity
  0.1 (--config.optimizer.lr=1e-3 --config.objective.diversity_weight=0.1; the preset's lr until
  2026-12-06; 30.5 min wall, the first ~9 shared with a test run): 0.895 (1000) -> 0.787
  (2000) -> 0.764 (3000) -> 0.745 (4000), 51% of the codes. The tokens beat the patch means
  (shapes, rings and dots are drawn, with some wrong colours at their edges; the textured
  backgrounds come out smooth), but the 0.5 gate is NOT reached. Every ablation below ran at
  lr 1e-3 and diversity_weight 0.1 ("the preset" there is the preset with
  --config.optimizer.lr=1e-3 --config.objective.diversity_weight=0.1).
  Why the options (1000-step runs, the default otherwise, 500 validation images, 2026-12-06):
      the paper's relaxation, kl_weight 6.6 (the default's recipe; an earlier day):
          3.23 (250) -> 2.39 (500) -> 2.01 (750) -> 1.95 (1000), 48% of the codes;
      the relaxation, kl_weight 1.65: the argmax codes collapse onto 1 code by step 100
          (ratio 12.0 at 250) - the relaxed sample's non-argmax tail carries the picture;
      the relaxation, kl_weight 0: 1 code in use from step 100 (q confident, KL 5.5 nats), 9.39;
      straight_through='sample', kl_weight 6.6: q stays near uniform (KL 0.4-0.7 of ln 512 =
          6.24 nats): 3.47 (250) -> 3.41 (500);
      straight_through='sample', kl_weight 1.65: 2-15 codes in use, 8.69 at 250;
      straight_through='argmax', diversity 0.1, kl_weight 0: 2.21 (250) -> 1.39 (500) -> 1.14
          (750) -> 1.09 (1000), 44% of the codes;
      the same with kl_weight 1.65 (the preset's): 2.00 at 250 (stopped to run the preset).
  A wider model at the same wall time (2026-12-06; the preset with --config.model.n_hid=64
  --config.total_steps=2000 --config.objective.kl_warmup_steps=200, 23.5 min alone, 1.5 steps/s):
  1.016 (500) -> 0.831 (1000) -> 0.778 (1500) -> 0.765 (2000), 41% of the codes: better per
  step than the preset (0.895 at its step 1000) but not per minute (0.745).
  1024 codes (the preset with --config.model.vocab_size=1024; 2026-12-06, ~31 min alone, 2.2
  steps/s): 8.33 -> 0.901 (1000) -> 0.763 (2000) -> 0.727 (3000) -> 0.705 (4000), 35% of the
  codes in use: a little better than 512 codes at each eval, far from 0.5. At lr 2e-3 (and
  diversity 0.1): 0.867 (1000) -> 0.754 (2000) -> 0.700 (3000) -> 0.685 (4000) in 30.6 min,
  over the CPU budget.
  Earlier (before the options): 1000-step runs with a lower KL weight (1.65) and a faster
  temperature anneal collapsed onto 5% of the codes; on the simple shapes
  (--config.data.name=fmjax_shapes/simple_32, one object on a smooth gradient) the default's
  recipe drew purple objects orange (ratio 7.5 at 1000 steps; the 4x4 baseline is 0.0025 there).
  The squared error as the reconstruction term, the gate's own measure (2026-12-06; the preset
  with --config.model.output=mse --config.objective.kl_weight=0
  --config.objective.diversity_weight=0.005 --config.total_steps=1000, the diversity weight
  scaled down with the ~100x smaller loss): 2.03 (250) -> 1.34 (500) -> 1.15 (750) -> 1.12
  (1000), no better than the logit-Laplace NLL in the same 1000-step ablation (1.09 above).
  How far the gate is from what 4x4 tokens can carry (the ratio of oracles that give each
  patch more than a code, numpy on 1000 validation images): 2x2 patch means 0.387, a
  per-patch affine fit of each channel (9 numbers) 0.391, a Gaussian blur of sigma 1.2 px
  0.401, and two free colours with a free 16-pixel mask per patch 0.159. The 0.5 gate is reachable in principle (the
  backgrounds' noise is not the floor); the tiny model does not get there in 30 CPU minutes.
  A codebook oracle (2026-12-06; k-means, 25 Lloyd iterations on the 4x4 patches of 3000
  training images, each validation patch replaced by its nearest centroid, no context): 256
  centroids 0.679, 512 0.583, 1024 0.506 (0.500 in a rerun on 2026-12-07, which adds 2048 0.436
  and 8192 0.349). The dVAE's hard tokens (0.662 with all 512 codes in use) are worse than a
  per-patch k-means codebook of the same size; reaching 0.5 with 512 codes needs the decoder to
  do better than any per-patch codebook, from the neighbours.
  8192 codes (--config.model.vocab_size=8192) step at 0.65/s, too slow for the CPU budget; the
  cost is the 1x1 convolutions into and out of 8192 channels, not the Gumbel noise (measured
  2026-12-06: 0.68 steps/s with jax's threefry keys, 0.72 with JAX_DEFAULT_PRNG_IMPL=unsafe_rbg).

Tokenizer for configs/dalle.py:cpu (the simple shapes, one object on a plain background; 2 groups,
2x downsampling: 16x16 tokens of 512; n_hid 64; the cpu recipe's options with the paper's KL
weight per pixel value for 2x2 patches, 6.6 x 12 / 192 = 0.41; 1000 steps):
    python launch/train.py --config=configs/dvae.py:simple --workdir=/tmp/dvae_simple
  What matters downstream is whether configs/supervised.py:simple's classifier (0.945 on real
  images) recognises the hard-token reconstructions: DALL-E's samples decode through the same
  decoder, so they can hardly score higher (eval/generation_classifier_recon_accuracy of a
  dalle run; 2x2 patch means score 0.830).
  Measured 2026-12-07 on the 2-core CPU (14.5 min alone, ~1.2 steps/s): eval/recon_recon_ratio
  against the 2x2 patch means (MSE 0.0009) 38.5 (init) -> 2.80 (500) -> 1.95 (1000); the
  classifier recognises its reconstructions **0.553**.
  Why these choices (the same day; recognised = the classifier's accuracy on reconstructions):
      n_hid 32, kl_weight 1.65 (the cpu recipe's), 2000 steps, 18.2 min: 6.03 (500) -> 3.21
          (1000) -> 3.19 (1500) -> 3.26 (2000), recognised 0.447 (the rings come out, hearts
          and stars as blobs, some in the wrong colour);
      n_hid 32, kl_weight 0.4125, 1000 steps, 9.8 min with a 1.5-minute eval beside it: 4.24
          (500) -> 3.13 (1000), recognised 0.453;
      the default's paper relaxation on 2 groups, 1500 steps (2026-12-03): 17x, recognised 0.330.

Paper preset (Ramesh et al. 2021, appendix A.2; OpenAI's published dVAE, openai/DALL-E):
    python launch/train.py --config=configs/dvae.py:openai_8192 --workdir=DIR
  256 px, 4 groups (8x downsampling: 32x32 tokens), n_hid 256, 2 blocks per group, 8192 codes,
  n_init 128; relaxation temperature 1 -> 1/16 over the first 150,000 updates and KL weight
  0 -> 6.6 over the first 5000, both cosine; the loss divided by 256 x 256 x 3 (KL weight
  beta / 192 per token); AdamW (0.9, 0.999, eps 1e-8), weight decay 1e-4, lr 1e-4 -> 1.25e-6
  cosine; iterate averaging 0.999; batch 512 (64 V100s x 8), 3,000,000 updates in mixed
  precision. The paper names no weight-decay groups: the preset decays every parameter, as
  torch.optim.AdamW(model.parameters()) does (optimizer.decay_all=True; the default and cpu
  presets keep fmjax's groups, biases undecayed). tests/reference/test_dvae_trajectory.py runs
  fmjax's step beside a torch transcription of the paper's (on openai/DALL-E's modules: OpenAI
  published no training code) for 30 steps across the compressed schedules.
  Differences: the paper's lr reaches 1.25e-6 after 1,200,000 updates and stays there;
  fmjax's cosine runs over the whole 3M (config.optimizer has no separate decay length); the
  paper trains on its 250M text-image pairs with its own crop augmentation (Listing 1),
  this preset on ImageNet-1k (imagenet2012 in TFDS) with random resized crops. Expected: the
  paper reports no reconstruction metric for the dVAE (its Figure 1 shows reconstructions);
  OpenAI's published weights load with load_tokenizer(dict(torch='encoder.pt'), 256)
  (fmjax/interop/dall_e.py, tests/interop/test_dall_e_parity.py).

Images enter in [0, 1] (pp ``normalize((0, 0, 0), (1, 1, 1))``; the model applies DALL-E's
map_pixels); the objective refuses any other normalisation.
"""
from configs import common

IMAGENET_TRAIN = 1281167
UNIT = "normalize((0, 0, 0), (1, 1, 1))"


def get_config(arg: str = "default"):
    c = common.base_config()
    c.objective = dict(name="dvae", kl_weight=6.6, kl_warmup_steps=5000, temp_start=1.0,
                       temp_end=1.0 / 16, temp_steps=150_000, temp_schedule="cosine", ema_decay=0.999,
                       straight_through="", diversity_weight=0.0, diversity_of="q")
    c.optimizer.update(dict(name="adamw", lr=1e-4, min_lr=1.25e-6, b1=0.9, b2=0.999, eps=1e-8,
                            weight_decay=1e-4, warmup_steps=0, decay="cosine"))
    c.model = dict(name="dvae", variant="openai", output="logit_laplace")
    if arg in ("default", "cpu", "simple"):
        c.total_steps = 1500
        c.batch_size = 64
        c.log_every = 100
        c.eval_every = 500
        c.checkpoint_every = 500
        c.data.name = "fmjax_shapes/32"
        c.data.image_size = 32
        # 3 groups (4x downsampling: 8x8 tokens), narrow and one block per group.
        c.model = dict(name="dvae", group_count=3, n_hid=32, n_blk_per_group=1, vocab_size=512, n_init=64,
                       output="logit_laplace")
        # The paper's schedules over the short run: temperature annealed over all of it, the KL
        # weight warmed up over its first 10%; no iterate averaging (too few steps for 0.999).
        c.objective.update(dict(kl_warmup_steps=150, temp_steps=0, ema_decay=0.0))
        c.optimizer.update(dict(lr=1e-3, min_lr=1e-5, warmup_steps=50))
        # YNNPACK's reduce fusion (fmjax.train.observe.apply_xla_flags; CPU only, ignored by
        # tests that run the loop in-process): the conv stacks step 1.33x faster on the 2-core
        # CPU (launch/benchmark.py: 175 -> 233 images/s). --config.xla_flags= turns it off.
        c.xla_flags = "--xla_cpu_experimental_ynn_fusion_type=reduce"
        c.data.pp_train = f"flip_lr|{UNIT}|keep('image')"
        c.data.pp_eval = f"{UNIT}|keep('image', 'label')"
        c.evals = dict(
            recon=dict(type="metrics", split="validation", examples=1000),
            val_loss=dict(type="loss", split="validation", examples=1000),
            images=dict(type="images", split="validation"),
        )
        if arg in ("cpu", "simple"):
            # The decoder reads the encoder's argmax code (straight-through: the gradients of the
            # relaxed sample), a batch-level codebook-usage term keeps the codes in use, and the
            # KL weight per pixel value is the paper's (6.6 / 192 per nat with 8x8 patches of 3
            # channels: 1.65 with 4x4 patches, 0.4125 with 2x2). See the docstring.
            c.objective.update(dict(straight_through="argmax", diversity_weight=0.3))
            c.optimizer.lr = 2e-3   # measured better than 1e-3 at every eval (docstring)
        if arg == "cpu":
            c.total_steps = 4000
            c.eval_every = 1000
            c.checkpoint_every = 1000
            c.objective.update(dict(kl_warmup_steps=400, kl_weight=1.65, diversity_of="sharp"))
        if arg == "simple":
            # configs/dalle.py:cpu's tokenizer on the simple shapes (one object on a plain
            # background): 2 groups (2x downsampling: 16x16 tokens; an 8x8 grid cannot carry the
            # shape for the classifier), twice the width, 1000 steps.
            c.data.name = "fmjax_shapes/simple_32"
            c.model.update(dict(group_count=2, n_hid=64))
            c.total_steps = 1000
            c.eval_every = 500
            c.checkpoint_every = 500
            c.objective.update(dict(kl_warmup_steps=100, kl_weight=0.4125))
    elif arg == "openai_8192":
        c.batch_size = 512
        c.total_steps = 3_000_000
        c.optimizer.decay_all = True   # every param decays (the paper names no groups)
        common.imagenet_data(c, 256, scale=(0.35, 1.0))
        c.data.pp_train = f"random_resized_crop(256, scale=(0.35, 1.0))|flip_lr|{UNIT}|keep('image')"
        c.data.pp_eval = f"resize(256)|center_crop(256)|{UNIT}|keep('image', 'label')"
        c.dtype = "bfloat16"
        c.log_every = 100
        c.eval_every = 20_000
        c.checkpoint_every = 5000
        c.keep_period = 100_000
        c.evals = dict(
            recon=dict(type="metrics", split="validation", examples=10_000, every=c.eval_every),
            images=dict(type="images", split="validation", every=c.eval_every),
        )
    else:
        raise ValueError(f"Unknown configs/dvae.py preset {arg!r}; valid: default, cpu, simple, openai_8192.")
    return c
