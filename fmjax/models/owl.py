"""OWL-ViT (Minderer et al., 2022, "Simple Open-Vocabulary Object Detection with Vision
Transformers"): a CLIP whose image tower's patch tokens each predict one box and one class
embedding, matched against text embeddings of free-form queries.

``OWLViT(clip=dict(<CLIP fields>), ...)``; param tree ``clip/...`` (a ``fmjax.models.clip.CLIP``,
so a CLIP workdir loads with ``config.model_init.mapping={'params': 'clip'}``), ``merged_norm``,
``class_head/{dense0,logit_shift,logit_scale}``, ``box_head/{dense0,dense1,dense2}``, the
layout of transformers' ``OwlViTForObjectDetection`` (its ``layer_norm``, ``class_head``,
``box_head``):

- the image tower's final tokens (after ``ln_post``: fmjax's ViT ``tokens``) are merged with the
  class token, ``patch_i * cls``, and layer-normed (``merged_norm``): one feature per patch;
- ``class_head``: ``dense0`` projects a feature to the text embedding size; with both sides
  L2-normalised (eps 1e-6 on the norm) the logit of query q at patch i is
  ``(<c_i, t_q> + shift_i) * (elu(scale_i) + 1)``, ``shift`` / ``scale`` linear in the feature;
- ``box_head``: an MLP (width, width, 4; GELU) plus a fixed bias, the inverse sigmoid of the
  patch's grid corner ``((col + 1) / w, (row + 1) / h)`` and of the size ``1 / num_patches``
  (OWL-ViT's ``compute_box_bias``), then a sigmoid: ``(cx, cy, w, h)`` in [0, 1] of the image.

The image tower must be CLIP's flat class-token ViT (the flat keys, not an ``image``
sub-config). The queries are any token sequences of the CLIP text tower's tokenizer.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.models import layers
from fmjax.models.clip import CLIP, _frozen, _plain

Dtype = Any


def box_bias(grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h * grid_w, 4) float32: the inverse sigmoid of each patch's (x, y) grid corner
    ((col + 1) / w, (row + 1) / h) and of the box size (1 / w, 1 / h), row-major, as OWL-ViT's
    ``compute_box_bias`` (eps 1e-4)."""
    xs = np.arange(1, grid_w + 1, dtype=np.float32) / grid_w
    ys = np.arange(1, grid_h + 1, dtype=np.float32) / grid_h
    xx, yy = np.meshgrid(xs, ys)
    coords = np.clip(np.stack([xx.ravel(), yy.ravel()], -1), 0.0, 1.0)
    inv = lambda v: np.log(v + 1e-4) - np.log1p(-v + 1e-4)  # noqa: E731
    size = np.broadcast_to(np.array([1.0 / grid_w, 1.0 / grid_h], np.float32), coords.shape)
    return np.concatenate([inv(coords), inv(size)], -1).astype(np.float32)


class ClassHead(nn.Module):
    """OWL-ViT's class head: ``dense0`` to the text embedding size, ``logit_shift``,
    ``logit_scale`` (see the module docstring)."""
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats, query_embeds):
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        c = dense(self.embed_dim, "dense0")(feats).astype(jnp.float32)
        c = c / (jnp.linalg.norm(c, axis=-1, keepdims=True) + 1e-6)
        q = query_embeds.astype(jnp.float32)
        q = q / (jnp.linalg.norm(q, axis=-1, keepdims=True) + 1e-6)
        logits = jnp.einsum("bnd,qd->bnq", c, q)
        shift = dense(1, "logit_shift")(feats).astype(jnp.float32)
        scale = jax.nn.elu(dense(1, "logit_scale")(feats).astype(jnp.float32)) + 1.0
        return (logits + shift) * scale, c, q


class BoxHead(nn.Module):
    """OWL-ViT's box head: ``dense0`` / ``dense1`` (width, exact GELU) and ``dense2`` (4)."""
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats):
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        x = nn.gelu(dense(self.width, "dense0")(feats), approximate=False)
        x = nn.gelu(dense(self.width, "dense1")(x), approximate=False)
        return dense(4, "dense2")(x)

class OWLViT(nn.Module):
    """See the module docstring. ``__call__(images, query_tokens)`` -> ``logits`` (B, N, Q),
    ``boxes`` (B, N, 4) cxcywh in [0, 1], ``class_embeds`` (B, N, E) (normalised) and
    ``query_embeds`` (Q, E) (normalised); N is the patch grid's size."""

    capabilities = frozenset({"open_vocab_detection"})   # fmjax.models.registry.CAPABILITIES

    clip: Optional[Mapping[str, Any]] = None   # CLIP's fields (fmjax.models.clip.CLIP)
    layernorm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "clip", _frozen(self.clip))
        super().__post_init__()

    def clip_kwargs(self) -> Dict[str, Any]:
        if not self.clip:
            raise ValueError("OWL-ViT needs config.model.clip: a CLIP model's fields (as configs/clip.py's "
                             "config.model, without name).")
        kw = _plain(self.clip)
        kw.pop("name", None)
        if kw.get("image") is not None:
            raise ValueError("OWL-ViT's image tower is CLIP's flat class-token ViT; drop "
                             "config.model.clip.image and give the flat keys (width, depth, ...).")
        return dict(kw, dtype=self.dtype, param_dtype=self.param_dtype)

    @property
    def patch_size(self) -> int:
        return int(self.clip_kwargs()["patch_size"])

    def setup(self):
        self.clip_model = CLIP(**self.clip_kwargs(), name="clip")
        self.merged_norm = layers.layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "merged_norm")
        self.class_head = ClassHead(self.clip_model.embed_dim, self.dtype, self.param_dtype, name="class_head")
        self.box_head = BoxHead(int(self.clip_kwargs()["width"]), self.dtype, self.param_dtype, name="box_head")

    # -- the image side ------------------------------------------------------------------------
    def image_features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, C) -> (B, N, width): the patch tokens merged with the class token."""
        tokens = self.clip_model.image_encoder(images, train=train)["tokens"]
        prefix = tokens.shape[1] - (images.shape[1] // self.patch_size) * (images.shape[2] // self.patch_size)
        merged = tokens[:, prefix:] * tokens[:, :1]
        return self.merged_norm(merged)

    def boxes(self, feats: jax.Array, grid) -> jax.Array:
        """(B, N, width) features on an (h, w) grid -> (B, N, 4) cxcywh in [0, 1]."""
        return jax.nn.sigmoid(self.box_head(feats).astype(jnp.float32) + jnp.asarray(box_bias(*grid)))

    def class_logits(self, feats: jax.Array, query_embeds: jax.Array):
        """(B, N, width), (Q, E) unnormalised queries -> (logits (B, N, Q), class_embeds (B, N, E),
        queries (Q, E)), both embeddings L2-normalised (+1e-6 on the norm, as OWL-ViT)."""
        return self.class_head(feats, query_embeds)

    def encode_queries(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """(Q, L) token ids -> (Q, E) text embeddings (unnormalised: the class head normalises)."""
        return self.clip_model.encode_text(tokens, train=train, normalize=False)

    def detect(self, images: jax.Array, query_embeds: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
        """Images and precomputed query embeddings (Q, E) -> ``__call__``'s outputs."""
        grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
        feats = self.image_features(images, train)
        logits, c, q = self.class_logits(feats, query_embeds)
        return dict(logits=logits, boxes=self.boxes(feats, grid), class_embeds=c, query_embeds=q)

    def __call__(self, images: jax.Array, query_tokens: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
        out = self.detect(images, self.encode_queries(query_tokens, train), train)
        # CLIP's own outputs keep every CLIP param in the tree at init (image_proj, logit_scale)
        if self.is_initializing():
            self.clip_model(images, query_tokens, train=train)
        return out
