"""Token embeddings: patchify / unpatchify, the linear patch embedding and the convolutional
stem, and the fixed 2-D sin-cos position embedding."""
from typing import Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.models.core import Conv, Dtype, constrain, dense, layer_norm, part, zeros


def patch_grid(shape, patch_size: int) -> Tuple[int, int]:
    """(H/p, W/p) of a (B, H, W, C) ``shape``; ValueError unless p divides H and W."""
    hh, ww = shape[1], shape[2]
    if hh % patch_size or ww % patch_size:
        raise ValueError(f"Image size {hh}x{ww} is not divisible by patch_size={patch_size}.")
    return hh // patch_size, ww // patch_size


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, p*p*C), per patch: p rows, p cols, channels last.

    Same order as the MAE reference (``nchpwq -> nhwpqc``) and HF ``ViTMAE.patchify``.
    """
    b, _, _, c = images.shape
    p = patch_size
    h, w = patch_grid(images.shape, p)
    x = images.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * w, p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, grid: Optional[Tuple[int, int]] = None,
               channels: int = 3) -> jax.Array:
    """Inverse of ``patchify``: (B, h*w, p*p*C) -> (B, h*p, w*p, C); square grid if None."""
    b, n, _ = patches.shape
    p = patch_size
    if grid is None:
        h = w = int(round(n ** 0.5))
        if h * w != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid=(h, w).")
    else:
        h, w = grid
    x = patches.reshape(b, h, w, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, channels)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding as a Dense over flattened patches.

    Equivalent to a conv with kernel = stride = patch_size; the kernel is shaped
    (p*p*C, embed) with axes ('patch', 'embed') and the patch vector ordered as
    in ``patchify`` (a PyTorch conv weight (D, C, p, p) maps to it via
    ``w.transpose(2, 3, 1, 0).reshape(-1, D)``). Returns (B, h*w, embed).
    """
    features: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """Embed (B, H, W, C) images into (B, num_patches, features) tokens."""
        x = patchify(images, self.patch_size)
        x = dense(self.features, ("patch", "embed"), self.dtype, self.param_dtype, "proj")(x)
        return constrain(x)


class ConvStem(PatchEmbed):
    """Convolutional patch embedding ("Early convolutions help transformers see better",
    Xiao et al. 2021): log2(patch_size) 3x3 stride-2 convs, each followed by a LayerNorm
    over channels and GELU (the paper's BatchNorm + ReLU, without batch statistics), with
    channels doubling up to ``features / 2``, then a 1x1 conv to ``features``. Same output
    as ``PatchEmbed`` - (B, H/p * W/p, features) - but with overlapping receptive fields,
    which makes small objects easier to see. ``patch_size`` must be a power of two >= 2.
    Same fields as ``PatchEmbed`` (a drop-in replacement).
    """

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        n = p.bit_length() - 1
        if p < 2 or 2 ** n != p:
            raise ValueError(f"stem='conv' needs a power-of-two patch_size >= 2, got {p}; "
                             "use stem='patch'.")
        patch_grid(images.shape, p)  # stride-2 convs would round a partial patch up
        x = images
        for i in range(n):
            ch = max(self.features // 2 ** (n - i), 8)
            x = Conv(ch, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                     param_dtype=self.param_dtype, name=f"conv_{i}",
                     kernel_init=part(nn.initializers.lecun_normal(),
                     (None, None, "conv_in", "conv_out")),
                     bias_init=part(zeros, ("conv_out",)))(x)
            x = nn.gelu(layer_norm(1e-6, self.dtype, self.param_dtype, f"norm_{i}")(x),
                        approximate=False)
        x = dense(self.features, ("conv_out", "embed"), self.dtype, self.param_dtype, "proj")(x)
        return constrain(x.reshape(images.shape[0], -1, self.features))


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE reference 1-D sin-cos embedding: (M,) positions -> (M, D) = [sin | cos]."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}.")
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: Union[int, Tuple[int, int]],
                            cls_token: bool = False, layout: str = "mae") -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, exactly as facebookresearch/mae.

    Returns float32 (h*w [+1], embed_dim), with a zero row first if ``cls_token``.
    As in the reference, ``np.meshgrid(grid_w, grid_h)`` puts the column index in
    grid[0], so the layout is [sin(col) | cos(col) | sin(row) | cos(row)].

    ``layout='moco_v3'``: facebookresearch/moco-v3 ``vits.py``
    ``build_2d_sincos_position_embedding``, whose ``torch.meshgrid(grid_w, grid_h)`` ('ij'
    indexing) flattens the grid w-major: token t (row-major patches) gets
    [sin(t // h) | cos(t // h) | sin(t % h) | cos(t % h)], i.e. [row | col] on a square grid,
    the MAE table with its halves swapped (same frequencies, computed in float32 as torch).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}.")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if layout == "moco_v3":
        pos_dim = embed_dim // 4
        omega = 1.0 / np.float32(10000.0) ** (np.arange(pos_dim, dtype=np.float32) / np.float32(pos_dim))
        m_w, m_h = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32),
                               indexing="ij")  # torch.meshgrid's default
        out_w = np.einsum("m,d->md", m_w.reshape(-1), omega).astype(np.float32)
        out_h = np.einsum("m,d->md", m_h.reshape(-1), omega).astype(np.float32)
        pos = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], axis=1)
        if cls_token:
            pos = np.concatenate([np.zeros([1, embed_dim], np.float32), pos], axis=0)
        return pos.astype(np.float32)
    if layout != "mae":
        raise ValueError(f"layout={layout!r}; valid: 'mae', 'moco_v3'.")
    grid_h = np.arange(gh, dtype=np.float32)
    grid_w = np.arange(gw, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    pos = np.concatenate([emb_h, emb_w], axis=1)
    if cls_token:
        pos = np.concatenate([np.zeros([1, embed_dim]), pos], axis=0)
    return pos.astype(np.float32)
