"""CLIP: contrastive image-text pretraining; zero-shot classification and retrieval evals.

Default (bundled shapes captions, 32x32 images, hashed word tokenizer, CPU-sized):
    python launch/train.py --config=configs/clip.py --workdir=/tmp/clip
  Logs eval/zero_shot_top1 (validation, 8 shape classes, chance 0.125),
  eval/zero_shot_heldout_top1 (attribute combinations never seen in training) and
  eval/retrieval_{i2t,t2i}_r@{1,5,10} while it trains. Measured after the 800 steps (2-core
  CPU, 8 min): zero-shot 0.494 (held-out 0.257), recall@5 0.86 / 0.86 (chance 0.005). The
  issue's 0.8 zero-shot bar is not reached in this budget; it is a matter of compute: the same
  recipe for 2400 steps (--config.total_steps=2400, 23 min) reaches zero-shot 0.576 / 0.678 /
  0.720 at steps 800 / 1600 / 2400 (held-out 0.413, recall@5 0.95 / 0.94). The default
  trains with NegCLIP hard negatives (each caption again with one shape word swapped,
  objective.hard_negatives): without them
  the same run gives zero-shot 0.437, held-out 0.331, in 6.5 min. The image tower is the
  bottleneck: a linear probe of its features on the shape label reaches 0.60 (0.57 without
  negatives), and zero-shot with the true colour and size in the prompt 0.58.
  LoRA on the trained default (issue 18: "LoRA on a trained CLIP raises held-out zero-shot"),
  adapting it to attribute combinations it never saw, measured on held-out images the
  adaptation never saw either:
    python launch/train.py --config=configs/clip.py:lora --workdir=/tmp/clip_lora \
        --config.model_init.workdir=/tmp/clip
  (rank 8 on both towers' query / value, 1.64% of the params trainable; 200 steps on
  `heldout[:500]+train[:1500]`, the first half of the held-out split mixed with training
  scenes, at the default's lr 2e-3; eval/zero_shot_heldout_top1 on `heldout[500:]`.)
  Measured 2026-12-05 from /tmp/clip (the default's 800 steps), 2.7 min each, two seeds:
  held-out zero-shot 0.268 -> 0.354 / 0.350 (seed 0 / 1), while validation zero-shot stays
  0.486 -> 0.487 / 0.493 and recall@5 i2t 0.865 -> 0.860 / 0.850. Adapting on the held-out
  half alone (--config.data.train_split='heldout[:500]') lifts held-out further, 0.268 ->
  0.438, but forgets: validation zero-shot 0.486 -> 0.342, recall@5 0.865 -> 0.637.
  LoRA on the training data alone does not move the held-out combinations (measured: 300
  steps on `train` from the same base, lr 2e-3 with query / value, or lr 5e-3 with fc2 too:
  held-out 0.250 -> 0.254 and 0.265 -> 0.263). Without --config.model_init.workdir the
  adapter trains on a random base (a one-line warning says so).
  The default's history: byte tokenizer + linear patch stem + lr 1e-3: 0.354 at step 600;
  'words' tokenizer + conv stem at lr 1e-3: 0.424. Tried without negatives: 64x64 images (fmjax_shapes/64, patch 16 with the
  conv stem, so still 16 tokens; lr 1e-3, 7.5 min): 0.455, held-out 0.352; batch 256 with
  lr 2e-3 for 450 steps (64 px): 0.395; prompts naming each colour, as the captions do: 0.419.

CPU recipe (issue 12: zero-shot >= 0.8), the default on the simple shapes for 1600 steps:
    python launch/train.py --config=configs/clip.py:cpu --workdir=/tmp/clip_cpu
  fmjax_shapes/simple_32 is the same scenes with only the main object on a plain gradient
  background (one-object captions; same labels and held-out attribute combinations): on the
  full scenes the tiny image tower is the bottleneck (see above). Measured 2026-12-01:
  eval/zero_shot_top1 0.100 (step 0) -> 0.646 / 0.812 / 0.917 / 0.918 at steps 400 / 800 /
  1200 / 1600; held-out combinations 0.150 -> 0.581; recall@5 i2t 0.712, t2i 0.594 (chance
  0.005). 20 min wall clock for the whole run, sharing the 2 cores with the test suite and
  another training.

LiT (Zhai et al., 2022: locked-image text tuning), from a supervised run's ViT:
    python launch/train.py --config=configs/supervised.py --workdir=SUPERVISED_WORKDIR
    python launch/train.py --config=configs/clip.py:lit --workdir=DIR \
        --config.model_init.workdir=SUPERVISED_WORKDIR
  The default's data, text tower and evals; the image tower is the sub-config
  config.model.image = configs/supervised.py's default ViT (read from that config: Ti/8 shape
  overridden to width 128, depth 4, conv stem, mean pooling) with num_classes=0, locked
  (objective.lock='image': it and image_proj get no update, so they end bit-identical to the
  start) and loaded with model_init.mapping={'params': 'image'}. The supervised checkpoint's
  head/kernel and head/bias map to no param: the load table counts them as unused (so no
  dont_load). Images are normalised as the tower was trained ('imagenet', not 'clip').
  Without --config.model_init.workdir (e.g. --check_only) the locked tower is RANDOM and the
  objective prints a one-line warning; the run still starts (a locked random tower is a valid,
  if poor, baseline). Not yet measured on the shapes (tests/models/test_clip_towers.py checks
  the mechanics: the loaded tower ends bit-identical to the supervised run's params).

ALIGN (Jia et al., 2021) shape on the CLIP objective, CPU-sized:
    python launch/train.py --config=configs/clip.py:align --workdir=/tmp/align
  A convolutional image tower (config.model.image: ResNet-18's layout at a quarter width,
  (16, 32, 64, 128), with the CIFAR stem; ALIGN used EfficientNet, which fmjax does not have;
  its BatchNorm running statistics are carried in the objective state, extra['batch_stats'])
  and a BERT-style text tower
  (config.model.text: bidirectional, causal=False, padding keys masked with pad_id=0, pooled
  at the first token as BERT's [CLS]), the softmax contrastive loss with the temperature
  learned from ALIGN's 1/0.05 (logit_scale_init = ln 20; fmjax learns its log, ALIGN the
  temperature itself). The default's 800 steps on fmjax_shapes/simple_32, no hard negatives.
  Measured 2026-12-03 (2-core CPU, alone, 8.5 min): zero-shot 0.150 (step 0) -> 0.758 (400)
  -> 0.972 (800), held-out combinations 0.131 -> 0.812; recall@5 i2t 0.723, t2i 0.609
  (chance 0.005). The captions here use the shapes' word tokenizer; ALIGN's own BERT WordPiece
  (ids equal to transformers' BertTokenizer) is --config.data.tokenize.tokenizer=bert_wordpiece
  with bpe_path=BERT's vocab.txt (and the same in pp_train's tokenize op). The earlier ConvNeXt tower (stages (2, 2, 2) x (32, 64, 128); 8 px -> 2 px
  grids) reached only 0.367 zero-shot on the same recipe (2026-12-02).

Paper presets (need an image-text dataset: --config.data.name=image_folder:/path with a
captions file, or a TFDS dataset with captions):
    python launch/train.py --config=configs/clip.py:vit_b16 --config.data.name=... --workdir=DIR
  (vit_b32, vit_l14 likewise). Recipe: AdamW lr 5e-4, betas (0.9, 0.98), eps 1e-6, wd 0.2
  (not on gains / biases / logit scale), 10k warmup steps, cosine, global batch 32768.
  They step exactly like open_clip v3.3.0's trainer (tests/reference/test_clip_trajectory.py,
  30 steps to 1e-5): OPEN_CLIP_OPTIONS (weight decay on every >=2-D param but the class token,
  so token and position embeddings decay; warm-up peak * (step + 1) / W), model.patch_bias=False
  (open_clip's conv1 has no bias) and the logit-scale clamp to [0, ln 100] after each step
  (objective.clamp_logit_scale, default True). open_clip after 2026-06 also leaves both position
  embeddings undecayed: --config.optimizer.no_decay="('cls_token$', 'pos_embed$')".
  The default preset keeps fmjax's own choices (optimizer.NO_DECAY_PATTERNS, warm-up peak * s / W).

Scaling presets (docs/scaling.md; check the fit first with launch/compile.py):
  siglip_b16: SigLIP B/16 from scratch as in Zhai et al. 2023: sigmoid loss, global batch 32768,
    big_vision's optimizer (Adam b2 0.95, lr 1e-3, wd 1e-4 in big_vision's units, clip 1.0),
    no temperature clamp, 64 text tokens, 9B examples. Differs from the paper: the CLIP BPE
    tokenizer (the paper: a 32k SentencePiece vocabulary, which fmjax does not ship).
  vit_g14: CLIP ViT-g/14 (open_clip's ViT-g-14 shape: 1.0B image + 0.35B text params) at global
    batch 65,536 with the ring contrastive loss, FSDP over half the chips (data 2 x fsdp N/2: 128
    divides the width 1408, 256 does not), scan over layers, full remat and 2 micro-batches whose
    loss keeps every negative (cached-embedding accumulation). Optimizer as vit_l14 (open_clip's),
    13k warm-up steps, 12B samples; a scaling preset, not a published recipe.
      python launch/compile.py --config=configs/clip.py:vit_g14 --topology=v5e-256
    Measured 2026-12-02 (libtpu 0.0.42 AOT on the 2-core CPU; docs/scaling.md): fits, 10.6 GiB
    per chip of 16 (params 44 MiB, Adam 88 MiB, batch 147 MiB, compiler temp 10.3 GiB); roofline
    3.8 s per step, MFU at most 60%. 4 micro-batches: 5.6 GiB. Not fitting: no remat (100 GiB of
    temp), dots_saveable (33.7 GiB), full remat without micro-batches (17.6 GiB per chip).

SigLIP as big_vision trains it (loss='sigmoid', t = 10 and b = -10 at init, no clamp of t):
  --config.model.loss=sigmoid --config.objective.clamp_logit_scale=False, and the optimizer from
  big_vision_optimizer(lr, wd, warmup_steps, clip_norm) below (big_vision's weight decay is in
  its own units: scaled by the schedule but not by the lr, kernels only), which the reference
  test checks against big_vision's SigLIP trainer step.
"""
import math

from configs import common

# open_clip's training step (tests/reference/test_clip_trajectory.py): weight decay on every
# >=2-D param except the class token (open_clip's class_embedding is 1-D, fmjax's cls_token
# [1, 1, D]), so token and position embeddings decay; warm-up lr = peak * (step + 1) / W.
OPEN_CLIP_OPTIONS = dict(wd_groups="open_clip", warmup_mode="plus_one")
# big_vision's weight decay touches only kernels (wd_mults default ".*/kernel$").
KERNELS_ONLY = (r"^(?!.*(^|/)kernel$)",)


def big_vision_optimizer(lr: float, wd: float, warmup_steps: int, clip_norm: float = 1.0,
                         b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> dict:
    """``config.optimizer`` options that reproduce big_vision's optimizer (``big_vision/optax.py``
    ``make`` with ``optax_name='scale_by_adam'``, as its SigLIP config uses): global-norm clip,
    Adam, ``lr``, then ``wd`` (big_vision's units: added after the lr, scaled only by the
    schedule, kernels only), cosine with linear warm-up. AdamW decays by ``lr_t * weight_decay``
    and ``lr_t = lr * schedule_t``, so ``weight_decay = wd / lr`` is the same update. Pair it
    with ``objective.clamp_logit_scale=False`` (big_vision does not clamp the temperature)."""
    return dict(name="adamw", lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd / lr,
                warmup_steps=warmup_steps, warmup_mode="linear", decay="cosine", min_lr=0.0,
                clip_norm=clip_norm, clip_mode="global", wd_groups="big_vision")


def shapes_recipe(c) -> None:
    """What the CPU presets of the image-text methods on the 32x32 shapes share (CLIP's
    default and the ones built on it, configs/coca.py): batch 128, AdamW lr 2e-3 (betas 0.9 /
    0.98, eps 1e-6, wd 0.1, 100 warm-up steps, clip 1.0), the 'words' tokenizer (2048
    buckets, 32 tokens), 32-px images, a log line every 50 steps."""
    c.batch_size = 128
    c.log_every = 50
    c.optimizer.update(dict(name="adamw", lr=2e-3, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
                            warmup_steps=100, clip_norm=1.0))
    c.data.image_size = 32
    c.data.tokenize = dict(context_length=32, tokenizer="words", vocab_size=2048)


def caption_pipelines(c) -> None:
    """``data.pp_train`` (random resized crop, scale 0.9-1) and ``data.pp_eval`` (with the
    label) of an image-caption config from its ``data.tokenize`` / ``image_size`` /
    ``normalization`` (configs/coca.py, configs/blip.py)."""
    tok = "tokenize({})".format(", ".join(f"{k}={v!r}" for k, v in c.data.tokenize.items()))
    norm = c.data.normalization
    c.data.pp_train = _pp(c.data.image_size, (0.9, 1.0), tok, "'image', 'tokens'", norm=norm)
    c.data.pp_eval = _pp(c.data.image_size, None, tok, "'image', 'label', 'tokens'", norm=norm)


def _pp(size: int, scale, tok: str, keys: str, swap_words=(), norm: str = "clip") -> str:
    crop = f"random_resized_crop({size}, scale={tuple(scale)})|" if scale else f"resize(({size}, {size}))|"
    if swap_words:  # NegCLIP hard negatives: a caption with one listed word swapped, tokenized
        neg_tok = tok[:-1] + ", key='neg_caption', outkey='neg_tokens')"
        tok = f"swap_words({tuple(swap_words)!r})|{tok}|{neg_tok}"
        keys += ", 'neg_tokens', 'neg_valid'"
    return f"{crop}normalize({norm!r})|{tok}|keep({keys})"


def get_config(arg: str = "default"):
    c = common.base_config()
    c.objective.name = "clip"
    c.objective.lock = ""
    c.objective.hard_negatives = False     # True: NegCLIP negatives from data.swap_words
    c.objective.loss_impl = "gathered"     # 'ring': flat-memory chunked loss (objectives/clip.py)
    c.data.swap_words = ()                 # read once, here, to build pp_train
    c.data.normalization = "clip"
    if arg in ("default", "cpu", "lit", "align", "lora"):
        shapes_recipe(c)
        c.total_steps = 800
        c.eval_every = 400
        c.checkpoint_every = 400
        c.data.name = "fmjax_shapes/32"
        c.objective.hard_negatives = True
        c.data.swap_words = _shapes_classes()
        c.model = dict(name="clip", width=128, depth=4, num_heads=4, mlp_dim=512, patch_size=8,
                       embed_dim=128, text_width=128, text_depth=3, text_heads=4, text_mlp_dim=512,
                       vocab_size=2048, context_length=32, activation="gelu", loss="softmax",
                       stem="conv")
        zs = dict(type="zero_shot", split="validation", templates=_shapes_templates())
        c.evals = dict(
            zero_shot=zs,
            zero_shot_heldout=dict(zs, split="heldout"),
            retrieval=dict(type="retrieval", split="validation"),
            # ARO / NegCLIP-style: own caption vs its colours / shapes swapped (chance 0.5)
            compositional=dict(type="swap_caption", split="validation", words=_shapes_swap_words()))
        if arg == "lora":  # LoRA on a trained default, adapted to held-out combinations (docstring)
            c.adapter.update(dict(name="lora", rank=8))
            c.data.train_split = "heldout[:500]+train[:1500]"
            c.evals.zero_shot_heldout.split = "heldout[500:]"  # images the adaptation never saw
            c.total_steps = 200
            c.eval_every = c.checkpoint_every = 100
            c.optimizer.warmup_steps = 20
        if arg == "cpu":  # the default on the simple shapes (see the docstring)
            c.data.name = "fmjax_shapes/simple_32"
            c.total_steps = 1600
            c.eval_every = c.checkpoint_every = 400
        if arg == "align":  # ALIGN's shape (see the docstring), on the simple shapes
            c.data.name = "fmjax_shapes/simple_32"
            c.objective.hard_negatives = False
            c.data.swap_words = ()
            c.model = dict(name="clip", embed_dim=128, vocab_size=2048, context_length=32,
                           activation="gelu", loss="softmax", logit_scale_init=math.log(1 / 0.05),
                           image=dict(name="resnet", variant="18", stem="cifar", stem_width=16,
                                      dims=(16, 32, 64, 128)),
                           text=dict(width=128, depth=3, num_heads=4, mlp_dim=512, causal=False,
                                     pool="first", pad_id=0))
        if arg == "lit":  # LiT: configs/supervised.py's ViT as the locked image tower
            sup = _supervised_config()
            image = dict(sup.model)
            image["num_classes"] = 0           # the classifier head has no place in the tower
            c.model = dict(name="clip", embed_dim=128, text_width=128, text_depth=3, text_heads=4,
                           text_mlp_dim=512, vocab_size=2048, context_length=32,
                           activation="gelu", loss="softmax", image=image)
            c.objective.lock = "image"
            # The tower sees its training inputs' normalisation (supervised: 'imagenet').
            c.data.normalization = sup.data.get("normalization", "imagenet")
            # The supervised checkpoint's params -> the tower; its head/* map to no param and
            # are counted as unused in the load table (no dont_load needed).
            c.model_init.mapping = {"params": "image"}
    elif arg in ("vit_b16", "vit_b32", "vit_l14"):
        variant = {"vit_b16": "B/16", "vit_b32": "B/32", "vit_l14": "L/14"}[arg]
        c.total_steps = 32 * 400_000_000 // 32768  # 32 epochs of 400M pairs (~391k steps)
        c.batch_size = 32768
        c.dtype = "bfloat16"
        c.optimizer.update(dict(name="adamw", lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
                                warmup_steps=10_000, clip_norm=0.0, **OPEN_CLIP_OPTIONS))
        c.data.name = "image_folder:/path/to/image_text"
        c.data.image_size = 224
        c.data.worker_count = 16
        c.data.tokenize = dict(context_length=77, tokenizer="clip_bpe", bpe_path="bpe_simple_vocab_16e6.txt.gz")
        c.model = dict(name="clip", variant=variant, activation="quick_gelu", loss="softmax",
                       attention_impl="xla", remat="none", scan_layers=False,
                       patch_bias=False)  # open_clip's conv1
        c.evals = dict()
        c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 2000
    elif arg in ("siglip_b16", "vit_g14"):
        c.dtype = "bfloat16"
        c.data.name = "image_folder:/path/to/image_text"
        c.data.image_size = 224
        c.data.worker_count = 16
        c.data.tokenize = dict(context_length=64 if arg == "siglip_b16" else 77, tokenizer="clip_bpe",
                               bpe_path="bpe_simple_vocab_16e6.txt.gz")
        c.evals = dict()
        c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 2000
        if arg == "siglip_b16":  # SigLIP B/16 from scratch (Zhai et al. 2023), big_vision style
            c.batch_size = 32768
            c.total_steps = 9_000_000_000 // 32768  # 9B examples seen (~275k steps)
            c.optimizer.update(big_vision_optimizer(lr=1e-3, wd=1e-4, warmup_steps=10_000,
                                                    clip_norm=1.0, b2=0.95))
            c.objective.clamp_logit_scale = False
            c.model = dict(name="clip", variant="B/16", loss="sigmoid", activation="gelu",
                           attention_impl="xla", remat="none", scan_layers=False)
        else:  # CLIP ViT-g/14 at global batch 65,536: the scaling headline of docs/scaling.md
            c.batch_size = 65536
            c.total_steps = 12_000_000_000 // 65536  # 12B samples seen, as LAION's g/14 (~183k steps)
            c.optimizer.update(dict(name="adamw", lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
                                    warmup_steps=13_000, clip_norm=0.0, **OPEN_CLIP_OPTIONS))
            c.objective.loss_impl = "ring"  # O(B_local^2) logits per ring step, not O(B_local x B)
            c.mesh = dict(data=2, fsdp=-1, tensor=1)  # fsdp 128 on 256 chips: it divides width 1408
            c.grad_accum_steps = 2  # micro-batches of 128 per chip; the loss keeps all 65,536 negatives
            c.model = dict(name="clip", variant="g/14", activation="gelu", loss="softmax",
                           attention_impl="xla", remat="full", scan_layers=True, patch_bias=False)
    else:
        raise ValueError(f"Unknown configs/clip.py preset {arg!r}; "
                         "valid: default, cpu, lit, align, lora, vit_b16, vit_b32, vit_l14, siglip_b16, vit_g14.")
    tok = "tokenize({})".format(", ".join(f"{k}={v!r}" for k, v in c.data.tokenize.items()))
    norm = c.data.normalization
    c.data.pp_train = _pp(c.data.image_size, (0.9, 1.0), tok, "'image', 'tokens'",
                          c.data.swap_words if c.objective.hard_negatives else (), norm)
    c.data.pp_eval = _pp(c.data.image_size, None, tok, "'image', 'label', 'tokens'", norm=norm)
    return c


def _supervised_config():
    from configs import supervised
    return supervised.get_config()


def _shapes_classes():
    from fmjax.data import shapes
    return tuple(shapes.CLASS_NAMES)


def _shapes_swap_words():
    from fmjax.data import shapes
    return dict(attribute=tuple(shapes.COLOR_NAMES), object=tuple(shapes.CLASS_NAMES))


def _shapes_templates():
    from fmjax.data import shapes
    return list(shapes.ZERO_SHOT_TEMPLATES)
