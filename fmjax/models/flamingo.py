"""Flamingo (Alayrac et al., 2022) and its LLaVA sibling: the model. Its building blocks
(``PerceiverResampler``, ``MaskedCrossAttention``, ``GatedCrossAttentionBlock``) live in
``fmjax.models.flamingo_layers`` (the decoder imports them without importing this module) and
are re-exported here.

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
import jax.numpy as jnp

from fmjax.models.core import dense
from fmjax.models.flamingo_layers import (  # re-exported: __all__
    FeedForward, GatedCrossAttentionBlock, MaskedCrossAttention, PerceiverAttention,
    PerceiverResampler, text_time)

Dtype = Any

__all__ = ["FeedForward", "Flamingo", "GatedCrossAttentionBlock", "MaskedCrossAttention", "MlpProjector",
           "PerceiverAttention", "PerceiverResampler", "PROJECTIONS", "text_time"]

PROJECTIONS = ("perceiver", "mlp")


class MlpProjector(nn.Module):
    """LLaVA-1.5's ``mm_projector`` ('mlp2x_gelu'): Dense(width) -> GELU -> Dense(width)."""
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(self.width, (None, "mlp"), self.dtype, self.param_dtype, "fc1")(x)
        return dense(self.width, ("mlp", "embed"), self.dtype, self.param_dtype, "fc2")(
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
