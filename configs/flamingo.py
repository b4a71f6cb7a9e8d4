"""Flamingo: a Perceiver resampler and gated cross-attention layers taught to read images into
a FROZEN language model, trained on interleaved image-text sequences; in-context few-shot VQA.

The frozen LM is a configs/gpt.py workdir (its 'interleaved' preset: six captions packed per
128-token row, so it knows long contexts). Train it first (~2 min on the 2-core CPU):
    python launch/train.py --config=configs/gpt.py:interleaved --workdir=/tmp/gpt_interleaved
then (default: MEASURED_DEFAULT):
    python launch/train.py --config=configs/flamingo.py --workdir=/tmp/flamingo \\
        --config.model_init.workdir=/tmp/gpt_interleaved

Data: fmjax_shapes/32 scenes with the ``vqa_pairs`` op's generated questions (the main
object's shape and colour, the number of objects) in two answer styles; five examples per
sequence, the style drawn per sequence (fmjax/objectives/flamingo.py). The LM
(``lm/token_embed``, ``pos_embed``, ``block_*``, ``norm``) is frozen by ``optimizer.frozen``;
the resampler and the gated layers learn, and so does the small vision tower (a deviation:
Flamingo freezes a contrastively pretrained NFNet; here no pretrained tower is bundled, so it
learns from scratch). The 'vqa' eval asks 300 validation scenes every question with 0, 4 and 8
in-context examples (short answers) and scores exact matches.

LLaVA's sibling, the 'llava' preset: model.projection='mlp' (a 2-layer MLP from each image's
17 vision tokens into the LM's embedding space, in place of 17 placeholder tokens per image;
fmjax/models/flamingo.py), objective.media_tokens=17, so 3 examples per sequence fit the LM's
128 positions and the eval asks with 0 and 2 shots; the same two workdirs:
    python launch/train.py --config=configs/flamingo.py:llava --workdir=/tmp/llava \
        --config.model_init.workdir=/tmp/gpt_interleaved \
        --config.model_init.more.vision.workdir=/tmp/clip
"""
from configs import common

MEASURED_DEFAULT = "(not yet measured)"


def get_config(arg: str = "default"):
    c = common.base_config()
    c.objective.name = "flamingo"
    c.objective.shots_per_sequence = 9
    c.objective.seq_length = 128
    c.objective.kinds = ("shape", "colour", "count")
    c.objective.styles = ("short", "sentence")
    if arg in ("default", "cpu", "llava"):
        c.total_steps = 1000 if arg == "default" else 2000
        c.batch_size = 144            # 16 sequences of 9
        c.log_every = 50
        c.eval_every = 500
        c.checkpoint_every = 500
        c.optimizer.update(dict(name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8,
                                weight_decay=0.1, warmup_steps=100, clip_norm=1.0,
                                frozen=(r"lm/(token_embed/.*|pos_embed|block_\d+/.*|norm/.*)",
                                        r"vision/.*")))
        c.data.name = "fmjax_shapes/32"
        c.data.image_size = 32
        c.data.tokenize = dict(context_length=16, tokenizer="words", vocab_size=2048)
        qa = "vqa_pairs(context_length=16, tokenizer='words', vocab_size=2048)"
        keys = "keep('image', 'qa_tokens', 'qa_len', 'qa_prompt_len')"
        c.data.pp_train = f"resize((32, 32))|normalize('clip')|{qa}|{keys}"
        c.data.pp_eval = c.data.pp_train
        c.model = dict(
            name="flamingo", image_token_id=0, cross_every=1, xattn_heads=4, xattn_dim_head=32,
            xattn_ff_mult=4.0, resampler_depth=2, resampler_heads=4, resampler_dim_head=32,
            num_latents=8,
            # configs/clip.py's default image tower (its workdir's params/image load into 'vision')
            vision=dict(name="vit", width=128, depth=4, num_heads=4, mlp_dim=512, patch_size=8,
                        stem="conv", class_token=True, pool="cls", num_classes=0,
                        pos_embed="learned", pre_norm=True, activation="gelu",
                        layernorm_eps=1e-5),
            # configs/gpt.py:interleaved's model (its workdir loads into 'lm')
            lm=dict(vocab_size=2048, max_length=128, width=128, depth=2, num_heads=4,
                    mlp_dim=512, dropout=0.0))
        c.model_init = dict(workdir="", mapping={"params": "lm"},
                            more=dict(vision=dict(workdir="", mapping={"params/image": "vision"})))
        c.evals = dict(vqa=dict(type="vqa", split="validation", examples=300, train_split="train",
                                train_examples=1000, shots=(0, 4, 8), batch_size=100))
        if arg == "llava":
            c.model.projection = "mlp"
            c.objective.update(media_tokens=17, shots_per_sequence=3, seq_length=96)
            c.evals.vqa.shots = (0, 2)
    else:
        raise ValueError(f"Unknown configs/flamingo.py preset {arg!r}; valid: default, cpu, llava.")
    return c
