"""Tests of image grids, PNG writing and MAE reconstruction pictures."""
import numpy as np
import pytest
from PIL import Image

from fmjax.evals import images as im

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def test_image_grid_shape_and_range():
    rng = np.random.default_rng(0)
    rows = [rng.uniform(-0.5, 1.5, size=(4, 8, 6, 3)).astype(np.float32),
            rng.integers(0, 256, size=(4, 8, 6, 3), dtype=np.uint8)]
    grid = im.image_grid(rows, pad=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * 8 + 3 * 2, 4 * 6 + 5 * 2, 3)
    # uint8 rows are copied as they are; border is the pad colour.
    np.testing.assert_array_equal(grid[2 + 8 + 2:2 + 8 + 2 + 8, 2:8], rows[1][0])
    assert (grid[:2] == 255).all()
    np.testing.assert_array_equal(
        grid[2:10, 2:8], np.round(np.clip(rows[0][0], 0, 1) * 255))


def test_image_grid_ragged_and_grey():
    grid = im.image_grid([np.zeros((3, 4, 4)), np.ones((1, 4, 4, 1))], pad=0)
    assert grid.shape == (8, 12, 3)
    assert (grid[4:, :4] == 255).all()


def test_denormalize_inverts_and_clips():
    x = np.random.default_rng(1).uniform(size=(2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(im.denormalize((x - MEAN) / STD, MEAN, STD), x,
                               atol=1e-6)
    assert im.denormalize(np.full((1, 3), 100.0), MEAN, STD).max() == 1.0


def test_patchify_roundtrip_and_layout():
    x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    p = im.patchify(x, 4)
    assert p.shape == (2, 4, 48)
    # Patch 1 is the top-right block, flattened (row, col, channel).
    np.testing.assert_array_equal(p[0, 1], x[0, :4, 4:].reshape(-1))
    np.testing.assert_array_equal(im.unpatchify(p, 4, 8, 8), x)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reconstruction_grid_perfect_prediction(norm_pix):
    rng = np.random.default_rng(2)
    pix = rng.uniform(size=(3, 16, 16, 3)).astype(np.float32)
    images = (pix - MEAN) / STD
    patches = im.patchify(images, 4)
    if norm_pix:
        mu = patches.mean(-1, keepdims=True)
        var = patches.var(-1, ddof=1, keepdims=True)
        pred = (patches - mu) / np.sqrt(var + 1e-6)
    else:
        pred = patches
    mask = rng.uniform(size=(3, 16)) < 0.75
    grid = im.mae_reconstruction_grid(images, pred, mask, 4, MEAN, STD, n=2,
                                      norm_pix=norm_pix)
    assert grid.dtype == np.uint8
    assert grid.shape == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2, 3)
    recon_row = grid[2 + 18:2 + 18 + 16]
    orig_row = grid[2 + 36:2 + 36 + 16]
    diff = np.abs(recon_row.astype(int) - orig_row.astype(int))
    assert diff.max() <= 1
    np.testing.assert_array_equal(orig_row[:, 2:18], im.to_uint8(pix[0]))
    # Masked patches of the first row are grey; visible ones are original.
    masked_row = grid[2:18, 2:18]
    pm = im.unpatchify(np.repeat(mask[:1, :, None], 48, -1), 4, 16, 16)[0]
    assert (masked_row[pm > 0] == 128).all()
    np.testing.assert_array_equal(masked_row[pm == 0],
                                  im.to_uint8(pix[0])[pm == 0])


def test_reconstruction_grid_uses_prediction_on_masked_patches():
    images = np.zeros((1, 8, 8, 3), np.float32)
    pred = np.ones((1, 4, 48), np.float32)
    mask = np.array([[1, 0, 0, 0]])
    grid = im.mae_reconstruction_grid(images, pred, mask, 4, 0.0, 1.0, pad=0)
    recon = grid[8:16]
    assert (recon[:4, :4] == 255).all() and (recon[4:] == 0).all()


def test_save_png_roundtrip(tmp_path):
    arr = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "a" / "b" / "x.png"
    im.save_png(str(path), arr)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), arr)
    im.save_png(str(tmp_path / "f.png"), np.full((2, 2, 3), 0.5))
    assert np.asarray(Image.open(tmp_path / "f.png")).max() == 128


def test_write_tensorboard_image(tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    im.write_tensorboard_image(writer, "eval/recon", np.zeros((6, 5, 3)), 3)
    writer.close()
    assert any(f.name.startswith("events") for f in tmp_path.iterdir())
