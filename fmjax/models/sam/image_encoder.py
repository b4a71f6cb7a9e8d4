"""SAM's image encoder: a plain ViT over 16x16 patches with windowed attention in most blocks
(windows of ``window_size`` tokens per side, the grid zero-padded to a multiple), global
attention in ``global_attn_indexes``, decomposed relative-position biases in every attention,
a learned absolute position embedding, and a conv neck to ``out_chans`` (256) channels:
1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (both convs without bias).

NHWC throughout: ``SamImageEncoder(images (B, S, S, 3)) -> (B, S/16, S/16, out_chans)``.
Other input sizes than ``image_size`` run (the position embedding is resized bicubically, the
global blocks' relative-position tables linearly as in SAM's ``get_rel_pos``), but only
``image_size`` is what SAM / transformers run and what the parity tests cover; ``SAM``'s prompt
encoder assumes the ``image_size`` grid.
Matches ``segment_anything.modeling.ImageEncoderViT`` and transformers' ``SamVisionEncoder``
(``fmjax.interop.hf_sam``; ``tests/interop/test_sam_parity.py``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models.blocks import DropPath, Mlp, stochastic_depth_rates
from fmjax.models.core import DenseND, Dtype, layer_norm, part, zeros
from fmjax.models.sam.common import LayerNorm2d, SamAttention, conv, window_partition, window_unpartition


class SamVisionBlock(nn.Module):
    """Pre-norm block: norm1 -> (windowed or global) attention -> residual; norm2 -> MLP ->
    residual. ``window_size`` 0 is global attention over the whole grid; ``grid`` is the
    grid the block's relative-position tables are built for (global blocks)."""
    num_heads: int
    mlp_dim: int
    window_size: int
    grid: Sequence[int]
    use_rel_pos: bool = True
    qkv_bias: bool = True
    eps: float = 1e-6
    activation: str = "gelu"
    drop_path: float = 0.0   # stochastic depth of both residual branches (rng 'dropout')
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        b, h, w, c = x.shape
        size = (self.window_size,) * 2 if self.window_size > 0 else tuple(self.grid)
        y = layer_norm(self.eps, self.dtype, self.param_dtype, "norm1")(x)
        if self.window_size > 0:
            y, padded = window_partition(y, self.window_size)
        bh, bw = y.shape[1], y.shape[2]
        t = y.reshape(y.shape[0], bh * bw, c)
        t = SamAttention(self.num_heads, use_bias=self.qkv_bias,
                         rel_pos_size=size if self.use_rel_pos else None, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="attn")(t, t, t, grid=(bh, bw))
        y = t.reshape(-1, bh, bw, c)
        if self.window_size > 0:
            y = window_unpartition(y, self.window_size, padded, (h, w))
        x = x + DropPath(self.drop_path)(y, deterministic)
        t = layer_norm(self.eps, self.dtype, self.param_dtype, "norm2")(x).reshape(b, h * w, c)
        t = Mlp(self.mlp_dim, activation=self.activation, dtype=self.dtype,
                param_dtype=self.param_dtype, name="mlp")(t)
        return x + DropPath(self.drop_path)(t.reshape(b, h, w, c), deterministic)


class SamImageEncoder(nn.Module):
    """ViT-Det-style backbone of SAM (see the module docstring). Params: ``patch_embed/proj``
    (a dense projection of (p, p, C)-flattened patches, as the ViT's), ``pos_embed``
    (1, S/p, S/p, D), ``block_{i}``, ``neck/{conv1,norm1,conv2,norm2}``."""
    image_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: Optional[int] = None   # default 4 * width
    out_chans: int = 256
    window_size: int = 14
    global_attn_indexes: Sequence[int] = (2, 5, 8, 11)
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    qkv_bias: bool = True
    eps: float = 1e-6
    neck_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False   # recompute each block's activations in the backward pass (same params)
    # stochastic depth rising linearly over the blocks from 0 to drop_path (ViTDet's rule; the SAM
    # paper trains with 0.4); active only with deterministic=False and a 'dropout' rng
    drop_path: float = 0.0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        b, hh, ww, cc = images.shape
        p = self.patch_size
        if hh % p or ww % p:
            raise ValueError(f"Image size {hh}x{ww} is not a multiple of patch_size={p}.")
        gh, gw = hh // p, ww // p
        patches = images.reshape(b, gh, p, gw, p, cc).transpose(0, 1, 3, 2, 4, 5)
        x = _PatchEmbed(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="patch_embed")(patches.reshape(b, gh, gw, p * p * cc))
        if self.use_abs_pos:
            pos = self.param("pos_embed", part(zeros, (None, None, None, "embed")),
                             (1, self.grid, self.grid, self.width), self.param_dtype)
            if (gh, gw) != (self.grid, self.grid):
                pos = jax.image.resize(pos, (1, gh, gw, self.width), "bicubic")
            x = x + pos.astype(self.dtype)
        mlp_dim = self.mlp_dim or 4 * self.width
        block = nn.remat(SamVisionBlock, static_argnums=(2,)) if self.remat else SamVisionBlock
        rates = stochastic_depth_rates(self.drop_path, self.depth)
        for i in range(self.depth):
            window = 0 if i in tuple(self.global_attn_indexes) else self.window_size
            x = block(self.num_heads, mlp_dim, window, (self.grid, self.grid),
                      use_rel_pos=self.use_rel_pos, qkv_bias=self.qkv_bias, eps=self.eps,
                      drop_path=rates[i], dtype=self.dtype, param_dtype=self.param_dtype,
                      name=f"block_{i}")(x, deterministic)
        return SamNeck(self.out_chans, eps=self.neck_eps, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="neck")(x)


class _PatchEmbed(nn.Module):
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, patches):
        return DenseND((self.width,), contract=1, kernel_axes=(None, "embed"), bias_axes=("embed",),
                       dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(patches)


class SamNeck(nn.Module):
    """1x1 conv (no bias) -> LayerNorm2d -> 3x3 conv (no bias, padding 1) -> LayerNorm2d."""
    out_chans: int = 256
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.out_chans, 1, use_bias=False, name="conv1", **kw)(x)
        x = LayerNorm2d(self.eps, name="norm1", **kw)(x)
        x = conv(self.out_chans, 3, padding=1, use_bias=False, name="conv2", **kw)(x)
        return LayerNorm2d(self.eps, name="norm2", **kw)(x)
