"""GPT: a causal language model (fmjax.models.decoder.Decoder, objective 'lm') on the shapes
captions.

Default (bundled shapes captions, the 'words' tokenizer with configs/clip.py's 2048 buckets,
a 2-layer width-128 decoder, 32 tokens):
    python launch/train.py --config=configs/gpt.py --workdir=/tmp/gpt
  The validation perplexity is exp(eval/val_loss) (the loss evaluator: mean next-token NLL over
  the tokens up to and including eot, 1024 validation captions). Measured 2026-12-02 on the
  2-core CPU (600 steps, ~4 min with the compile and 3 evals): eval/val_loss 7.631 (step 0;
  perplexity 2061, a uniform guess is 2048) -> 0.949 (step 300) -> 0.934 (step 600;
  perplexity 2.55). The captions' own randomness (colours, shapes, positions, templates
  drawn at random) bounds it from below; train loss plateaus at the same ~0.93.
  Samples of that checkpoint (fmjax.objectives.lm.LMObjective.sample_text from sot,
  temperature 1, decoded by get_tokenizer('words', vocab_size=2048, vocabulary='shapes')):
  "there is a pink heart below a yellow star.", "a picture showing a large red square.",
  "a picture of a green hexagon next to a purple circle and a pink heart."

'cpu': the same recipe as the default, which already flattens within ~4 minutes (validation
0.949 at step 300, 0.934 at 600; train loss plateaus at the same ~0.93, near the floor the
captions' own randomness sets); a longer run has not been measured:
    python launch/train.py --config=configs/gpt.py:cpu --workdir=/tmp/gpt_cpu

'interleaved' (the frozen LM of configs/flamingo.py): the same model with 128 learned
positions, trained on rows of six captions packed without their padding (objective.pack=6,
pack_length=128; 192 captions = 32 rows per step, 500 steps):
    python launch/train.py --config=configs/gpt.py:interleaved --workdir=/tmp/gpt_interleaved
  Measured 2026-12-03 (2-core CPU, 2 min): eval/val_loss (packed validation rows; every
  token after the first is a target, the trivial sot after each eot included) 7.618 (step 0)
  -> 0.897 (step 250) -> 0.875 (step 500).

Weights of transformers' GPT-2 load with --config.model_init.torch=DIR/model.safetensors
--config.model_init.format=hf_gpt2 and a matching config.model (fmjax.interop.hf_gpt2.
decoder_kwargs_from_hf_config), with the 'gpt2_bpe' tokenizer on the same vocab.json/merges.txt.
A nanoGPT ckpt.pt loads with --config.model_init.format=nanogpt (config.model from its model_args:
fmjax.interop.hf_gpt2.decoder_kwargs_from_nanogpt). nanoGPT's step (its reference for the LM's
trajectory test, tests/reference/test_lm_trajectory.py): --config.optimizer.warmup_mode=nanogpt
--config.optimizer.wd_groups=nanogpt --config.optimizer.clip_eps=1e-6 --config.optimizer.b2=0.95
--config.optimizer.min_lr=<lr / 10>.
"""
from configs import common


def get_config(arg: str = "default"):
    c = common.base_config()
    c.objective.name = "lm"
    if arg in ("default", "cpu", "interleaved"):
        c.total_steps = 600
        c.batch_size = 64
        c.log_every = 50
        c.eval_every = 300
        c.checkpoint_every = 300
        c.optimizer.update(dict(name="adamw", lr=2e-3, b1=0.9, b2=0.98, eps=1e-8,
                                weight_decay=0.1, warmup_steps=50, clip_norm=1.0))
        c.data.name = "fmjax_shapes/32"
        c.data.image_size = 32
        c.data.tokenize = dict(context_length=32, tokenizer="words", vocab_size=2048)
        c.data.pp_train = ("tokenize(context_length=32, tokenizer='words', vocab_size=2048)|"
                           "keep('tokens')")
        c.data.pp_eval = c.data.pp_train
        c.model = dict(name="decoder", vocab_size=2048, max_length=32, width=128, depth=2,
                       num_heads=4, mlp_dim=512, dropout=0.0)
        c.evals = dict(val_loss=dict(type="loss", split="validation", examples=1024))
        if arg == "interleaved":  # the frozen LM of configs/flamingo.py: 6 captions per 128-token row
            c.total_steps = 500
            c.batch_size = 192
            c.eval_every = 250
            c.checkpoint_every = 250
            c.objective.pack = 6
            c.objective.pack_length = 128
            c.model.max_length = 128
    else:
        raise ValueError(f"Unknown configs/gpt.py preset {arg!r}; valid: default, cpu, interleaved.")
    return c
