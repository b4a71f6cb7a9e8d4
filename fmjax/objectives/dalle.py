"""DALL-E (Ramesh et al. 2021, stage 2): an autoregressive transformer over a caption's text
tokens followed by the image's codes from a frozen discrete VAE (``configs/dvae.py``).

The batch is ``image`` (in [0, 1]: ``normalize((0, 0, 0), (1, 1, 1))``, the dVAE's input) and
``tokens`` (B, n) from ``config.data.tokenize`` (``[sot] + ids + [eot]`` then padding id 0).
The image is encoded by the frozen dVAE (``config.objective.tokenizer``: a ``dvae`` workdir,
OpenAI's encoder file or a random one, as BEiT's; ``fmjax.models.dvae.load_tokenizer``; its
params are ``extra['tokenizer']``: sharded, checkpointed, never updated) into argmax codes
(the paper: the argmax of the encoder logits, no gumbel noise), laid out after the text
(``fmjax.models.dalle``). Choices of the paper, each an option:

- ``unique_pad_tokens`` (default True): the text's padding becomes one padding token per
  text position (id ``text_vocab + position``), "we learn a special padding token separately
  for each of the 256 text positions" (section 2.2); False keeps the tokenizer's one pad id.
- ``text_loss_weight`` (default 1/8): the cross-entropy over text targets weighted 1/8 and
  over image targets 7/8, each the mean over its own targets (section 2.2).
- ``caption_drop_prob`` (default 0): the fraction of captions replaced by an empty one
  (``[sot][eot]``), for unconditional sampling and classifier-free guidance (not in the paper).

Sampling (``generate``, the ``generate`` capability used by ``launch/sample.py`` and the
``images`` pictures): the text tokens are the prompt, the image codes are drawn one at a time
with the KV cache (``fmjax.models.generate.sample``; temperature, ``top_k`` / ``top_p`` from
``config.objective.sample``; DALLE-pytorch filters to the top half, ``top_k`` = vocab / 2;
``guidance_scale`` (default 1: none) samples with classifier-free guidance against the empty
caption, as Make-A-Scene and Parti do for token models: train with ``caption_drop_prob`` > 0),
then decoded by the dVAE's decoder: the tokenizer spec must carry the decoder (a ``dvae``
workdir or ``init='random'``; OpenAI's encoder file alone cannot decode). Re-ranking N
samples per caption with a CLIP workdir (the paper's section 2.5) is ``launch/sample.py
--rerank_workdir`` (``fmjax.train.sample.clip_scores``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.errors import ConfigError
from fmjax.models import generate as generate_lib
from fmjax.models.registry import build_model
from fmjax.objectives.base import Objective
from fmjax.evals import images as image_lib

def with_unique_pads(tokens: jax.Array, eot_token_id: int, text_vocab_base: int) -> jax.Array:
    """(B, n): every token after the row's first eot becomes ``text_vocab_base + position``."""
    after = jnp.cumsum((tokens == eot_token_id).astype(jnp.int32), axis=1)
    after = (after - (tokens == eot_token_id)) > 0
    pos = jnp.arange(tokens.shape[1], dtype=tokens.dtype)[None]
    return jnp.where(after, text_vocab_base + pos, tokens)


def split_losses(logits: jax.Array, targets: jax.Array, text_length: int):
    """(text NLL mean, image NLL mean, image accuracy) of ``logits`` (B, L-1, V) for
    ``targets`` (B, L-1): positions < text_length - 1 are text targets, the rest image."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    cut = text_length - 1
    image_acc = (jnp.argmax(logp[:, cut:], -1) == targets[:, cut:]).mean()
    return nll[:, :cut].mean(), nll[:, cut:].mean(), image_acc


class DalleObjective(Objective):
    batch_keys = ("image", "tokens")
    conditioning = "text"

    def __init__(self, config):
        super().__init__(config)
        o = config.objective
        self.tokenizer_spec = o.get("tokenizer", None)
        self._tokenizer = None
        self.image_size = int(config.data.image_size)
        tok_cfg = dict(config.data.get("tokenize") or {})
        self.text_length = int(tok_cfg.get("context_length", 0) or 0)
        from fmjax.data.text_ops import tokenizer_vocab_size
        self.text_vocab_base = int(tokenizer_vocab_size(config) or 0)
        self.unique_pads = bool(o.get("unique_pad_tokens", True))
        self.text_loss_weight = float(o.get("text_loss_weight", 1.0 / 8))
        self.caption_drop_prob = float(o.get("caption_drop_prob", 0.0) or 0.0)
        self.sampling = dict(o.get("sample", None) or {})
        self._model = None

    # -- pieces ---------------------------------------------------------------------------------
    @property
    def text_tokenizer(self):
        from fmjax.data.text_ops import tokenize
        return tokenize(**dict(self.config.data.tokenize)).tokenizer

    @property
    def tokenizer(self):
        """(dVAE module, params), loaded on first use."""
        if self._tokenizer is None:
            from fmjax.models import dvae
            self._tokenizer = dvae.load_objective_tokenizer(self.tokenizer_spec, self.image_size)
        return self._tokenizer

    @property
    def grid(self) -> int:
        return self.image_size // self.tokenizer[0].downsample

    @property
    def model(self):
        if self._model is None:
            module, _ = self.tokenizer
            text_vocab = self.text_vocab_base + (self.text_length if self.unique_pads else 0)
            cfg = dict(self.config.model)
            for key in ("text_vocab", "image_vocab", "text_length", "image_grid"):
                cfg.pop(key, None)
            if "attention_types" in cfg:  # hashable: the model is a static argument of the sampler's jit
                cfg["attention_types"] = tuple(cfg["attention_types"])
            self._model = build_model(cfg, self.config.get("dtype", "float32"), text_vocab=text_vocab,
                                      image_vocab=int(module.vocab_size), text_length=self.text_length,
                                      image_grid=self.grid)
        return self._model

    def check(self, config):
        if config.model.get("name") != "dalle":
            raise ConfigError(f"objective 'dalle' needs config.model.name='dalle', got {config.model.get('name')!r}.")
        from fmjax.data import text_ops
        text_ops.check_vocab(config, 1 << 30)  # a tokenizer that cannot be built: its own one-line error
        if not self.text_length or not self.text_vocab_base:
            raise ConfigError("objective 'dalle' needs config.data.tokenize with a context_length and a "
                              "tokenizer that builds (e.g. dict(context_length=24, tokenizer='words', vocab_size=2048)).")
        spec = dict(self.tokenizer_spec or {})
        if not any(spec.get(k) for k in ("workdir", "torch", "init")):
            raise ConfigError("config.objective.tokenizer names no dVAE: train a dVAE tokenizer first (python launch/train.py "
                              "--config=configs/dvae.py --workdir=DIR) and pass --config.objective.tokenizer.workdir=DIR "
                              "(or tokenizer.init='random' for a smoke test).")
        norm = str(config.data.get("pp_train", ""))
        if "normalize((0, 0, 0), (1, 1, 1))" not in norm.replace(".0", ""):
            raise ConfigError("objective 'dalle' reads images in [0, 1] (the dVAE's input): end "
                              "config.data.pp_train and pp_eval with normalize((0, 0, 0), (1, 1, 1)).")
        if not 0.0 <= self.text_loss_weight <= 1.0 or not 0.0 <= self.caption_drop_prob < 1.0:
            raise ConfigError(f"config.objective.text_loss_weight={self.text_loss_weight} must be in [0, 1] and "
                              f"caption_drop_prob={self.caption_drop_prob} in [0, 1).")
        from fmjax.evals.generation import check_ar_sampler
        try:
            check_ar_sampler(self.sampling, prefix="config.objective.sample.")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.model  # noqa: B018 - builds: unknown model fields fail here
        try:
            from fmjax.models.dalle import layer_types
            layer_types(self.model.attention_types, self.model.depth)
        except ValueError as e:
            raise ConfigError(f"config.model: {e}") from None

    def text_ids(self, tokens):
        tokens = tokens.astype(jnp.int32)
        if self.unique_pads:
            tokens = with_unique_pads(tokens, self.text_tokenizer.eot_token_id, self.text_vocab_base)
        return tokens

    def image_codes(self, extra, images):
        """[B, N] int32 dVAE codes of images in [0, 1]."""
        module, _ = self.tokenizer
        x = jnp.clip(images.astype(jnp.float32), 0.0, 1.0)
        ids = module.apply({"params": extra["tokenizer"]}, x, method=type(module).tokens)
        return jax.lax.stop_gradient(ids.reshape(ids.shape[0], -1))

    def empty_captions(self, tokens):
        """The empty caption ``[sot][eot]`` then padding, shaped as ``tokens`` (B, n): what
        ``caption_drop_prob`` trains on and classifier-free guidance samples against."""
        tok = self.text_tokenizer
        return jnp.zeros_like(tokens).at[:, 0].set(tok.sot_token_id).at[:, 1].set(tok.eot_token_id)

    def sequence(self, extra, batch, rng=None):
        tokens = batch["tokens"].astype(jnp.int32)
        if rng is not None and self.caption_drop_prob > 0:
            empty = self.empty_captions(tokens)
            drop = jax.random.bernoulli(rng, self.caption_drop_prob, (tokens.shape[0], 1))
            tokens = jnp.where(drop, empty, tokens)
        codes = self.image_codes(extra, batch["image"]) + self.model.text_vocab
        return jnp.concatenate([self.text_ids(tokens), codes], axis=1)

    # -- the protocol ---------------------------------------------------------------------------
    def init(self, rng, batch):
        seq = jnp.zeros((1, self.model.max_length - 1), jnp.int32)
        params = self.model.init({"params": rng}, seq)["params"]
        _, tok_params = self.tokenizer
        return params, {"tokenizer": tok_params}

    def loss(self, params, extra, batch, rng, step):
        d_rng, c_rng = jax.random.split(rng)
        seq = self.sequence(extra, batch, c_rng)
        out = self.model.apply({"params": params}, seq[:, :-1], train=True, rngs={"dropout": d_rng})
        text_nll, image_nll, image_acc = split_losses(out["logits"], seq[:, 1:], self.text_length)
        w = self.text_loss_weight
        loss = w * text_nll + (1.0 - w) * image_nll
        return loss, ({"text_loss": text_nll, "image_loss": image_nll, "image_token_accuracy": image_acc}, extra)

    def eval_metrics(self, params, extra, batch, rng):
        """Per-example image-code NLL (``image_nll``) and text NLL (``text_nll``)."""
        seq = self.sequence(extra, batch)
        logits = self.model.apply({"params": params}, seq[:, :-1])["logits"]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(logp, seq[:, 1:, None], -1)[..., 0]
        cut = self.text_length - 1
        return {"image_nll": nll[:, cut:].mean(1), "text_nll": nll[:, :cut].mean(1)}

    def sample_codes(self, params, tokens, rng, **overrides):
        """[B, N] image codes sampled after the captions ``tokens`` (B, n)."""
        s = dict(dict(temperature=1.0, top_k=int(self.model.image_vocab) // 2), **self.sampling)
        s.update({k: v for k, v in overrides.items() if v is not None})
        tokens = jnp.asarray(tokens, jnp.int32)
        prompt = self.text_ids(tokens)
        n_new = self.grid ** 2
        g = float(s.get("guidance_scale", 1.0))
        guide = dict(guidance_scale=g, uncond_prompt=self.text_ids(self.empty_captions(tokens))) if g != 1.0 else {}
        if s.pop("greedy", False):
            out = generate_lib.sample(self.model, params, prompt, n_new, greedy=True, **guide)
        else:
            out = generate_lib.sample(self.model, params, prompt, n_new, rng,
                                      temperature=float(s.get("temperature", 1.0)),
                                      top_k=int(s.get("top_k", 0) or 0), top_p=float(s.get("top_p", 1.0)),
                                      **guide)
        return out[:, self.text_length:] - self.model.text_vocab

    def decode_codes(self, extra, codes):
        """[B, N] codes -> images in [0, 1] (the dVAE decoder)."""
        from fmjax.models import dvae
        module, _ = self.tokenizer
        g = self.grid
        stats = module.apply({"params": extra["tokenizer"]}, codes.reshape(codes.shape[0], g, g),
                             method=type(module).decode_tokens)
        return dvae.reconstruction(stats, module.output)

    def reconstruct(self, params, extra, images):
        """Images in [0, 1] -> their dVAE hard-code reconstructions in [0, 1]: the best a
        sample can look (the 'generation' eval scores them as ``classifier_recon_accuracy``)."""
        return self.decode_codes(extra, self.image_codes(extra, images))

    def generate(self, params, extra, cond_batch, rng, shape=None, use_ema: bool = True, **overrides):
        """Samples in [-1, 1] (B, H, W, C) for the captions ``cond_batch['tokens']``."""
        del shape, use_ema
        for key in ("x_T", "sharding"):
            overrides.pop(key, None)
        codes = self.sample_codes(params, cond_batch["tokens"], rng, **overrides)
        return self.decode_codes(extra, codes) * 2.0 - 1.0

    def visualize(self, params, extra, batch, rng):
        """Rows: the real image, its dVAE reconstruction (the most a sample can reach), and a
        sample for its caption."""
        n = min(8, batch["image"].shape[0])
        images = batch["image"][:n]
        recon = self.reconstruct(params, extra, images)
        sample = self.decode_codes(extra, self.sample_codes(params, batch["tokens"][:n], rng))
        return {"samples": image_lib.image_grid([np.asarray(images), np.asarray(recon), np.asarray(sample)])}


def make(config) -> DalleObjective:
    return DalleObjective(config)
