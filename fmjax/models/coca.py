"""CoCa (Yu et al., 2022): a contrastive image-text model whose text side also captions.

The layout is open_clip's ``CoCa`` (``src/open_clip/coca_model.py``, the released
``coca_ViT-B-32`` / ``coca_ViT-L-14`` configs), on top of ``fmjax.models.clip.CLIP``:

* **Image**: the CLIP image tower (a class-token ViT with ln_pre), every output token, then an
  attentional pooler: ``num_queries`` learned queries (``attn_pool/query``, LayerNorm
  ``attn_pool/norm_q``) attend to the tower's tokens (the ViT's final norm ``image/encoder/norm``
  is open_clip's ``attn_pool.ln_k``). ``ln_post`` normalises the pooled queries; the first one,
  through ``image_proj``, is the contrastive image embedding (open_clip's
  ``pool_type='tok'``), the other ``num_queries - 1`` are the image tokens the multimodal
  decoder attends to. (open_clip calls this "the original OpenCLIP CoCa setup, does not match
  paper": the paper pools the contrastive embedding with a separate single query; that is
  ``pooler_type='parallel'`` or ``'cascade'``, see ``CoCa``.)
* **Unimodal text decoder**: the CLIP text tower with ``embed_cls=True``
  (``fmjax.models.text``): causal, a learned class embedding appended at the end whose final
  norm and ``text/proj`` give the contrastive text embedding; padding keys (``pad_id``) are
  masked (``legacy_cls_mask``: open_clip's shifted mask, see ``fmjax.models.text``).
* **Multimodal decoder** (``decoder``): per layer a causal self-attention block
  (``block_{i}``, ``layers.Block``) then a cross-attention block (``cross_{i}``: LayerNorm on
  the queries ``norm1`` and on the image tokens ``norm_kv``, attention, then its own MLP), a
  final LayerNorm ``norm`` and a bias-free ``head`` (width, vocab_size) on the text tower's
  pre-norm token outputs. ``caption_logits[:, t]`` predicts token t + 1.

``__call__(images, tokens, train)`` returns CLIP's outputs (``image_embeds``, ``text_embeds``
L2-normalised, ``logit_scale``, ``logits_per_image``) plus ``caption_logits`` (B, L, vocab).
``encode_image`` / ``encode_text`` are the normalised contrastive embeddings (zero-shot,
retrieval, kNN work as for CLIP); ``image_tokens(images)`` and ``caption_logits_from(image
tokens, tokens)`` are the halves a captioner decodes with.

The decoder's width is the text tower's (``text_width``); the image tokens have ``embed_dim``
features (open_clip sets both to ``embed_dim``). ``fmjax/interop/open_clip_coca.py`` converts
open_clip CoCa weights; tests/interop/test_coca_parity.py compares outputs, losses and
gradients with a transcription of open_clip's model and ``CoCaLoss``.
"""
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models import layers
from fmjax.models.attention import MultiHeadAttention
from fmjax.models.blocks import Block, Mlp
from fmjax.models.clip import CLIP, clip_kwargs, l2_normalize
from fmjax.models.core import layer_norm
from fmjax.models.text import causal_mask

Dtype = Any

POOLER_TYPES = ("tok", "parallel", "cascade")  # CoCa.pooler_type
# CoCa variant -> CLIP variant and the multimodal decoder's depth / heads (open_clip configs).
COCA_PRESETS = {
    "B/32": ("B/32", 12, 8),   # open_clip coca_ViT-B-32
    "L/14": ("L/14", 12, 12),  # open_clip coca_ViT-L-14
}


def coca_kwargs(variant: str, **overrides) -> Dict[str, Any]:
    """'B/32' -> CoCa kwargs (open_clip's ``coca_ViT-B-32``: CLIP B/32 towers with a width-512
    text tower, a 12-layer multimodal decoder, 256 pooler queries) plus ``overrides``."""
    if variant not in COCA_PRESETS:
        raise ValueError(f"Unknown CoCa variant {variant!r}; valid: {', '.join(COCA_PRESETS)}.")
    clip_variant, depth, heads = COCA_PRESETS[variant]
    kwargs = clip_kwargs(clip_variant)
    kwargs.update(decoder_depth=depth, decoder_heads=heads,
                  decoder_mlp_dim=4 * kwargs["text_width"], context_length=76, activation="gelu")
    kwargs.update(overrides)
    return kwargs


class AttentionalPooler(nn.Module):
    """``num_queries`` learned queries (``query``, normalised by ``norm_q``) attend to ``x``
    (B, T, D'); returns (B, num_queries, width). open_clip's ``AttentionalPooler``; its ``ln_k``
    is ``norm_k`` with ``norm_kv``, else left to the caller (the 'tok' pooler's is the tower's
    final norm)."""
    width: int
    num_queries: int
    num_heads: int
    layernorm_eps: float = 1e-5
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    norm_kv: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.norm_kv:
            x = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm_k")(x)
        query = self.param("query", layers.part(nn.initializers.normal(1.0), (None, "embed")),
                           (self.num_queries, self.width), self.param_dtype)
        q = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm_q")(
            query.astype(self.dtype))
        q = jnp.broadcast_to(q[None], (x.shape[0],) + q.shape)
        return MultiHeadAttention(self.num_heads, attention_impl=self.attention_impl,
                                  dtype=self.dtype, param_dtype=self.param_dtype,
                                  name="attn")(q, kv=x)


class CrossBlock(nn.Module):
    """open_clip's ``ResidualAttentionBlock(is_cross_attention=True)``:
    x + attn(LN(x), LN_kv(context)); x + mlp(LN(x))."""
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    layernorm_eps: float = 1e-5
    activation: str = "gelu"
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, deterministic: bool = True) -> jax.Array:
        h = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm1")(x)
        kv = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm_kv")(context)
        h = MultiHeadAttention(self.num_heads, attention_impl=self.attention_impl,
                               dtype=self.dtype, param_dtype=self.param_dtype,
                               name="attn")(h, kv=kv, deterministic=deterministic)
        x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm2")(x)
        h = Mlp(self.mlp_dim, activation=self.activation, dropout=self.dropout, dtype=self.dtype,
                param_dtype=self.param_dtype, name="mlp")(h, deterministic=deterministic)
        return layers.constrain(x + h)


class MultimodalDecoder(nn.Module):
    """open_clip's ``MultimodalTransformer``: (self-attention block, cross-attention block) x
    depth, a final LayerNorm and a bias-free projection to the vocabulary."""
    vocab_size: int
    depth: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    layernorm_eps: float = 1e-5
    activation: str = "gelu"
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, train: bool = False) -> jax.Array:
        mask = causal_mask(x.shape[1])
        kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                  layernorm_eps=self.layernorm_eps, activation=self.activation,
                  attention_impl=self.attention_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        for i in range(self.depth):
            x = Block(**kw, name=f"block_{i}")(x, not train, mask)
            x = CrossBlock(**kw, name=f"cross_{i}")(x, context, not train)
        x = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm")(x)
        width = x.shape[-1]
        return nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="head",
                        kernel_init=layers.part(nn.initializers.normal(width ** -0.5),
                                                ("embed", "vocab")))(x)


class CoCa(CLIP):
    """CLIP plus an attentional image pooler and a captioning decoder (module docstring).

    Fields beyond CLIP's: ``num_queries`` / ``pooler_heads`` (the pooler), ``pooler_type``
    (POOLER_TYPES: 'tok', open_clip's default, the first pooled query is the contrastive one;
    'parallel' / 'cascade', the paper's: a separate one-query pooler ``attn_pool_contrastive``
    over the tower's tokens, or over the caption pooler's ``num_queries`` outputs, each pooler
    with its own key norm ``norm_k``, the tower's final norm as open_clip's ``ln_post`` before
    both, no ``ln_post`` after; open_clip's ``attentional_pool='parallel'`` / ``'cascade'``,
    which it builds only for width == embed_dim), ``decoder_depth``,
    ``decoder_heads``, ``decoder_mlp_dim`` (the multimodal decoder), ``pad_id`` (masked keys of
    the text tower; the caption loss ignores it as a target) and ``legacy_cls_mask``.
    """

    capabilities = frozenset({"image_text", "captioning"})

    num_queries: int = 256
    pooler_heads: int = 8
    pooler_type: str = "tok"
    decoder_depth: int = 12
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    pad_id: int = 0
    legacy_cls_mask: bool = False

    def text_tower(self) -> Dict[str, Any]:
        kwargs = super().text_tower()
        kwargs.update(embed_cls=True, pad_id=self.pad_id, legacy_cls_mask=self.legacy_cls_mask)
        return kwargs

    def setup(self):
        if self.pooler_type not in POOLER_TYPES:
            raise ValueError(f"CoCa pooler_type={self.pooler_type!r}; valid: {', '.join(POOLER_TYPES)}.")
        tok = self.pooler_type == "tok"
        if self.num_queries < (2 if tok else 1):
            raise ValueError(f"CoCa needs num_queries >= {2 if tok else 1} ({'1 contrastive + ' if tok else ''}"
                             f"the caption tokens) with pooler_type={self.pooler_type!r}, got {self.num_queries}.")
        super().setup()
        pool = dict(layernorm_eps=self.layernorm_eps, attention_impl=self.attention_impl,
                    dtype=self.dtype, param_dtype=self.param_dtype, norm_kv=not tok)
        self.attn_pool = AttentionalPooler(self.embed_dim, self.num_queries, self.pooler_heads, **pool)
        if tok:
            self.ln_post = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype)
        else:
            self.attn_pool_contrastive = AttentionalPooler(self.embed_dim, 1, self.pooler_heads, **pool)
        self.decoder = MultimodalDecoder(
            self.vocab_size, self.decoder_depth, self.decoder_heads, self.decoder_mlp_dim,
            self.dropout, self.layernorm_eps, self.text_activation or self.activation,
            self.attention_impl, self.dtype, self.param_dtype)

    def _image(self, images: jax.Array, train: bool):
        """(contrastive embedding before normalisation (B, embed_dim), image tokens
        (B, num_queries - 1, embed_dim))."""
        out = self.image_encoder(images, train=train)
        tokens = out["tokens"] if "tokens" in out else out["patch_tokens"]
        if self.pooler_type == "tok":
            x = self.ln_post(self.attn_pool(tokens))
            return self.image_proj(x[:, 0]), x[:, 1:]
        caption_tokens = self.attn_pool(tokens)
        pooled = self.attn_pool_contrastive(tokens if self.pooler_type == "parallel" else caption_tokens)
        return self.image_proj(pooled[:, 0]), caption_tokens

    def encode_image(self, images: jax.Array, train: bool = False,
                     normalize: bool = True) -> jax.Array:
        emb = self._image(images, train)[0]
        return l2_normalize(emb) if normalize else emb

    def image_tokens(self, images: jax.Array, train: bool = False) -> jax.Array:
        """(B, num_queries - 1 ('tok') or num_queries, embed_dim): what the multimodal decoder
        attends to."""
        return self._image(images, train)[1]

    def caption_logits_from(self, image_tokens: jax.Array, tokens: jax.Array,
                            train: bool = False) -> jax.Array:
        """(B, L, vocab) next-token logits of ``tokens`` (B, L) given the image tokens."""
        text_tokens = self.text_encoder(tokens, train=train)["tokens"]
        return self.decoder(text_tokens, image_tokens, train)

    def __call__(self, images: jax.Array, tokens: jax.Array,
                 train: bool = False) -> Dict[str, jax.Array]:
        image_emb, image_tokens = self._image(images, train)
        text = self.text_encoder(tokens, train=train)
        out = self.pair_outputs(l2_normalize(image_emb), l2_normalize(text["embedding"]))
        out["caption_logits"] = self.decoder(text["tokens"], image_tokens, train)
        return out

