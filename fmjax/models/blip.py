"""BLIP (Li et al., 2022): an image encoder and a multimodal mixture of encoder-decoder (MED).

The layout is salesforce/BLIP's pre-training model (``models/blip_pretrain.py``
``BLIP_Pretrain``, ``models/med.py``):

* **Image** (``image``): any registered image tower (``config.model.image``, as CLIP's; BLIP
  uses a timm ViT: class token, no ln_pre, LayerNorm eps 1e-6). Its final-norm tokens
  (``tokens``, or ``patch_tokens``) are what the text side cross-attends to; its pooled output
  (``pre_logits``: the class token) through ``vision_proj`` (with bias) is the ITC embedding.
* **Text** (``text``, ``MED``): BERT, post-LN. Embeddings ``word_embed`` + learned ``pos_embed``
  (``max_positions`` rows, no token types) -> LayerNorm ``embed_norm``; per layer ``layer_{i}``:
  self-attention ``attn`` (bidirectional, padding keys masked), cross-attention ``cross`` over
  the image tokens, feed-forward ``ffn``; each sub-block is ``LN(x + dropout(f(x)))``. One
  module, three modes (med.py's ``mode``):
    - ``'text'``: the unimodal text encoder (no cross-attention); its first token through
      ``text_proj`` (with bias) is the ITC embedding.
    - ``'multimodal'``: the image-grounded text encoder (cross-attention on); the first token
      (the caller puts ``enc_token_id`` there) through ``itm_head`` (2 logits, index 1 =
      match) is ITM.
    - ``'decoder'``: the image-grounded text decoder: a causal self-attention of its own,
      ``dec_attn``, then the same cross-attention and feed-forward; ``lm_head`` (dense -> gelu
      -> LayerNorm, then the word embedding transposed plus a bias) gives the next-token logits.
  This is exactly BLIP's weight tying (``tie_encoder_decoder_weights(text_encoder,
  text_decoder.bert, '', '/attention')`` ties everything but each layer's self-attention
  module; HF ties the LM head's decoder to the word embedding): one param tree in which only
  ``dec_attn`` and ``lm_head`` belong to the decoder alone.
* ``temp`` (): the ITC temperature, learned from 0.07 (the objective clamps it to [0.001, 0.5]).

``enc_token_id`` / ``dec_token_id`` (defaults ``vocab_size - 1`` / ``vocab_size - 2``: BLIP's
[ENC] 30523 and [DEC] 30522 after ``resize_token_embeddings`` of bert-base-uncased to 30524)
replace the first token (the tokenizer's start / [CLS] token) for ITM and LM.

Methods: ``encode_image`` / ``encode_text`` (L2-normalised ITC embeddings; zero-shot and
retrieval evals work as for CLIP), ``image_features(images, train) -> (tokens, ITC embedding
before normalisation)``, ``text_embedding(tokens, train)``, ``itm_logits(image_tokens, tokens,
train)`` (B, 2), ``lm_logits(image_tokens, tokens, train)`` (B, L, vocab), and the captioning
pair ``image_tokens`` / ``caption_logits_from`` (the decoder with ``dec_token_id`` in front).
``__call__`` runs all three modes (it creates every param at init).
"""
from typing import Any, Dict, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models import layers
from fmjax.models.attention import MultiHeadAttention
from fmjax.models.clip import _frozen, l2_normalize, tower_from_sub_config
from fmjax.models.core import get_activation, layer_norm
from fmjax.models.text import causal_mask

Dtype = Any
MODES = ("text", "multimodal", "decoder")

# BLIP text presets (bert-base-uncased as in med_config.json; the ViT is config.model.image).
BLIP_PRESETS = {
    "base": dict(text_width=768, text_depth=12, text_heads=12, text_mlp_dim=3072,
                 image=dict(name="vit", variant="B/16", class_token=True, pool="cls",
                            layernorm_eps=1e-6, num_classes=0)),
    "large": dict(text_width=768, text_depth=12, text_heads=12, text_mlp_dim=3072,
                  image=dict(name="vit", variant="L/16", class_token=True, pool="cls",
                             layernorm_eps=1e-6, num_classes=0)),
}


def blip_kwargs(variant: str, **overrides) -> Dict[str, Any]:
    """'base' -> BLIP kwargs (ViT-B/16 + BERT-base, as blip_pretrain(vit='base')) + overrides."""
    if variant not in BLIP_PRESETS:
        raise ValueError(f"Unknown BLIP variant {variant!r}; valid: {', '.join(BLIP_PRESETS)}.")
    kwargs = dict(BLIP_PRESETS[variant])
    kwargs.update(overrides)
    return kwargs


def _dense_init(std: float):
    return nn.initializers.normal(std)  # BERT's _init_weights: N(0, initializer_range)


class PostNormAttention(nn.Module):
    """med.py ``BertAttention``: ``LN(x + dropout(out(attention(x, kv))))``."""
    num_heads: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_eps: float = 1e-12
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv=None, mask=None, deterministic=True):
        h = MultiHeadAttention(self.num_heads, attention_dropout=self.attention_dropout,
                               attention_impl=self.attention_impl, dtype=self.dtype,
                               param_dtype=self.param_dtype, name="attn")(
            x, kv=kv, mask=mask, deterministic=deterministic)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm")(x + h)


class PostNormFFN(nn.Module):
    """med.py ``BertIntermediate`` + ``BertOutput``: ``LN(x + dropout(fc2(act(fc1(x)))))``."""
    mlp_dim: int
    activation: str = "gelu"
    dropout: float = 0.0
    layernorm_eps: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic=True):
        h = layers.dense(self.mlp_dim, ("embed", "mlp"), self.dtype, self.param_dtype, "fc1")(x)
        h = get_activation(self.activation)(h)
        h = layers.dense(x.shape[-1], ("mlp", "embed"), self.dtype, self.param_dtype, "fc2")(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm")(x + h)


class MEDLayer(nn.Module):
    """med.py ``BertLayer`` with the decoder's own self-attention beside the encoder's."""
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_eps: float = 1e-12
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, mode, context=None, deterministic=True):
        kw = dict(num_heads=self.num_heads, dropout=self.dropout,
                  attention_dropout=self.attention_dropout, layernorm_eps=self.layernorm_eps,
                  attention_impl=self.attention_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        x = PostNormAttention(**kw, name="dec_attn" if mode == "decoder" else "attn")(
            x, mask=mask, deterministic=deterministic)
        if mode != "text":
            x = PostNormAttention(**kw, name="cross")(x, kv=context, deterministic=deterministic)
        x = PostNormFFN(self.mlp_dim, self.activation, self.dropout, self.layernorm_eps,
                        self.dtype, self.param_dtype, name="ffn")(x, deterministic)
        return layers.constrain(x)


class LMHead(nn.Module):
    """med.py ``BertOnlyMLMHead``: ``transform`` (dense) -> gelu -> LayerNorm ``norm`` -> the
    tied word embedding transposed plus ``bias``."""
    activation: str = "gelu"
    layernorm_eps: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden, embedding):
        width = hidden.shape[-1]
        h = layers.dense(width, ("embed", None), self.dtype, self.param_dtype, "transform")(hidden)
        h = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm")(
            get_activation(self.activation)(h))
        bias = self.param("bias", layers.part(nn.initializers.zeros, ("vocab",)),
                          (embedding.shape[0],), self.param_dtype)
        return h @ embedding.astype(self.dtype).T + bias.astype(self.dtype)


class MED(nn.Module):
    """BLIP's multimodal mixture of encoder-decoder (module docstring).

    ``__call__(tokens (B, L), mode, context=None, train=False)`` -> (B, L, width) hidden states;
    ``logits(hidden)`` -> (B, L, vocab) through the LM head (tied word embedding).
    """
    vocab_size: int = 30524
    max_positions: int = 512
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_eps: float = 1e-12
    pad_id: int = 0
    init_std: float = 0.02
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        std = self.init_std
        self.word_embed = nn.Embed(
            self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=layers.part(_dense_init(std), ("vocab", "embed")))
        self.pos_embed = self.param("pos_embed", layers.part(_dense_init(std), (None, "embed")),
                                    (self.max_positions, self.width), self.param_dtype)
        self.embed_norm = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype)
        self.embed_drop = nn.Dropout(self.dropout)
        self.layers = [MEDLayer(self.num_heads, self.mlp_dim, self.activation, self.dropout,
                                self.attention_dropout, self.layernorm_eps, self.attention_impl,
                                self.dtype, self.param_dtype, name=f"layer_{i}")
                       for i in range(self.depth)]
        self.lm_head = LMHead(self.activation, self.layernorm_eps, self.dtype, self.param_dtype)

    def __call__(self, tokens, mode: str = "text", context=None, train: bool = False):
        if mode not in MODES:
            raise ValueError(f"Unknown MED mode {mode!r}; valid: {MODES}.")
        if mode != "text" and context is None:
            raise ValueError(f"MED mode {mode!r} needs the image tokens (context).")
        length = tokens.shape[1]
        if length > self.max_positions:
            raise ValueError(f"Text length {length} exceeds max_positions={self.max_positions}.")
        x = self.word_embed(tokens) + self.pos_embed[:length].astype(self.dtype)[None]
        x = self.embed_drop(self.embed_norm(x), deterministic=not train)
        mask = (tokens != self.pad_id)[:, None, None, :]
        if mode == "decoder":
            mask = mask & causal_mask(length)
        for layer in self.layers:
            x = layer(x, mask, mode, context, not train)
        return x

    def logits(self, hidden):
        """(B, L, vocab) next-token logits of the decoder's hidden states (``LMHead``)."""
        return self.lm_head(hidden, self.word_embed.embedding)


class BLIP(nn.Module):
    """BLIP pre-training model (module docstring). Fields: the ``image`` tower sub-config, the
    MED's ``text_*`` shape, ``embed_dim`` (ITC), ``vocab_size``, ``max_positions``,
    ``pad_id``, ``enc_token_id`` / ``dec_token_id`` (None: ``vocab_size - 1`` / ``- 2``),
    ``dropout`` / ``attention_dropout`` (the text side's; BERT: 0.1 / 0.1), ``temp_init``."""

    capabilities = frozenset({"image_text", "captioning", "image_text_matching"})

    image: Optional[Mapping[str, Any]] = None
    embed_dim: int = 256
    text_width: int = 768
    text_depth: int = 12
    text_heads: int = 12
    text_mlp_dim: int = 3072
    vocab_size: int = 30524
    max_positions: int = 512
    pad_id: int = 0
    enc_token_id: Optional[int] = None
    dec_token_id: Optional[int] = None
    activation: str = "gelu"
    layernorm_eps: float = 1e-12
    dropout: float = 0.0
    attention_dropout: float = 0.0
    temp_init: float = 0.07
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "image", _frozen(self.image))
        super().__post_init__()

    @property
    def special_ids(self):
        """(enc_token_id, dec_token_id)."""
        enc = self.vocab_size - 1 if self.enc_token_id is None else self.enc_token_id
        dec = self.vocab_size - 2 if self.dec_token_id is None else self.dec_token_id
        return enc, dec

    def image_tower(self):
        """``(registry name, class, kwargs)`` of ``config.model.image`` (one-line ValueErrors)."""
        if self.image is None:
            raise ValueError("BLIP needs its image tower: config.model.image=dict(name='vit', "
                             "variant=..., pool='cls', ...) (or model.variant='base').")
        return tower_from_sub_config(self.image, self.dtype, self.param_dtype)

    def check_towers(self):
        name, cls, kwargs = self.image_tower()
        from fmjax.models import registry
        registry.require(cls(**kwargs, parent=None), ("pooled",), "BLIP's image tower", name,
                         key="config.model.image.name")
        for tid in self.special_ids:
            if not 0 <= tid < self.vocab_size:
                raise ValueError(f"BLIP's [ENC]/[DEC] ids {self.special_ids} must lie in "
                                 f"[0, vocab_size={self.vocab_size}).")
        return name, cls, kwargs

    @property
    def image_patch_size(self):
        return self.image_tower()[2].get("patch_size")

    def setup(self):
        _, cls, kwargs = self.check_towers()
        self.image_encoder = cls(**kwargs, name="image")
        dense = lambda n, name: nn.Dense(  # noqa: E731  torch nn.Linear with BERT's init
            n, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=layers.part(_dense_init(0.02), ("embed", None)),
            bias_init=layers.part(nn.initializers.zeros, (None,)))
        self.vision_proj = dense(self.embed_dim, "vision_proj")
        self.text_proj = dense(self.embed_dim, "text_proj")
        self.itm_head = dense(2, "itm_head")
        self.text_encoder = MED(
            vocab_size=self.vocab_size, max_positions=self.max_positions, width=self.text_width,
            depth=self.text_depth, num_heads=self.text_heads, mlp_dim=self.text_mlp_dim,
            activation=self.activation, dropout=self.dropout,
            attention_dropout=self.attention_dropout, layernorm_eps=self.layernorm_eps,
            pad_id=self.pad_id, attention_impl=self.attention_impl, dtype=self.dtype,
            param_dtype=self.param_dtype, name="text")
        self.temp = self.param("temp", layers.part(nn.initializers.constant(self.temp_init), ()),
                               (), self.param_dtype)

    # -- the pieces the objective composes ------------------------------------------------
    def image_features(self, images, train: bool = False):
        """(image tokens (B, T, D) for cross-attention, ITC embedding (B, embed_dim) before
        normalisation)."""
        out = self.image_encoder(images, train=train)
        tokens = out["tokens"] if "tokens" in out else out["patch_tokens"]
        return tokens, self.vision_proj(out["pre_logits"])

    def text_embedding(self, tokens, train: bool = False):
        """The unimodal encoder's first token through ``text_proj`` (not normalised)."""
        return self.text_proj(self.text_encoder(tokens, "text", train=train)[:, 0])

    def _with_first(self, tokens, token_id):
        return tokens.at[:, 0].set(token_id)

    def itm_logits(self, image_tokens, tokens, train: bool = False):
        """(B, 2) match logits of (image, text) pairs; ``tokens`` already start with [ENC]."""
        h = self.text_encoder(tokens, "multimodal", image_tokens, train=train)
        return self.itm_head(h[:, 0])

    def lm_logits(self, image_tokens, tokens, train: bool = False):
        """(B, L, vocab) next-token logits; ``tokens`` already start with [DEC]."""
        h = self.text_encoder(tokens, "decoder", image_tokens, train=train)
        return self.text_encoder.logits(h)

    # -- capabilities ---------------------------------------------------------------------
    def encode_image(self, images, train: bool = False, normalize: bool = True):
        emb = self.image_features(images, train)[1]
        return l2_normalize(emb) if normalize else emb

    def encode_text(self, tokens, train: bool = False, normalize: bool = True):
        emb = self.text_embedding(tokens, train)
        return l2_normalize(emb) if normalize else emb

    def logit_terms(self):
        """(1 / temp, None): ITC's similarity scale, as CLIP's ``logit_terms``."""
        return 1.0 / self.temp.astype(jnp.float32), None

    def image_tokens(self, images, train: bool = False):
        return self.image_features(images, train)[0]

    def caption_logits_from(self, image_tokens, tokens, train: bool = False):
        """Next-token logits of ``tokens`` (whose first token, the tokenizer's start token,
        becomes [DEC]) given the image tokens."""
        return self.lm_logits(image_tokens, self._with_first(tokens, self.special_ids[1]), train)

    def match_probability(self, images, tokens):
        """P(match) of each (image i, caption i) pair, (B,): softmax(itm_logits)[:, 1]."""
        enc = self._with_first(tokens, self.special_ids[0])
        return jax.nn.softmax(self.itm_logits(self.image_tokens(images), enc).astype(jnp.float32),
                              -1)[:, 1]

    def __call__(self, images, tokens, train: bool = False) -> Dict[str, jax.Array]:
        """ITC embeddings (normalised), the positive pairs' ITM logits and the LM logits."""
        image_tokens, image_emb = self.image_features(images, train)
        enc, dec = self.special_ids
        return dict(
            image_embeds=l2_normalize(image_emb),
            text_embeds=l2_normalize(self.text_embedding(tokens, train)),
            itm_logits=self.itm_logits(image_tokens, self._with_first(tokens, enc), train),
            lm_logits=self.lm_logits(image_tokens, self._with_first(tokens, dec), train))
