"""DALL-E: an autoregressive transformer over caption tokens then dVAE image codes
(fmjax.objectives.dalle, fmjax.models.dalle), sampled with the KV cache and decoded by the dVAE.

Default (bundled shapes, 32 px images -> 8x8 codes, 24 caption tokens of the 'words'
tokenizer with the shapes vocabulary, a 4-layer width-128 transformer with DALL-E's row /
column / row / conv attention; a RANDOM frozen dVAE as the tokenizer, so it runs on its own):
    python launch/train.py --config=configs/dalle.py --workdir=/tmp/dalle
  A random dVAE still makes the image codes a fixed function of the pixels, so the image loss
  falls; the samples decode through a random decoder (noise): the `cpu` preset uses a trained
  dVAE. Pictures in DIR/images/: rows of real images, their dVAE reconstructions, samples for
  their captions.

CPU recipe (the issue's gate: generation accuracy >= 0.5 for class-name prompts; a dVAE
trained by configs/dvae.py first, ~10 min):
    python launch/train.py --config=configs/dvae.py --workdir=/tmp/dvae
    python launch/train.py --config=configs/dalle.py:cpu --workdir=/tmp/dalle_cpu \\
        --config.objective.tokenizer.workdir=/tmp/dvae

Paper preset (Ramesh et al. 2021): ``12B`` (64 layers, width 3968, 62 heads; 256 BPE text
tokens of 16384, 32x32 codes of OpenAI's 8192-code dVAE; (row, column, row, row) attention
with a last conv layer; text loss 1/8, image 7/8; AdamW b2 0.96, eps 1e-8, wd 4.5e-2, lr
4.5e-4 with 5000 warm-up steps, grad clip 4; batch 1024, 430,000 updates):
    python launch/train.py --config=configs/dalle.py:paper_12b --workdir=DIR \\
        --config.objective.tokenizer.torch=encoder.pt --config.data.name=DATASET
  fmjax ships no 16384-token BPE: the preset uses CLIP's BPE (data.tokenize.tokenizer='clip_bpe',
  49408 ids) with 256 positions; OpenAI's dVAE decoder must also be loaded to sample.
"""
import ml_collections

from configs import common

UNIT = "normalize((0, 0, 0), (1, 1, 1))"
# The classifier that scores the cpu preset's samples (configs/supervised.py:simple, as
# configs/diffusion.py:cpu's); override with --config.evals.generation.classifier_workdir=DIR.
CPU_CLASSIFIER_WORKDIR = "runs/classifier_simple_32"


def _pipelines(c):
    tok = "tokenize({})".format(", ".join(f"{k}={v!r}" for k, v in c.data.tokenize.items()))
    size = c.data.image_size
    # No flips: the captions say left and right.
    c.data.pp_train = f"resize(({size}, {size}))|{UNIT}|{tok}|keep('image', 'tokens')"
    c.data.pp_eval = f"resize(({size}, {size}))|{UNIT}|{tok}|keep('image', 'label', 'tokens')"


def get_config(arg: str = "default"):
    c = common.base_config()
    c.objective = dict(name="dalle", text_loss_weight=1.0 / 8, unique_pad_tokens=True, caption_drop_prob=0.0,
                       tokenizer=dict(workdir=ml_collections.config_dict.placeholder(str)),
                       sample=dict(temperature=1.0, top_k=ml_collections.config_dict.placeholder(int)))
    if arg in ("default", "cpu"):
        c.total_steps = 1000
        c.batch_size = 64
        c.log_every = 50
        c.eval_every = 500
        c.checkpoint_every = 500
        c.data.name = "fmjax_shapes/32"
        c.data.image_size = 32
        c.data.tokenize = dict(context_length=24, tokenizer="words", vocab_size=2048)
        _pipelines(c)
        c.model = dict(name="dalle", width=128, depth=4, num_heads=4, mlp_dim=512,
                       attention_types=("row", "column", "row", "conv"))
        c.optimizer.update(dict(name="adamw", lr=1e-3, b1=0.9, b2=0.96, eps=1e-8, weight_decay=4.5e-2,
                                warmup_steps=50, clip_norm=4.0))
        c.evals = dict(
            val=dict(type="metrics", split="validation", examples=512),
            images=dict(type="images", split="validation"),
        )
        if arg == "default":
            # A random 3-group dVAE (8x8 codes of 512), as configs/dvae.py's default shape.
            c.objective.tokenizer = dict(init="random", seed=0, model=dict(
                group_count=3, n_hid=32, n_blk_per_group=1, vocab_size=512, n_init=64))
        else:  # the simple shapes (one object on a plain background), scored (see the docstring)
            c.data.name = "fmjax_shapes/simple_32"
            c.total_steps = 2000
            c.eval_every = 1000
            c.checkpoint_every = 1000
            c.objective.tokenizer = dict(workdir=ml_collections.config_dict.placeholder(str))
            c.evals.generation = dict(type="generation", split="validation", classifier_workdir=CPU_CLASSIFIER_WORKDIR,
                                      samples_per_class=16, examples=1000, batch_size=128,
                                      prompt="a photo of a {}.")
    elif arg == "paper_12b":
        c.total_steps = 430_000
        c.batch_size = 1024
        c.data.name = "imagenet2012"
        c.data.image_size = 256
        c.data.tokenize = dict(context_length=256, tokenizer="clip_bpe")
        _pipelines(c)
        c.model = dict(name="dalle", variant="12B", remat="full")
        c.dtype = "bfloat16"
        c.optimizer.update(dict(name="adamw", lr=4.5e-4, b1=0.9, b2=0.96, eps=1e-8, weight_decay=4.5e-2,
                                warmup_steps=5000, clip_norm=4.0))
        c.objective.tokenizer = dict(torch=ml_collections.config_dict.placeholder(str))
        c.evals = dict(images=dict(type="images", split="validation"))
    else:
        raise ValueError(f"Unknown configs/dalle.py preset {arg!r}; valid: default, cpu, paper_12b.")
    return c
