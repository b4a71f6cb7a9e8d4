"""A GPT-2 style causal text decoder: pre-LN blocks, learned or rotary positions, tied
input/output embeddings, optional cross-attention to an encoder sequence, and a KV cache.

Param tree (unrolled, canonical; ``fmjax.interop.hf_gpt2`` writes it):

- ``token_embed/embedding`` (vocab, width) -- also the output projection when
  ``tie_embeddings`` (GPT-2); else ``lm_head/kernel`` (width, vocab) (no bias);
- ``pos_embed`` (max_length, width) with ``position='learned'`` (none with ``'rotary'``);
- ``block_{i}``: ``norm1``, ``attn/{query,key,value}`` (kernel (embed, heads, kv), bias
  (heads, kv)), ``attn/out`` (kernel (heads, kv, embed)), ``norm2``, ``mlp/fc1``, ``mlp/fc2``
  (the names of ``fmjax.models.blocks.Block``); blocks with cross-attention add
  ``norm_cross`` and ``cross_attn/{query,key,value,out}`` (``MultiHeadAttention``);
- ``norm`` (GPT-2's ``ln_f``).

``scan_layers=True`` stores the blocks as ``block_stack/...`` with a leading layer axis
(``fmjax.models.scan``); it needs identical blocks (``cross_attention_every`` 0 or 1).

**KV cache.** A flax ``'cache'`` collection, as flax's own decoders: build the model with
``decode=True`` and apply with ``mutable=['cache']``. Every self-attention holds
``cached_key`` / ``cached_value`` (batch, cache_length, heads, kv) and the decoder a scalar
``cache_index`` (the number of tokens already written), ``key_mask`` (batch, cache_length;
False at padding tokens and unwritten slots) and ``positions`` (batch,; each row's next position). A decode call may feed
any number ``T >= 1`` of tokens (a whole prompt to prefill, then one at a time); they are
written at ``cache_index`` and query i attends to the non-padding keys ``<= cache_index + i``.
``fmjax.models.generate.init_cache`` makes an all-zero cache of a given length without running
the model (``jax.eval_shape``). Cross-attention keys/values are recomputed from ``context`` at
every step (not cached). With ``scan_layers`` the cache arrays get the leading layer axis too.

``dropout`` acts on the embeddings, after each residual branch and (``fmjax.models.blocks.Mlp``)
after the MLP's activation, where GPT-2 has none; ``attention_dropout`` on the attention
probabilities. Eval-mode numbers (the parity tests) do not depend on it.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models import inject
from fmjax.models import scan as scan_lib
from fmjax.models.attention import HEAD_AXES, MultiHeadAttention
from fmjax.models.blocks import Mlp
from fmjax.models.core import DenseND, Dtype, at_least_float32, constrain, dense, layer_norm, part

POSITIONS = ("learned", "rotary")

# name -> (width, depth, num_heads, mlp_dim), GPT-2's sizes.
DECODER_PRESETS = {
    "tiny": dict(width=128, depth=2, num_heads=4, mlp_dim=512),
    "S": dict(width=256, depth=4, num_heads=4, mlp_dim=1024),
    "gpt2": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "gpt2-medium": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "gpt2-large": dict(width=1280, depth=36, num_heads=20, mlp_dim=5120),
    "gpt2-xl": dict(width=1600, depth=48, num_heads=25, mlp_dim=6400),
}


def decoder_kwargs(variant: str, **overrides) -> dict:
    """Preset name (``DECODER_PRESETS``) -> ``Decoder`` kwargs, with ``overrides`` applied."""
    if variant not in DECODER_PRESETS:
        raise ValueError(f"Unknown decoder variant {variant!r}; valid: {', '.join(DECODER_PRESETS)}.")
    kwargs = dict(DECODER_PRESETS[variant])
    kwargs.update(overrides)
    return kwargs


def apply_rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (GPT-NeoX / LLaMA 'rotate half' layout) of ``x``
    (B, L, heads, d) at integer ``positions`` (L,) or (B, L); d must be even."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"Rotary positions need an even head dim, got {d}.")
    inv_freq = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    pos = jnp.asarray(positions, jnp.float32)
    if pos.ndim == 1:
        pos = pos[None]
    angles = pos[..., None] * inv_freq                       # (B|1, L, d/2)
    angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    rotated = jnp.concatenate([-x2, x1], -1)
    return (xf * cos + rotated * sin).astype(x.dtype)


class CausalSelfAttention(MultiHeadAttention):
    """``MultiHeadAttention`` (same params, ``attend`` and attention hooks) made causal, with
    optional rotary positions and the KV cache of the module docstring (``decode``).

    ``__call__(x (B, T, D), positions (T,) or (B, T), deterministic)``; the causal mask is built
    here (from the cache index when decoding)."""
    rotary: bool = False
    rotary_base: float = 10000.0
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, deterministic: bool = True,
                 cache_index: Optional[jax.Array] = None,
                 key_mask: Optional[jax.Array] = None) -> jax.Array:
        """``key_mask``: optional (B, keys) bool, False = a padding key no query attends to
        (keys = T, or the cache length when decoding)."""
        b, t, embed = x.shape
        if embed % self.num_heads:
            raise ValueError(f"Width {embed} is not divisible by num_heads={self.num_heads}.")
        head_dim = embed // self.num_heads

        def proj(name):
            return DenseND(
                (self.num_heads, head_dim), contract=1, use_bias=self.use_bias, dtype=self.dtype,
                param_dtype=self.param_dtype, name=name,
                kernel_axes=("embed", "heads", "kv"), bias_axes=("heads", "kv"))(x)

        q, k, v = proj("query"), proj("key"), proj("value")
        if self.rotary:
            q = apply_rotary(q, positions, self.rotary_base)
            k = apply_rotary(k, positions, self.rotary_base)
        q = nn.with_logical_constraint(q, HEAD_AXES)
        k = nn.with_logical_constraint(k, HEAD_AXES)
        v = nn.with_logical_constraint(v, HEAD_AXES)
        qpos = jnp.arange(t)
        mask = (qpos[:, None] >= qpos[None, :])[None, None]     # (1, 1, T, T)
        if self.decode:
            initialized = self.has_variable("cache", "cached_key")
            ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
            cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
            if initialized:  # (a fresh cache is only being shaped: plain causal attention)
                if cache_index is None:
                    raise ValueError("decode=True needs the decoder's cache_index.")
                max_len = ck.value.shape[1]
                zero = jnp.zeros((), jnp.int32)
                idx = jnp.asarray(cache_index, jnp.int32)
                ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype),
                                                        (zero, idx, zero, zero))
                cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype),
                                                        (zero, idx, zero, zero))
                k, v = ck.value, cv.value
                kpos = jnp.arange(max_len)
                mask = (idx + qpos[:, None] >= kpos[None, :])[None, None]   # (1, 1, T, max_len)
        if key_mask is not None:
            mask = mask & jnp.asarray(key_mask, bool)[:, None, None, :]
        out = inject.call_attention(self, inject.AttentionInputs(q, k, v, None, mask),
                                    lambda inputs: self.attend(inputs, deterministic))
        out = nn.with_logical_constraint(out, HEAD_AXES)
        out = DenseND((embed,), contract=2, use_bias=self.use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="out",
                      kernel_axes=("heads", "kv", "embed"), bias_axes=("embed",))(out)
        return constrain(out)


class DecoderBlock(nn.Module):
    """Pre-LN decoder block: x + attn(LN(x)) [+ cross_attn(LN(x), context)] + mlp(LN(x))."""
    num_heads: int
    mlp_dim: int
    cross_attention: bool = False
    dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_eps: float = 1e-5
    activation: str = "gelu_tanh"
    rotary: bool = False
    rotary_base: float = 10000.0
    decode: bool = False
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True, positions=None, cache_index=None,
                 context=None, context_mask=None, key_mask=None):
        return self._forward(x, deterministic, positions, cache_index, context, context_mask,
                             key_mask)

    def _forward(self, x, deterministic, positions, cache_index, context, context_mask,
                 key_mask=None):
        x = constrain(x)
        h = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm1")(x)
        h = CausalSelfAttention(
            self.num_heads, attention_dropout=self.attention_dropout,
            attention_impl=self.attention_impl, rotary=self.rotary, rotary_base=self.rotary_base,
            decode=self.decode, dtype=self.dtype, param_dtype=self.param_dtype,
            name="attn")(h, positions, deterministic, cache_index, key_mask)
        x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
        if self.cross_attention:
            if context is None:
                raise ValueError("This decoder has cross-attention layers: pass context=(B, S, D').")
            mask = None if context_mask is None else jnp.asarray(context_mask, bool)[:, None, None, :]
            h = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm_cross")(x)
            h = MultiHeadAttention(
                self.num_heads, attention_dropout=self.attention_dropout,
                attention_impl=self.attention_impl, dtype=self.dtype,
                param_dtype=self.param_dtype, name="cross_attn")(
                    h, kv=context, mask=mask, deterministic=deterministic)
            x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm2")(x)
        h = Mlp(self.mlp_dim, activation=self.activation, dropout=self.dropout, dtype=self.dtype,
                param_dtype=self.param_dtype, name="mlp")(h, deterministic=deterministic)
        return constrain(x + h)


class ScanDecoderBlock(DecoderBlock):
    """``DecoderBlock`` as an ``nn.scan`` body (everything broadcast): ``-> (x, None)``."""

    @nn.compact
    def __call__(self, x, deterministic: bool = True, positions=None, cache_index=None,
                 context=None, context_mask=None, key_mask=None):
        return self._forward(x, deterministic, positions, cache_index, context, context_mask,
                             key_mask), None


class Decoder(nn.Module):
    """GPT-2 style causal language model.

    ``__call__(tokens (B, T) int, train=False, context=None, context_mask=None,
    attention_mask=None)`` returns a
    dict: ``logits`` (B, T, vocab) (float32; float64 for a float64 model), ``tokens`` (B, T, width) after the final norm.
    ``context`` (B, S, D'): the encoder sequence the cross-attention blocks attend to
    (``cross_attention_every=k``: blocks k-1, 2k-1, ... have one; 0: none), ``context_mask``
    (B, S) bool, True = a real (not padding) context token. ``attention_mask`` (B, T) bool:
    False marks padding tokens (e.g. left-padded prompts): no token attends to them and the
    positions count real tokens only (``cumsum(mask) - 1``, as transformers' GPT-2 generate);
    when decoding, the cache keeps the mask of every written token (``key_mask``) and each
    row's next position (``positions``). The outputs at padding tokens are meaningless.
    ``gated_cross_every=k`` (Flamingo): a ``gated_{i}`` ``fmjax.models.flamingo_layers.
    GatedCrossAttentionBlock`` before blocks k-1, 2k-1, ...; pass ``media`` (B, T_img, n, D)
    (the resampled image latents) and ``media_locations`` (B, T) bool (the ``<image>`` token
    positions). Its tanh gates start at 0: at init the output equals the plain decoder's.
    ``media_embeds`` (B, M, width) with ``media_locations`` (LLaVA): the m-th location's token
    embedding is replaced by ``media_embeds[:, m]``.
    ``position``: 'learned' (GPT-2's ``wpe``) or 'rotary' (on q and k of every self-attention).
    ``decode=True``: the KV cache of the module docstring (apply with ``mutable=['cache']``).
    ``remat`` / ``scan_layers`` as in ``fmjax.models.blocks.Encoder``.
    GPT-2's defaults: activation 'gelu_tanh' (``gelu_new``), LayerNorm eps 1e-5, tied embeddings.
    """
    vocab_size: int = 50257
    max_length: int = 1024
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    position: str = "learned"
    rotary_base: float = 10000.0
    tie_embeddings: bool = True
    cross_attention_every: int = 0
    # Flamingo: a gated cross-attention-dense block before every k-th block (fmjax.models.flamingo_layers)
    gated_cross_every: int = 0
    gated_heads: int = 8
    gated_dim_head: int = 64
    gated_ff_mult: float = 4.0
    only_attend_immediate_media: bool = True
    activation: str = "gelu_tanh"
    layernorm_eps: float = 1e-5
    dropout: float = 0.0
    attention_dropout: float = 0.0
    decode: bool = False
    attention_impl: str = "xla"
    remat: Any = False
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    capabilities = frozenset({"causal_lm"})   # fmjax.models.registry.CAPABILITIES

    def _has_cross(self, i: int) -> bool:
        k = self.cross_attention_every
        return bool(k) and (i + 1) % k == 0

    def _has_gated(self, i: int) -> bool:
        k = self.gated_cross_every
        return bool(k) and (i + 1) % k == 0

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False, context: Optional[jax.Array] = None,
                 context_mask: Optional[jax.Array] = None,
                 attention_mask: Optional[jax.Array] = None, media: Optional[jax.Array] = None,
                 media_locations: Optional[jax.Array] = None,
                 media_embeds: Optional[jax.Array] = None):
        if self.position not in POSITIONS:
            raise ValueError(f"Unknown position {self.position!r}; valid: {POSITIONS}.")
        b, t = tokens.shape
        deterministic = not train
        embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="token_embed",
                         embedding_init=part(nn.initializers.normal(0.02), ("vocab", "embed")))
        x = embed(tokens)
        if media_embeds is not None:  # LLaVA: the m-th media location takes media_embeds[:, m]
            if media_locations is None:
                raise ValueError("media_embeds needs media_locations=(B, T) bool.")
            loc = jnp.asarray(media_locations, bool)
            idx = jnp.clip(jnp.cumsum(loc, axis=1) - 1, 0, media_embeds.shape[1] - 1)
            x = jnp.where(loc[..., None], jnp.take_along_axis(
                media_embeds.astype(x.dtype), idx[..., None], axis=1), x)
        cache_index = None
        real = None if attention_mask is None else jnp.asarray(attention_mask, bool)
        key_mask = real
        positions = jnp.arange(t)
        if real is not None:
            positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)          # (B, T)
        if self.decode:
            initialized = self.has_variable("cache", "cache_index")
            index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            keys = self.variable("cache", "key_mask", lambda: jnp.ones((b, t), bool))
            nxt = self.variable("cache", "positions", lambda: jnp.zeros((b,), jnp.int32))
            if initialized:
                cache_index = index.value
                cur = jnp.ones((b, t), bool) if real is None else real
                keys.value = jax.lax.dynamic_update_slice(keys.value, cur, (0, cache_index))
                key_mask = keys.value
                positions = nxt.value[:, None] + jnp.maximum(jnp.cumsum(cur, axis=1) - 1, 0)
                nxt.value = nxt.value + cur.sum(axis=1).astype(jnp.int32)
                index.value = index.value + t
        elif t > self.max_length:
            raise ValueError(f"Text length {t} exceeds max_length={self.max_length}.")
        if self.position == "learned":
            pos = self.param("pos_embed", part(nn.initializers.normal(0.01), (None, "embed")),
                             (self.max_length, self.width), self.param_dtype)
            pe = jnp.take(pos, positions, axis=0).astype(self.dtype)
            x = x + (pe[None] if pe.ndim == 2 else pe)
        x = constrain(x)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                      attention_dropout=self.attention_dropout, layernorm_eps=self.layernorm_eps,
                      activation=self.activation, rotary=self.position == "rotary",
                      rotary_base=self.rotary_base, decode=self.decode,
                      attention_impl=self.attention_impl, dtype=self.dtype,
                      param_dtype=self.param_dtype)
        if self.gated_cross_every:
            if media is None or media_locations is None:
                raise ValueError("This decoder has Flamingo's gated cross-attention: pass media="
                                 "(B, T_img, n, D) and media_locations=(B, T) bool.")
            if self.scan_layers or self.decode:
                raise ValueError("gated_cross_every needs scan_layers=False and decode=False "
                                 "(not supported yet).")
        if self.scan_layers and self.depth:
            if self.cross_attention_every not in (0, 1):
                raise ValueError("scan_layers needs identical blocks: cross_attention_every 0 or 1, "
                                 f"got {self.cross_attention_every}.")
            stack = scan_lib.stack_module(ScanDecoderBlock, self.depth, self.remat,
                                          static_argnums=(2,), in_axes=(nn.broadcast,) * 6)
            x, _ = stack(cross_attention=self.cross_attention_every == 1, **kwargs,
                         name="block" + scan_lib.STACK_SUFFIX)(
                             x, deterministic, positions, cache_index, context, context_mask,
                             key_mask)
        else:
            block_cls = scan_lib.remat_module(DecoderBlock, self.remat, static_argnums=(2,))
            for i in range(self.depth):
                if self._has_gated(i):  # open_flamingo's FlamingoLayer: gated xattn, then the LM layer
                    from fmjax.models.flamingo_layers import GatedCrossAttentionBlock
                    x = GatedCrossAttentionBlock(
                        self.gated_heads, self.gated_dim_head, self.gated_ff_mult,
                        self.only_attend_immediate_media, self.layernorm_eps, self.dtype,
                        self.param_dtype, name=f"gated_{i}")(x, media, media_locations)
                x = block_cls(cross_attention=self._has_cross(i), **kwargs, name=f"block_{i}")(
                    x, deterministic, positions, cache_index, context, context_mask, key_mask)
        x = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm")(x)
        x = constrain(x)
        if self.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = dense(self.vocab_size, ("embed", "vocab"), self.dtype, self.param_dtype,
                           "lm_head", use_bias=False,
                           kernel_init=nn.initializers.normal(0.02))(x)
        logits = nn.with_logical_constraint(at_least_float32(logits), ("batch", "length", "vocab"))
        return dict(logits=logits, tokens=x)
