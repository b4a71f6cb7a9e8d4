"""DALL-E's transformer (Ramesh et al. 2021): one decoder-only transformer over the text
tokens followed by the image's dVAE codes, with the paper's sparse attention masks as options.

Sequence layout (positions 0 .. text_length + image_grid^2 - 1):

    [t_0 t_1 ... t_{n-1} | i_0 i_1 ... i_{N-1}]      n = text_length, N = image_grid^2

``t`` are ids in ``[0, text_vocab)`` (the text tokenizer's, plus whatever padding ids the
objective adds: DALL-E's unique padding token per text position, ``fmjax.objectives.dalle``),
``i`` image codes in ``[0, image_vocab)`` stored as ``text_vocab + code`` in the one joint
vocabulary (embedding table and output layer of ``text_vocab + image_vocab`` rows). The model
reads the sequence without its last token and predicts each next token: position ``p``
predicts ``p + 1``. ``logits`` are masked (-1e9) to the TEXT vocabulary at positions
``p < n - 1`` and to the IMAGE vocabulary at ``p >= n - 1`` (DALLE-pytorch's ``logits_mask``),
so sampling after a text prompt draws image codes only.

Attention (``attention_types``, cycled over the layers as DALLE-pytorch's ``attn_types``; a
tuple as long as ``depth`` gives each layer its own), on top of the causal mask:

- ``full``: causal attention over everything (the default);
- ``row``: an image token attends to every text token and to the earlier image tokens of its
  own row (DALLE-pytorch's ``axial_row``);
- ``paper_row``: the same but over the previous ``image_grid`` image tokens in raster order
  (a window that reaches back into the previous row, as far as the same column): the paper's
  row mask, figure 11 (a), as summarised from it (on a 4x4 grid the 8th image token reads
  the 4th to the 8th), the Sparse Transformer's strided local window; the paper preset's;
- ``column``: the same within its own column;
- ``conv``: the same within a ``conv_kernel`` x ``conv_kernel`` window centred on it (the
  causal half: earlier tokens only).

Text tokens always attend causally to all text tokens. ``row``, ``column`` and ``conv`` are
DALLE-pytorch's axial / window readings; the paper's figure 11 could not be read here (no
network): ``paper_row`` follows a summary of it, and its ``conv`` may wrap around the grid's
edges, which this module's does not. The paper's 64-layer model uses (row, column, row, row)
repeated with a last convolutional layer: ``paper_attention_types(depth)`` gives that list per
layer with ``paper_row`` rows. DALL-E's own sparse kernels skip the masked blocks; here
the masks are dense boolean masks on the attention logits (the same numbers; the FLOPs of full
attention), applied by an attention hook (``fmjax.models.inject``) on the layers of
``fmjax.models.decoder.Decoder``, which supplies the blocks, the KV cache and the sampling
(``fmjax.models.generate.sample`` takes this model as it takes a ``Decoder``).

Positions are one learned embedding per sequence position (``Decoder``'s ``pos_embed``); the
paper does not describe its position embedding beyond "learned", DALLE-pytorch uses axial
row/column embeddings for the image (representable by the per-position table).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.models import inject
from fmjax.models.decoder import Decoder

ATTENTION_TYPES = ("full", "row", "paper_row", "column", "conv")
NEG_INF = -1e9

# name -> (width, depth, num_heads, mlp_dim)
DALLE_PRESETS = {
    "tiny": dict(width=128, depth=4, num_heads=4, mlp_dim=512),
    "S": dict(width=256, depth=8, num_heads=8, mlp_dim=1024),
    # The paper's 12B model: 64 layers, 62 heads of 64 (width 3968), 256 BPE text tokens of a
    # 16384 vocabulary, 32x32 image codes of 8192.
    "12B": dict(width=3968, depth=64, num_heads=62, mlp_dim=4 * 3968),
}


def dalle_kwargs(variant: Optional[str], **overrides) -> dict:
    """Preset name (``DALLE_PRESETS``) or None -> ``DalleTransformer`` kwargs with ``overrides``."""
    if variant is None:
        return dict(overrides)
    if variant not in DALLE_PRESETS:
        raise ValueError(f"Unknown dalle variant {variant!r}; valid: {', '.join(DALLE_PRESETS)}.")
    kwargs = dict(DALLE_PRESETS[variant])
    if variant == "12B":
        kwargs.update(attention_types=paper_attention_types(64))
    kwargs.update(overrides)
    return kwargs


def paper_attention_types(depth: int) -> tuple:
    """The paper's layer pattern: (row, column, row, row) repeated, the last layer ``conv``;
    its rows are ``paper_row`` (the raster window of figure 11 (a))."""
    cycle = ("paper_row", "column", "paper_row", "paper_row")
    return tuple(cycle[i % 4] for i in range(depth - 1)) + ("conv",)


def layer_types(attention_types: Sequence[str], depth: int) -> tuple:
    """One attention type per layer: ``attention_types`` cycled (or as given when it has
    ``depth`` entries); ValueError naming an unknown type."""
    types = tuple(attention_types) or ("full",)
    bad = [t for t in types if t not in ATTENTION_TYPES]
    if bad:
        raise ValueError(f"attention_types {bad}; valid: {list(ATTENTION_TYPES)}.")
    return tuple(types[i % len(types)] for i in range(depth))


@functools.lru_cache(maxsize=64)
def attention_pattern(kind: str, text_length: int, image_grid: int, conv_kernel: int = 3) -> np.ndarray:
    """(L, L) bool, L = text_length + image_grid^2: ``[q, k]`` True when position q may attend
    to position k under ``kind`` (see the module docstring); always within the causal mask."""
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"attention type {kind!r}; valid: {list(ATTENTION_TYPES)}.")
    n, g = int(text_length), int(image_grid)
    length = n + g * g
    pos = np.arange(length)
    causal = pos[:, None] >= pos[None, :]
    if kind == "full":
        return causal
    img = pos >= n
    r = np.where(img, (pos - n) // g, -1)
    c = np.where(img, (pos - n) % g, -1)
    if kind == "row":
        near = r[:, None] == r[None, :]
    elif kind == "paper_row":   # the previous g image tokens in raster order (and itself)
        near = (pos[:, None] - pos[None, :]) <= g
    elif kind == "column":
        near = c[:, None] == c[None, :]
    else:
        half = int(conv_kernel) // 2
        near = (np.abs(r[:, None] - r[None, :]) <= half) & (np.abs(c[:, None] - c[None, :]) <= half)
    # text queries: causal over text; image queries: all text + their image neighbourhood.
    allowed = np.where(img[:, None], ~img[None, :] | (img[None, :] & near), ~img[None, :])
    return causal & allowed


def _layer_index(path) -> Optional[int]:
    for part in path:
        if isinstance(part, str) and part.startswith("block_") and part[6:].isdigit():
            return int(part[6:])
    return None


class DalleTransformer(nn.Module):
    """``__call__(tokens (B, T) int joint ids, train=False, context=None, context_mask=None,
    attention_mask=None) -> {'logits': (B, T, text_vocab + image_vocab) float32 (masked to the
    vocabulary each position predicts), 'tokens': (B, T, width)}`` (see the module docstring).

    ``decode=True`` keeps ``Decoder``'s KV cache plus this model's ``cache/position`` (the
    absolute position of the next token, for the masks); ``context`` / ``attention_mask`` are
    refused (DALL-E pads its text with tokens, not masks)."""
    text_vocab: int = 1024
    image_vocab: int = 512
    text_length: int = 32
    image_grid: int = 8
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 512
    attention_types: Sequence[str] = ("full",)
    conv_kernel: int = 3
    tie_embeddings: bool = False
    dropout: float = 0.0
    attention_dropout: float = 0.0
    decode: bool = False
    attention_impl: str = "xla"
    remat: Any = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    capabilities = frozenset({"causal_lm"})

    # generate.sample's checks read these.
    position = "learned"

    @property
    def max_length(self) -> int:
        """The whole sequence. Training reads all but its last token; the position embedding of
        the last is only read by ``generate.sample``'s final (discarded) cached step."""
        return self.text_length + self.image_grid ** 2

    @property
    def vocab_size(self) -> int:
        return self.text_vocab + self.image_vocab

    def logits_mask(self, positions) -> jax.Array:
        """(T, V) bool: the vocabulary position p may predict (text before n - 1, image after)."""
        is_image = (jnp.asarray(positions) >= self.text_length - 1)[:, None]
        vocab_is_image = (jnp.arange(self.vocab_size) >= self.text_vocab)[None, :]
        return is_image == vocab_is_image

    @nn.compact
    def __call__(self, tokens, train: bool = False, context=None, context_mask=None,
                 attention_mask=None):
        if context is not None or attention_mask is not None:
            raise ValueError("dalle: no context / attention_mask (text padding is a token here).")
        types = layer_types(self.attention_types, self.depth)
        b, t = tokens.shape
        start = jnp.zeros((), jnp.int32)
        if self.decode:
            initialized = self.has_variable("cache", "position")
            pos_var = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            if initialized:
                start = pos_var.value
                pos_var.value = pos_var.value + t
        elif t > self.max_length:
            raise ValueError(f"dalle: {t} tokens exceed text_length + image_grid^2 = {self.max_length}.")
        qpos = start + jnp.arange(t)
        patterns = {k: jnp.asarray(attention_pattern(k, self.text_length, self.image_grid, self.conv_kernel))
                    for k in set(types) if k != "full"}

        def sparse(module, inputs, call_next):
            layer = _layer_index(module.path)
            kind = "full" if layer is None else types[layer]
            if kind == "full":
                return call_next(inputs)
            keys = inputs.k.shape[1]
            rows = jnp.take(patterns[kind], qpos, axis=0)[:, :keys]            # (T, keys)
            mask = rows[None, None] if inputs.mask is None else inputs.mask & rows[None, None]
            return call_next(inputs._replace(mask=mask))

        decoder = Decoder(
            vocab_size=self.vocab_size, max_length=self.max_length, width=self.width, depth=self.depth,
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, tie_embeddings=self.tie_embeddings,
            dropout=self.dropout, attention_dropout=self.attention_dropout, decode=self.decode,
            attention_impl=self.attention_impl, remat=self.remat, dtype=self.dtype,
            param_dtype=self.param_dtype, name="decoder")
        if set(types) == {"full"}:
            out = decoder(tokens, train=train)
        else:
            with inject.hooks(attention=sparse):
                out = decoder(tokens, train=train)
        logits = jnp.where(self.logits_mask(qpos)[None], out["logits"], NEG_INF)
        return dict(logits=logits, tokens=out["tokens"])
