"""Tests of the attention-map picture (fmjax.evals.attention)."""
import jax
import numpy as np
import pytest

from fmjax.evals import attention as att
from fmjax.models.vit import ViT

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _tile(grid, row, col, h=16, w=16, pad=2):
    """Pixel box of the image at (row, col) of an attention grid."""
    y, x = pad + row * (h + pad), pad + col * (w + pad)
    return grid[y:y + h, x:x + w]


def test_shape_dtype_and_images():
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 1, size=(3, 16, 16, 3)).astype(np.float32)
    maps = rng.uniform(size=(3, 2, 16)).astype(np.float32)
    grid = att.attention_grid((raw - MEAN) / STD, maps, patch_size=4, mean=MEAN, std=STD, n=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * 16 + 3 * 2, 3 * 16 + 4 * 2, 3)
    np.testing.assert_allclose(_tile(grid, 1, 0), np.round(raw[1] * 255), atol=1)
    u8 = (raw * 255).astype(np.uint8)
    np.testing.assert_array_equal(_tile(att.attention_grid(u8, maps, 4), 2, 0), u8[2])


def test_concentrated_map_lights_up_its_patch():
    maps = np.full((1, 2, 16), 1e-3, np.float32)
    maps[0, 0, 6] = 1.0            # head 0: patch (row 1, col 2) of the 4x4 grid
    maps[0, 1, 15] = 1.0           # head 1: last patch (row 3, col 3)
    grid = att.attention_grid(np.zeros((1, 16, 16, 3), np.uint8), maps, patch_size=4)
    hot, cold = att.colormap(1.0), att.colormap(0.0)
    for head, (r, c) in enumerate([(1, 2), (3, 3)]):
        tile = _tile(grid, 0, 1 + head).astype(np.float32) / 255
        lit = np.zeros((16, 16), bool)
        lit[4 * r:4 * r + 4, 4 * c:4 * c + 4] = True
        np.testing.assert_allclose(tile[lit], np.broadcast_to(hot, (16, 3)), atol=1 / 255)
        np.testing.assert_allclose(tile[~lit], np.broadcast_to(cold, (240, 3)), atol=1 / 255)
    assert hot.sum() > 2 * cold.sum()  # bright vs dark


def test_colormap_endpoints_and_shape():
    c = att.colormap(np.linspace(-1, 2, 12).reshape(3, 4))
    assert c.shape == (3, 4, 3) and c.min() >= 0 and c.max() <= 1
    np.testing.assert_allclose(c[0, 0], att.colormap(0.0))
    np.testing.assert_allclose(c[-1, -1], att.colormap(1.0))


def test_bad_map_shape_is_explained():
    with pytest.raises(ValueError, match="patch_size=4"):
        att.attention_grid(np.zeros((1, 16, 16, 3)), np.zeros((1, 2, 9)), patch_size=4)


def test_with_vit_attention_maps():
    model = ViT(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4, num_registers=1)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(1), images)
    maps = model.apply(variables, images, method=ViT.attention_maps)
    grid = att.attention_grid(np.asarray(images), maps, 4, MEAN, STD)
    assert grid.shape == (2 * 16 + 3 * 2, 5 * 16 + 6 * 2, 3)
