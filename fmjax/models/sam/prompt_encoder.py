"""SAM's prompt encoder: sparse embeddings of points and boxes, dense embeddings of masks.

- ``SamPositionalEmbedding``: random-Fourier features of coordinates in [0, 1]^2: a fixed
  Gaussian matrix ``gaussian`` (2, F) (a param, N(0, scale^2) at init), then
  [sin, cos](2 pi (2 xy - 1) G) -> 2F channels.
- points (pixel coordinates of the ``input_image_size`` input, shifted by 0.5 to pixel
  centres) -> positional encoding + a learned type embedding: label 1 (foreground)
  ``point_embed[1]``, 0 (background) ``point_embed[0]``, -1 (not a point; also the pad point
  appended when no box is given) ``not_a_point_embed`` instead of the encoding, -10 (padding,
  HF's convention) zeros; 2 / 3 a box's corners given as points (exactly ``_embed_boxes``'s
  tokens, so box and point prompts can share one static layout: the ``sam`` objective).
- boxes (x1, y1, x2, y2) -> two corner tokens, + ``point_embed[2]`` / ``point_embed[3]``.
- masks (B, 4h, 4w) logits -> conv 2x2/2, LayerNorm2d, GELU, conv 2x2/2, LayerNorm2d, GELU,
  1x1 conv -> (B, h, w, D) (``mask_downscaling``); without a mask ``no_mask_embed`` everywhere.
- ``dense_pe()``: the encoding of the (h, w) grid of image-embedding cell centres.

Layouts follow transformers' ``SamPromptEncoder``: points (B, P, N, 2), labels (B, P, N),
boxes (B, P, 4) -> sparse (B, P, tokens, D); dense maps are NHWC.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.models.core import Dtype, part
from fmjax.models.sam.common import LayerNorm2d, conv


class SamPositionalEmbedding(nn.Module):
    num_pos_feats: int = 128
    scale: float = 1.0
    param_dtype: Dtype = jnp.float32

    def setup(self):
        scale = self.scale
        self.gaussian = self.param(
            "gaussian", part(lambda k, s, d=jnp.float32: scale * jax.random.normal(k, s, d), (None, None)),
            (2, self.num_pos_feats), self.param_dtype)

    def __call__(self, coords01: jax.Array) -> jax.Array:
        """(..., 2) xy in [0, 1] -> (..., 2 * num_pos_feats)."""
        c = (2 * coords01 - 1).astype(self.gaussian.dtype) @ self.gaussian
        c = 2 * np.pi * c
        return jnp.concatenate([jnp.sin(c), jnp.cos(c)], axis=-1)


class MaskDownscaling(nn.Module):
    embed_dim: int = 256
    mask_in_chans: int = 16
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, masks):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gelu = lambda x: nn.gelu(x, approximate=False)  # noqa: E731
        x = conv(self.mask_in_chans // 4, 2, stride=2, name="conv1", **kw)(masks)
        x = gelu(LayerNorm2d(self.eps, name="norm1", **kw)(x))
        x = conv(self.mask_in_chans, 2, stride=2, name="conv2", **kw)(x)
        x = gelu(LayerNorm2d(self.eps, name="norm2", **kw)(x))
        return conv(self.embed_dim, 1, name="conv3", **kw)(x)


class SamPromptEncoder(nn.Module):
    """See the module docstring. ``image_embedding_size``: the image embedding's grid side
    (h = w); ``input_image_size``: the side of the (padded, square) input image."""
    embed_dim: int = 256
    image_embedding_size: int = 64
    input_image_size: int = 1024
    mask_in_chans: int = 16
    num_point_embeddings: int = 4
    pe_scale: float = 1.0
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.embed_dim % 2:
            raise ValueError(f"embed_dim={self.embed_dim} must be even (sin and cos halves).")
        emb = part(nn.initializers.normal(1.0), (None, "embed"))
        d = self.embed_dim
        self.pe_layer = SamPositionalEmbedding(d // 2, self.pe_scale, self.param_dtype)
        self.point_embed = self.param("point_embed", emb, (self.num_point_embeddings, d), self.param_dtype)
        self.not_a_point_embed = self.param("not_a_point_embed", emb, (1, d), self.param_dtype)
        self.no_mask_embed = self.param("no_mask_embed", emb, (1, d), self.param_dtype)
        self.mask_downscaling = MaskDownscaling(d, self.mask_in_chans, self.eps, self.dtype, self.param_dtype)

    def dense_pe(self) -> jax.Array:
        """(h, w, D): the encoding of the image-embedding cell centres ((i + 0.5) / h)."""
        n = self.image_embedding_size
        centres = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n
        y, x = jnp.meshgrid(centres, centres, indexing="ij")
        return self.pe_layer(jnp.stack([x, y], axis=-1))

    def _embed_points(self, points, labels, pad: bool):
        points = points.astype(jnp.float32) + 0.5
        labels = labels.astype(jnp.int32)
        if pad:
            points = jnp.concatenate([points, jnp.zeros(points.shape[:2] + (1, 2), points.dtype)], axis=2)
            labels = jnp.concatenate([labels, -jnp.ones(labels.shape[:2] + (1,), labels.dtype)], axis=2)
        emb = self.pe_layer(points / self.input_image_size)
        lab = labels[..., None]
        emb = jnp.where(lab == -1, self.not_a_point_embed[0], emb)
        emb = jnp.where(lab == -10, 0.0, emb)
        emb = jnp.where(lab == 0, emb + self.point_embed[0], emb)
        emb = jnp.where(lab == 2, emb + self.point_embed[2], emb)  # a box's top-left corner as a point
        emb = jnp.where(lab == 3, emb + self.point_embed[3], emb)  # ... and its bottom-right corner
        return jnp.where(lab == 1, emb + self.point_embed[1], emb)

    def _embed_boxes(self, boxes):
        b, n = boxes.shape[:2]
        corners = (boxes.astype(jnp.float32) + 0.5).reshape(b, n, 2, 2)
        emb = self.pe_layer(corners / self.input_image_size)
        return emb + self.point_embed[2:4]

    def __call__(self, points: Optional[jax.Array] = None, labels: Optional[jax.Array] = None,
                 boxes: Optional[jax.Array] = None, masks: Optional[jax.Array] = None,
                 batch_size: int = 1):
        """-> (sparse (B, P, tokens, D) or None, dense (B, h, w, D)). ``masks``: (B, 4h, 4w)
        or (B, 4h, 4w, 1) mask logits."""
        sparse = None
        if points is not None:
            if labels is None:
                labels = jnp.ones(points.shape[:-1], jnp.int32)
            batch_size = points.shape[0]
            sparse = self._embed_points(points, labels, pad=boxes is None)
        if boxes is not None:
            batch_size = boxes.shape[0]
            box = self._embed_boxes(boxes)
            sparse = box if sparse is None else jnp.concatenate([sparse, box], axis=2)
        if sparse is not None:
            sparse = sparse.astype(self.dtype)
        n = self.image_embedding_size
        if masks is not None:
            if masks.ndim == 3:
                masks = masks[..., None]
            dense = self.mask_downscaling(masks.astype(self.dtype))
        else:
            if self.is_initializing():   # create the downscaler's params too
                self.mask_downscaling(jnp.zeros((1, 4 * n, 4 * n, 1), self.dtype))
            dense = jnp.broadcast_to(self.no_mask_embed[0].astype(self.dtype),
                                     (batch_size, n, n, self.embed_dim))
        return sparse, dense
