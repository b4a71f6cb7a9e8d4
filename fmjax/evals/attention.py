"""Attention-map pictures (DINO-style: last-layer class-token attention per head).

Maps come from ``ViT.attention_maps`` (``(B, heads, N)`` over the patch grid,
row-major as in ``patchify``). Tiling and denormalising reuse
``fmjax.evals.images``.
"""
import numpy as np

from fmjax.evals.images import denormalize, image_grid, to_uint8

# Viridis (matplotlib) sampled at 0, 1/8, ..., 1; linear in between.
_VIRIDIS = np.array([[int(c[i:i + 2], 16) / 255.0 for i in (0, 2, 4)] for c in (
    "440154", "472c7a", "3b528b", "2c728e", "21918c", "28ae80", "5ec962", "addc30", "fde725")],
    np.float32)


def colormap(x):
    """Values in [0, 1] (clipped), any shape -> float RGB in [0, 1] (viridis-like), shape + (3,)."""
    x = np.clip(np.nan_to_num(np.asarray(x, np.float32)), 0.0, 1.0)
    pos = x * (len(_VIRIDIS) - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), len(_VIRIDIS) - 2)
    t = (pos - lo)[..., None]
    return _VIRIDIS[lo] * (1.0 - t) + _VIRIDIS[lo + 1] * t


def attention_grid(images, maps, patch_size, mean=None, std=None, n=8, pad=2):
    """One row per example: the image, then each head's attention map over it.

    Args:
        images: ``[B, H, W, 3]`` uint8 (shown as is) or float normalised with
            ``(x - mean) / std`` (inverted for display; float in [0, 1] if both None).
        maps: ``[B, heads, N]`` non-negative weights over the ``(H/p) x (W/p)`` patch
            grid in row-major order (e.g. ``ViT.attention_maps``).
        patch_size: patch side p; each weight fills its p x p pixels (nearest upsampling).
        mean, std: per-channel normalisation of float ``images``.
        n: number of examples (rows) to show.
        pad: border pixels of the grid.

    Each map is min-max scaled on its own before the colour map (a constant map is dark).

    Returns:
        uint8 ``[n*H + (n+1)*pad, (1+heads)*W + (2+heads)*pad, 3]``.
    """
    images = np.asarray(images)[:n]
    maps = np.asarray(maps, np.float32)[:n]
    b, h, w = images.shape[:3]
    gh, gw = h // patch_size, w // patch_size
    if maps.ndim != 3 or maps.shape[0] != b or maps.shape[2] != gh * gw:
        raise ValueError(f"maps {maps.shape} do not match {b} images of {h}x{w} with "
                         f"patch_size={patch_size} ({gh}x{gw} = {gh * gw} patches).")
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
        if mean is not None or std is not None:
            images = denormalize(images, 0.0 if mean is None else mean,
                                 1.0 if std is None else std)
    lo = maps.min(axis=-1, keepdims=True)
    span = maps.max(axis=-1, keepdims=True) - lo
    scaled = np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1.0), 0.0)
    scaled = scaled.reshape(b, -1, gh, gw)
    scaled = np.repeat(np.repeat(scaled, patch_size, axis=2), patch_size, axis=3)
    # Images whose size is not a multiple of p: leave the uncovered border dark.
    full = np.zeros(scaled.shape[:2] + (h, w), np.float32)
    full[:, :, :gh * patch_size, :gw * patch_size] = scaled
    heat = to_uint8(colormap(full))                       # [b, heads, H, W, 3]
    rows = [np.concatenate([to_uint8(images[i])[None], heat[i]], axis=0) for i in range(b)]
    return image_grid(rows, pad=pad)
