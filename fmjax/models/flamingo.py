"""Flamingo's building blocks (Alayrac et al., 2022): the Perceiver resampler and the gated
cross-attention-dense block that is inserted into a frozen language model.

The layout is open_flamingo's (mlfoundations/open_flamingo ``open_flamingo/src/helpers.py``,
itself lucidrains/flamingo-pytorch), in Flax:

* ``PerceiverResampler``: ``num_latents`` learned latents (``latents``) attend, per media item,
  to ``concat(LN(x), LN(latents))`` (``PerceiverAttention``: bias-free ``to_q``, ``to_kv``,
  ``to_out``; LayerNorms ``norm_media``, ``norm_latents``), then a bias-free feed-forward
  (``FeedForward``: LN, Dense(mult x dim), GELU, Dense(dim)); residual both; a final LN.
  ``media_time_embs`` (``max_num_media``, 1, dim) are added per media item when set.
  Input (B, T_img, v, D) visual tokens, output (B, T_img, num_latents, D).
* ``MaskedCrossAttention``: text queries (LN ``norm``, bias-free ``to_q``) attend to the
  latents of the media (``to_kv``); ``media_locations`` (B, T_txt) bool marks the text
  positions holding an ``<image>`` token; a text token's "time" is the number of media
  tokens at or before it, and it attends only to the latents of media item ``time`` (the
  immediately preceding image; ``only_attend_immediate_media=False``: every earlier item).
  Text before any media attends to nothing (its output is 0).
* ``GatedCrossAttentionBlock``: ``x + tanh(attn_gate) * xattn(x)``, then
  ``x + tanh(ff_gate) * ff(x)``, both gates initialised at 0, so the language model's output
  is exactly unchanged at initialisation (tests/models/test_flamingo.py checks it bit for bit).

``fmjax.models.decoder.Decoder(gated_cross_every=k, ...)`` inserts a ``gated_{i}`` block
before every k-th decoder block (open_flamingo's ``FlamingoLayer``: gated cross-attention,
then the frozen LM layer) and takes ``media`` / ``media_locations``.

**The model** (``Flamingo``, registry ``flamingo``, capability ``interleaved_lm``):
``vision`` (any registered image tower, ``config.model.vision``; its final tokens) ->
``resampler`` -> the gated cross-attention of ``lm`` (a ``Decoder``, ``config.model.lm``: the
kwargs of a ``configs/gpt.py`` model, whose workdir loads into ``lm`` with
``model_init.mapping={'params': 'lm'}``). Text is interleaved with ``image_token_id`` tokens,
one per image, in the order of the images (open_flamingo's ``<image>``); the text after the
k-th one attends to image k. ``projection='mlp'`` is the LLaVA sibling (Liu et al., 2023;
LLaVA-1.5's two-layer GELU MLP ``mm_projector``): no resampler and no gated layers; each image's
``v`` tokens are projected into the LM's embedding space and REPLACE the embeddings of ``v``
consecutive ``image_token_id`` placeholders (the sequence then holds ``v`` placeholders per
image; ``media_tokens_per_image``). Param tree: ``vision``, ``resampler`` (or ``projector``
``fc1``/``fc2``), ``lm`` (``token_embed``, ``pos_embed``, ``block_{i}``, ``gated_{i}``, ``norm``).
"""
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models.core import dense, layer_norm, part

Dtype = Any
_NEG = -jnp.finfo(jnp.float32).max


def _heads_split(x, heads):
    return x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))


def _attention(m, q_in, kv_in, allowed=None, silent=None):
    """open_flamingo's bias-free multi-head attention, inside module ``m``'s compact call
    (``heads``, ``dim_head``, dtypes): ``to_q`` (q_in), ``to_kv`` (kv_in), softmax over the keys
    where ``allowed`` (else -max), rows where ``silent`` zeroed, ``to_out``."""
    d, inner = q_in.shape[-1], m.heads * m.dim_head
    q = dense(inner, ("embed", "mlp"), m.dtype, m.param_dtype, "to_q", use_bias=False)(q_in)
    kv = dense(2 * inner, ("embed", "mlp"), m.dtype, m.param_dtype, "to_kv", use_bias=False)(kv_in)
    q, k, v = (_heads_split(t, m.heads) for t in (q, kv[..., :inner], kv[..., inner:]))
    sim = jnp.einsum("...ihd,...jhd->...hij", q * m.dim_head ** -0.5, k).astype(jnp.float32)
    if allowed is not None:
        sim = jnp.where(allowed, sim, _NEG)
    attn = jax.nn.softmax(sim, -1)
    if silent is not None:
        attn = jnp.where(silent, 0.0, attn)
    out = jnp.einsum("...hij,...jhd->...ihd", attn.astype(v.dtype), v).reshape(q.shape[:-2] + (inner,))
    return dense(d, ("mlp", "embed"), m.dtype, m.param_dtype, "to_out", use_bias=False)(out)


class FeedForward(nn.Module):
    """open_flamingo ``FeedForward``: LN -> Dense(mult x dim, no bias) -> GELU -> Dense(dim)."""
    mult: float = 4.0
    layernorm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm")(x)
        h = dense(int(d * self.mult), ("embed", "mlp"), self.dtype, self.param_dtype, "fc1",
                  use_bias=False)(h)
        h = nn.gelu(h, approximate=False)
        return dense(d, ("mlp", "embed"), self.dtype, self.param_dtype, "fc2", use_bias=False)(h)


class PerceiverAttention(nn.Module):
    """open_flamingo ``PerceiverAttention``: latents attend to ``concat(media, latents)``."""
    heads: int = 8
    dim_head: int = 64
    layernorm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, latents):
        x = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm_media")(x)
        latents = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm_latents")(latents)
        return _attention(self, latents, jnp.concatenate([x, latents], -2))


class PerceiverResampler(nn.Module):
    """(B, T_img, v, D) visual tokens -> (B, T_img, num_latents, D) (module docstring)."""
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    num_latents: int = 64
    max_num_media: Optional[int] = None
    ff_mult: float = 4.0
    layernorm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, _, d = x.shape
        latents = self.param("latents", part(nn.initializers.normal(1.0), (None, "embed")),
                             (self.num_latents, d), self.param_dtype)
        if self.max_num_media:
            if t > self.max_num_media:
                raise ValueError(f"{t} media items exceed max_num_media={self.max_num_media}.")
            time = self.param("media_time_embs", part(nn.initializers.normal(1.0), (None, None, "embed")),
                              (self.max_num_media, 1, d), self.param_dtype)
            x = x + time[:t].astype(x.dtype)
        lat = jnp.broadcast_to(latents.astype(self.dtype), (b, t) + latents.shape)
        for i in range(self.depth):
            lat = PerceiverAttention(self.heads, self.dim_head, self.layernorm_eps, self.dtype,
                                     self.param_dtype, name=f"attn_{i}")(x, lat) + lat
            lat = FeedForward(self.ff_mult, self.layernorm_eps, self.dtype, self.param_dtype,
                              name=f"ff_{i}")(lat) + lat
        return layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm")(lat)


def text_time(media_locations):
    """(B, T_txt) int: how many media tokens are at or before each text position."""
    return jnp.cumsum(jnp.asarray(media_locations, jnp.int32), axis=-1)


class MaskedCrossAttention(nn.Module):
    """open_flamingo ``MaskedCrossAttention`` (module docstring); ``media`` (B, T_img, n, D_v)."""
    heads: int = 8
    dim_head: int = 64
    only_attend_immediate_media: bool = True
    layernorm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, media, media_locations):
        b, t_img, n = media.shape[:3]
        x = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm")(x)
        ttime = text_time(media_locations)                                  # (B, T_txt)
        mtime = jnp.repeat(jnp.arange(1, t_img + 1), n)                     # (T_img * n,)
        op = jnp.equal if self.only_attend_immediate_media else jnp.greater_equal
        allowed = op(ttime[:, None, :, None], mtime[None, None, None, :])  # (B, 1, T_txt, T_img n)
        # only_attend_immediate_media: text before any media attends to nothing
        silent = (ttime == 0)[:, None, :, None] if self.only_attend_immediate_media else None
        kv = media.reshape(b, t_img * n, media.shape[-1]).astype(self.dtype)
        return _attention(self, x, kv, allowed, silent)


class GatedCrossAttentionBlock(nn.Module):
    """``x + tanh(attn_gate) xattn(x)``, then ``+ tanh(ff_gate) ff(x)``; gates start at 0."""
    heads: int = 8
    dim_head: int = 64
    ff_mult: float = 4.0
    only_attend_immediate_media: bool = True
    layernorm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, media, media_locations):
        gate = lambda name: self.param(name, part(nn.initializers.zeros, (None,)), (1,),  # noqa: E731
                                       self.param_dtype)
        attn_gate, ff_gate = gate("attn_gate"), gate("ff_gate")
        h = MaskedCrossAttention(self.heads, self.dim_head, self.only_attend_immediate_media,
                                 self.layernorm_eps, self.dtype, self.param_dtype,
                                 name="attn")(x, media, media_locations)
        x = h * jnp.tanh(attn_gate).astype(h.dtype) + x
        h = FeedForward(self.ff_mult, self.layernorm_eps, self.dtype, self.param_dtype, name="ff")(x)
        return h * jnp.tanh(ff_gate).astype(h.dtype) + x


PROJECTIONS = ("perceiver", "mlp")


class MlpProjector(nn.Module):
    """LLaVA-1.5's ``mm_projector`` ('mlp2x_gelu'): Dense(width) -> GELU -> Dense(width)."""
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(self.width, (None, "embed"), self.dtype, self.param_dtype, "fc1")(x)
        return dense(self.width, ("embed", "embed"), self.dtype, self.param_dtype, "fc2")(
            nn.gelu(x, approximate=False))


class Flamingo(nn.Module):
    """Vision tower + Perceiver resampler + a decoder with gated cross-attention (module
    docstring). ``__call__(images (B, T_img, H, W, C), tokens (B, T), valid=None, train=False)``
    -> ``{'logits': (B, T, vocab), 'tokens': ...}``; ``valid`` (B, T) bool marks real tokens
    (the padding after a sequence holds no media). ``encode_media(images)`` and
    ``lm_logits(media, tokens, valid)`` are the two halves (the few-shot eval encodes the
    images once per prompt)."""

    capabilities = frozenset({"interleaved_lm"})

    vision: Optional[Mapping[str, Any]] = None
    lm: Optional[Mapping[str, Any]] = None
    image_token_id: int = 0
    projection: str = "perceiver"
    cross_every: int = 1
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    xattn_ff_mult: float = 4.0
    only_attend_immediate_media: bool = True
    resampler_depth: int = 6
    resampler_heads: int = 8
    resampler_dim_head: int = 64
    num_latents: int = 64
    max_num_media: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        from fmjax.models.clip import _frozen
        object.__setattr__(self, "vision", _frozen(self.vision))
        object.__setattr__(self, "lm", _frozen(self.lm))
        super().__post_init__()

    def towers(self):
        """``(vision (name, cls, kwargs), lm kwargs)`` with one-line ValueErrors."""
        from fmjax.models.clip import tower_from_sub_config
        from fmjax.models.decoder import Decoder
        from fmjax.models import registry
        if self.vision is None or self.lm is None:
            raise ValueError("Flamingo needs config.model.vision (an image tower, e.g. dict(name="
                             "'vit', ...)) and config.model.lm (the decoder's kwargs, as configs/gpt.py's "
                             "config.model).")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"config.model.projection={self.projection!r}; valid: {PROJECTIONS}.")
        vision = tower_from_sub_config(self.vision, self.dtype, self.param_dtype, "config.model.vision")
        lm = registry.model_kwargs(dict(self.lm, name=self.lm.get("name", "decoder")))
        fields = set(Decoder.__dataclass_fields__) - {"parent", "name"}
        unknown = sorted(set(lm) - fields)
        if unknown:
            raise ValueError(f"config.model.lm has unknown field(s) {unknown}; valid: {sorted(fields)}.")
        if not 0 <= self.image_token_id < lm.get("vocab_size", 50257):
            raise ValueError(f"config.model.image_token_id={self.image_token_id} is not a token id "
                             f"of the decoder (vocab_size {lm.get('vocab_size', 50257)}).")
        if self.projection == "perceiver":
            lm.update(gated_cross_every=self.cross_every, gated_heads=self.xattn_heads,
                      gated_dim_head=self.xattn_dim_head, gated_ff_mult=self.xattn_ff_mult,
                      only_attend_immediate_media=self.only_attend_immediate_media)
        lm.update(dtype=self.dtype, param_dtype=self.param_dtype)
        return vision, lm

    def setup(self):
        from fmjax.models.decoder import Decoder
        (_, cls, kwargs), lm = self.towers()
        self.vision_encoder = cls(**kwargs, name="vision")
        if self.projection == "perceiver":
            self.resampler = PerceiverResampler(
                self.resampler_depth, self.resampler_heads, self.resampler_dim_head,
                self.num_latents, self.max_num_media, dtype=self.dtype,
                param_dtype=self.param_dtype, name="resampler")
        else:
            self.projector = MlpProjector(lm.get("width", 768), self.dtype, self.param_dtype,
                                          name="projector")
        self.decoder = Decoder(**lm, name="lm")

    def vision_tokens(self, images, train: bool = False):
        """(B, T_img, H, W, C) -> the vision tower's final tokens (B, T_img, v, D_vision)."""
        b, t = images.shape[:2]
        out = self.vision_encoder(images.reshape((b * t,) + images.shape[2:]), train=train)
        x = out["tokens"] if "tokens" in out else out["patch_tokens"]
        return x.reshape((b, t) + x.shape[1:])

    def encode_media(self, images, train: bool = False):
        """(B, T_img, H, W, C) -> the resampled latents (B, T_img, num_latents, D_vision), or
        with ``projection='mlp'`` the projected tokens (B, T_img * v, D_lm)."""
        b, t = images.shape[:2]
        x = self.vision_tokens(images, train)
        if self.projection == "perceiver":
            return self.resampler(x)
        x = self.projector(x)
        return x.reshape(b, t * x.shape[2], x.shape[-1])

    def media_locations(self, tokens, valid=None):
        loc = tokens == self.image_token_id
        return loc if valid is None else loc & jnp.asarray(valid, bool)

    def lm_logits(self, media, tokens, valid=None, train: bool = False):
        loc = self.media_locations(tokens, valid)
        if self.projection == "perceiver":
            return self.decoder(tokens, train=train, media=media, media_locations=loc)
        return self.decoder(tokens, train=train, media_embeds=media, media_locations=loc)

    def __call__(self, images, tokens, valid=None, train: bool = False):
        return self.lm_logits(self.encode_media(images, train), tokens, valid, train)
