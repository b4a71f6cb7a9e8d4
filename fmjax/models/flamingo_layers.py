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
"""
from typing import Any, Optional

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
