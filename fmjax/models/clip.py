"""CLIP / SigLIP-style two-tower image-text model.

Param tree: ``image`` (a ``ViT`` with ``pre_norm`` = CLIP's ``ln_pre``; its
``encoder/norm`` is CLIP's ``ln_post``), ``image_proj/kernel`` (width,
embed_dim; no bias), ``text`` (``TextTransformer``, incl. ``text/proj``),
``logit_scale`` () and, for ``loss='sigmoid'`` or a given ``logit_bias_init``,
``logit_bias`` ().

``patch_bias=False`` (open_clip / OpenAI, whose ``conv1`` has no bias; the paper presets of
configs/clip.py): the image tower runs with a zero patch-embedding bias. The param stays in
the tree at its zero init, so checkpoints and converters keep one layout; it gets no
gradient, so it never moves (tests/reference/test_clip_trajectory.py).

The vision tower's fields are the flat ViT names (``width``, ``depth``,
``num_heads``, ``mlp_dim``, ``patch_size``) so ``registry.build_model(dict(
name='clip', variant='B/16', ...))`` works; the text tower's are ``text_*``.
"""
import math
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models import layers
from fmjax.models.text import TEXT_PRESETS, TextTransformer
from fmjax.models.vit import ViT, vit_kwargs

Dtype = Any
LOSSES = ("softmax", "sigmoid")

# CLIP variant -> (vision ViT variant, text preset, embed_dim), as in OpenAI CLIP / open_clip.
CLIP_PRESETS = {
    "B/32": ("B/32", "B", 512),
    "B/16": ("B/16", "B", 512),
    "L/14": ("L/14", "L", 768),
    "H/14": ("H/14", "H", 1024),
}


def clip_kwargs(variant: str, **overrides) -> Dict[str, Any]:
    """'B/16' -> CLIP kwargs (vision ViT-B/16, text 'B', embed_dim 512) plus ``overrides``."""
    if variant not in CLIP_PRESETS:
        raise ValueError(
            f"Unknown CLIP variant {variant!r}; valid: {', '.join(CLIP_PRESETS)}.")
    vision, text, embed_dim = CLIP_PRESETS[variant]
    t = TEXT_PRESETS[text]
    kwargs = dict(vit_kwargs(vision), embed_dim=embed_dim, text_width=t["width"],
                  text_depth=t["depth"], text_heads=t["num_heads"], text_mlp_dim=t["mlp_dim"])
    kwargs.update(overrides)
    return kwargs


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| over the last axis (computed in float32)."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    return (x32 / jnp.maximum(norm, eps)).astype(x.dtype)


class CLIP(nn.Module):
    """Two towers projected into a shared ``embed_dim`` space.

    ``__call__(images (B, H, W, C), tokens (B', L) int, train=False)`` returns
    ``image_embeds`` (B, embed_dim) and ``text_embeds`` (B', embed_dim), both L2-
    normalised, ``logit_scale`` = exp(param) (the multiplier, unclamped),
    ``logits_per_image`` (B, B') = scale * image @ text.T (+ bias) and, when
    present, ``logit_bias``. ``loss='sigmoid'`` (SigLIP) initialises the scale
    to ln 10 and adds a bias initialised to -10; 'softmax' (CLIP) uses ln(1/0.07).
    """

    capabilities = frozenset({"image_text"})   # fmjax.models.registry.CAPABILITIES

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    embed_dim: int = 512
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    text_mlp_dim: int = 2048
    vocab_size: int = 49408
    context_length: int = 77
    text_pool: str = "argmax"
    eos_token_id: Optional[int] = None
    activation: str = "quick_gelu"
    text_activation: Optional[str] = None  # None: same as ``activation``
    layernorm_eps: float = 1e-5
    loss: str = "softmax"
    logit_scale_init: Optional[float] = None  # None: ln(1/0.07) softmax, ln(10) sigmoid
    logit_bias_init: Optional[float] = None  # None: -10 for sigmoid, no bias for softmax
    dropout: float = 0.0
    drop_path: float = 0.0
    attention_impl: str = "xla"
    remat: bool = False
    stem: str = "patch"  # image tower's patch embedding: 'patch' or 'conv' (ViT.stem)
    patch_bias: bool = True  # False: open_clip / OpenAI conv1 (bias=False); see _without_patch_bias
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown CLIP loss {self.loss!r}; valid: {LOSSES}.")
        common = dict(dropout=self.dropout, drop_path=self.drop_path,
                      layernorm_eps=self.layernorm_eps, attention_impl=self.attention_impl,
                      remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype)
        vit = ViT
        if not self.patch_bias:
            if self.stem != "patch":
                raise ValueError("patch_bias=False needs stem='patch' (the conv stem has its own "
                                 "biases and norms).")
            vit = nn.map_variables(ViT, "params", self._without_patch_bias,
                                   init=self.is_initializing())
        self.image = vit(  # class-token ViT with ln_pre, no head
            width=self.width, depth=self.depth, num_heads=self.num_heads,
            mlp_dim=self.mlp_dim, patch_size=self.patch_size, activation=self.activation,
            pool="cls", class_token=True, pos_embed="learned", pre_norm=True, num_classes=0,
            stem=self.stem, **common)
        self.image_proj = nn.Dense(
            self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=layers.part(nn.initializers.normal(self.width ** -0.5),
                                    ("embed", None)))
        self.text = TextTransformer(
            vocab_size=self.vocab_size, context_length=self.context_length,
            width=self.text_width, depth=self.text_depth, num_heads=self.text_heads,
            mlp_dim=self.text_mlp_dim, embed_dim=self.embed_dim,
            activation=self.text_activation or self.activation, pool=self.text_pool,
            eos_token_id=self.eos_token_id, **common)
        sigmoid = self.loss == "sigmoid"
        scale = self.logit_scale_init
        if scale is None:
            scale = math.log(10.0) if sigmoid else math.log(1 / 0.07)
        self.logit_scale = self.param(
            "logit_scale", layers.part(nn.initializers.constant(scale), ()), (),
            self.param_dtype)
        bias = self.logit_bias_init
        if bias is None and sigmoid:
            bias = -10.0
        self.logit_bias = None if bias is None else self.param(
            "logit_bias", layers.part(nn.initializers.constant(bias), ()), (), self.param_dtype)

    def _without_patch_bias(self, variables):
        """The image tower sees a zero patch-embedding bias: open_clip's and OpenAI's ``conv1``
        has none. The param stays in the tree (checkpoints and converters keep one layout) at its
        zero init; it gets no gradient, so Adam leaves it at zero and clipping norms ignore it."""
        if self.is_initializing():
            return variables
        params = dict(variables["params"])
        embed = dict(params["patch_embed"])
        proj = dict(embed["proj"])
        proj["bias"] = jnp.zeros_like(proj["bias"])
        embed["proj"], params["patch_embed"] = proj, embed
        return dict(variables, params=params)

    def encode_image(self, images: jax.Array, train: bool = False,
                     normalize: bool = True) -> jax.Array:
        """(B, H, W, C) images -> (B, embed_dim) embeddings (L2-normalised by default)."""
        pooled = self.image(images, train=train)["pre_logits"]
        emb = self.image_proj(pooled)
        return l2_normalize(emb) if normalize else emb

    def encode_text(self, tokens: jax.Array, train: bool = False,
                    normalize: bool = True) -> jax.Array:
        """(B, L) token ids -> (B, embed_dim) embeddings (L2-normalised by default)."""
        emb = self.text(tokens, train=train)["embedding"]
        return l2_normalize(emb) if normalize else emb

    def __call__(self, images: jax.Array, tokens: jax.Array,
                 train: bool = False) -> Dict[str, jax.Array]:
        """Embed both modalities; see the class docstring for the outputs."""
        image_embeds = self.encode_image(images, train)
        text_embeds = self.encode_text(tokens, train)
        scale = jnp.exp(self.logit_scale.astype(jnp.float32))
        logits = scale * jnp.einsum("id,td->it", image_embeds.astype(jnp.float32),
                                    text_embeds.astype(jnp.float32))
        out = dict(image_embeds=image_embeds, text_embeds=text_embeds, logit_scale=scale)
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.astype(jnp.float32)
            logits = logits + out["logit_bias"]
        out["logits_per_image"] = logits
        return out

