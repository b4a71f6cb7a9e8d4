"""CLIP text tower: a causal (GPT-style) pre-norm transformer with end-of-text pooling.

Param tree: ``token_embed/embedding`` (vocab, width), ``pos_embed``
(context_length, width), ``encoder/block_{i}`` (``layers.Block``, same names
as the ViT encoder), ``encoder/norm`` (CLIP's ``ln_final``) and ``proj/kernel``
(width, embed_dim; no bias, CLIP's ``text_projection``).

``embed_cls=True`` is CoCa's unimodal text decoder (open_clip ``TextTransformer(embed_cls=True)``):
a learned ``cls_embed`` (width,) is appended after the tokens (``pos_embed`` has
``context_length + 1`` rows), the ``pooled`` output is the final norm of that last position,
``tokens`` are the positions before it *without* the final norm (what open_clip hands the
multimodal decoder).

``pad_id``: keys equal to it are masked (besides the causal mask); BERT-style bidirectional
towers (``causal=False``, ALIGN) need it so that words do not attend to the padding. With
``embed_cls``, ``legacy_cls_mask=True`` is open_clip's default mask (``correct_cls_mask=False``: the key
validity row is ``[cls valid, text != pad]``, shifted by one against the sequence; its released
CoCa weights were trained so); False masks exactly the padding keys.

``num_prompts`` = n > 0 is CoOp's learnable context (Zhou et al. 2022, "Learning to Prompt for
Vision-Language Models"; the text soft prompts of ``config.adapter.name='prompt', text_length=n``):
a ``prompt_embed`` (n, width) param takes the n positions right after the start token, as
CoOp's ``[SOS][V]_1..[V]_n[CLASS].[EOS]``, the caption's own tokens move n places on (with their
position embeddings) and its last n positions are dropped (padding, when the caption leaves n
free; a longer one loses its tail, as the tokenizer's truncation would). The pooled position
(and a ``pad_id`` key mask) move with the tokens. Not with ``embed_cls``.
"""
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.models import layers

Dtype = Any

# name -> tower shape (width, depth, num_heads, mlp_dim), as in OpenAI CLIP / open_clip.
TEXT_PRESETS: Dict[str, Dict[str, int]] = {
    "B": dict(width=512, depth=12, num_heads=8, mlp_dim=2048),     # CLIP ViT-B/32, B/16
    "L": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),    # CLIP ViT-L/14
    "H": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),   # open_clip ViT-H/14, g/14
}
TEXT_POOLS = ("argmax", "eos", "first")


def text_kwargs(variant: str, **overrides) -> Dict[str, Any]:
    """Preset name ('B', 'L', 'H') -> TextTransformer kwargs, with ``overrides`` applied.

    Raises ValueError naming the valid presets for an unknown one.
    """
    if variant not in TEXT_PRESETS:
        raise ValueError(
            f"Unknown text variant {variant!r}; valid: {', '.join(TEXT_PRESETS)}.")
    kwargs = dict(TEXT_PRESETS[variant])
    kwargs.update(overrides)
    return kwargs


def causal_mask(length: int) -> jax.Array:
    """(1, 1, L, L) boolean mask, True where query i may attend to key j (j <= i)."""
    return jnp.asarray(np.tril(np.ones((length, length), dtype=bool)))[None, None]


def pool_positions(tokens: jax.Array, pool: str, eos_token_id: Optional[int]) -> jax.Array:
    """Index of the end-of-text token in each (B, L) row of token ids, as HF CLIP does.

    'argmax': the highest id (OpenAI's EOT 49407 is the largest id in the vocabulary;
    HF's legacy ``eos_token_id == 2`` path). 'eos': the first position equal to
    ``eos_token_id`` (so padding with the EOT id is fine); rows without it pool index 0.
    'first': position 0 (BERT's [CLS]; here the start token), for bidirectional towers.
    """
    if pool == "argmax":
        return jnp.argmax(tokens, axis=-1)
    if pool == "first":
        return jnp.zeros(tokens.shape[:1], jnp.int32)
    if pool == "eos":
        if eos_token_id is None:
            raise ValueError("pool='eos' needs eos_token_id; set it or use pool='argmax'.")
        return jnp.argmax((tokens == eos_token_id).astype(jnp.int32), axis=-1)
    raise ValueError(f"Unknown text pool {pool!r}; valid: {TEXT_POOLS}.")


class TextTransformer(nn.Module):
    """CLIP text encoder.

    ``__call__(tokens (B, L) int, train=False)`` with ``L <= context_length``
    returns a dict: ``tokens`` (B, L, width) after the final norm, ``pooled``
    (B, width) at the end-of-text position (see ``pool_positions``) and
    ``embedding`` (B, embed_dim) = pooled @ proj (not normalised).
    ``activation``: 'quick_gelu' for OpenAI CLIP weights, 'gelu' for most others.
    ``remat`` (``False`` / ``True`` or a policy name) and ``scan_layers`` (params
    ``encoder/block_stack/...`` with a leading layer axis) as in ``fmjax.models.vit.ViT``.
    """
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    embed_dim: int = 512
    activation: str = "quick_gelu"
    layernorm_eps: float = 1e-5
    pool: str = "argmax"
    eos_token_id: Optional[int] = None
    causal: bool = True
    embed_cls: bool = False          # CoCa: a learned class embedding appended (module docstring)
    pad_id: Optional[int] = None     # keys equal to it are masked (module docstring)
    num_prompts: int = 0             # CoOp's learned context after the start token (module docstring)
    legacy_cls_mask: bool = False    # open_clip's shifted key mask (module docstring)
    dropout: float = 0.0
    drop_path: float = 0.0
    attention_impl: str = "xla"
    remat: Any = False  # False / True or a policy name (fmjax.models.scan.REMAT_POLICIES)
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
        """Encode (B, L) token ids; see the class docstring for the outputs."""
        if self.pool not in TEXT_POOLS:
            raise ValueError(f"Unknown text pool {self.pool!r}; valid: {TEXT_POOLS}.")
        b, length = tokens.shape
        if length > self.context_length:
            raise ValueError(
                f"Text length {length} exceeds context_length={self.context_length}; "
                "truncate the tokens or raise context_length.")
        x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="token_embed",
                     embedding_init=layers.part(nn.initializers.normal(0.02),
                                                ("vocab", "embed")))(tokens)
        n_ctx = self.num_prompts
        if n_ctx:
            if self.embed_cls:
                raise ValueError("num_prompts (text soft prompts) is not supported with embed_cls (CoCa).")
            if length <= n_ctx + 1:
                raise ValueError(f"num_prompts={n_ctx} needs texts longer than {n_ctx + 1} tokens, got {length}.")
            ctx = self.param("prompt_embed", layers.part(nn.initializers.normal(0.02), (None, "embed")),
                             (n_ctx, self.width), self.param_dtype)
            x = jnp.concatenate([x[:, :1], jnp.broadcast_to(ctx.astype(x.dtype), (b, n_ctx, self.width)),
                                 x[:, 1:length - n_ctx]], axis=1)
        n_pos = self.context_length + int(self.embed_cls)
        pos = self.param("pos_embed", layers.part(nn.initializers.normal(0.01), (None, "embed")),
                         (n_pos, self.width), self.param_dtype)
        mask = causal_mask(length + int(self.embed_cls)) if self.causal else None
        if self.embed_cls:
            cls = self.param("cls_embed", layers.part(nn.initializers.normal(0.01), ("embed",)),
                             (self.width,), self.param_dtype)
            x = jnp.concatenate([x, jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width))], 1)
        if self.pad_id is not None:
            valid = tokens != self.pad_id
            if n_ctx:
                valid = jnp.concatenate([valid[:, :1], jnp.ones((b, n_ctx), bool), valid[:, 1:length - n_ctx]], 1)
            if self.embed_cls:
                ones = jnp.ones((b, 1), bool)
                valid = jnp.concatenate([ones, valid] if self.legacy_cls_mask else [valid, ones], 1)
            keys = valid[:, None, None, :]
            mask = keys if mask is None else mask & keys
        x = layers.constrain(x + pos[:x.shape[1]].astype(self.dtype)[None])
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x, prenorm = layers.Encoder(
            depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
            dropout=self.dropout, drop_path=self.drop_path, layernorm_eps=self.layernorm_eps,
            activation=self.activation, attention_impl=self.attention_impl, remat=self.remat,
            scan_layers=self.scan_layers, dtype=self.dtype, param_dtype=self.param_dtype,
            name="encoder")(x, not train, mask, return_prenorm=True)
        if self.embed_cls:  # open_clip: ln_final on the appended class position only
            pooled, x = x[:, -1], prenorm[:, :-1]
        else:
            idx = pool_positions(tokens, self.pool, self.eos_token_id)
            if n_ctx:  # the caption moved n_ctx places on ('first' pools the start token)
                idx = idx if self.pool == "first" else jnp.minimum(idx + n_ctx, length - 1)
            pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        embedding = nn.Dense(
            self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            name="proj", kernel_init=layers.part(nn.initializers.normal(self.width ** -0.5),
                                                 ("embed", None)))(pooled)
        return dict(tokens=x, pooled=pooled, embedding=embedding)
