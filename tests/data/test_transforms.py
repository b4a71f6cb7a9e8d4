"""Tests for fmjax.data.transforms."""
import pickle

import numpy as np
import pytest

from fmjax.data import color_ops
from fmjax.data import transforms as tr


def _example(h=32, w=48, seed=0):
    """A random uint8 RGB example with a label."""
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return {"image": img, "label": 3, "caption": "a red square"}


def _rng(seed=0):
    return np.random.default_rng(seed)


ALL_RANDOM = ("random_resized_crop(16)|flip_lr|color_jitter(0.4, 0.4, 0.2, 0.1, p=1.0)"
              "|grayscale(0.5)|gaussian_blur(1.0)|solarize(0.5)|normalize('clip')")


def test_compose_deterministic_given_rng_and_picklable():
    t = tr.parse(ALL_RANDOM)
    a = t(_example(), _rng(1))
    b = pickle.loads(pickle.dumps(t))(_example(), _rng(1))
    c = t(_example(), _rng(2))
    assert a["image"].shape == (16, 16, 3) and a["image"].dtype == np.float32
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])
    assert a["label"] == 3 and a["caption"] == "a red square"


def test_input_example_not_mutated():
    ex = _example()
    before = ex["image"].copy()
    tr.parse("flip_lr(1.0)|normalize")(ex, _rng())
    np.testing.assert_array_equal(ex["image"], before)
    assert ex["image"].dtype == np.uint8


def test_resize_and_center_crop_shapes():
    ex = _example(32, 48)
    assert tr.resize(16)(ex, _rng())["image"].shape == (16, 24, 3)  # shorter side
    assert tr.resize((10, 12))(ex, _rng())["image"].shape == (10, 12, 3)
    out = tr.center_crop(20)(ex, _rng())["image"]
    np.testing.assert_array_equal(out, ex["image"][6:26, 14:34])
    padded = tr.center_crop((40, 40))(ex, _rng())["image"]
    assert padded.shape == (40, 40, 3) and padded[0].sum() == 0


def test_flip_lr():
    ex = _example()
    np.testing.assert_array_equal(tr.flip_lr(1.0)(ex, _rng())["image"], ex["image"][:, ::-1])
    np.testing.assert_array_equal(tr.flip_lr(0.0)(ex, _rng())["image"], ex["image"])


def test_normalize_presets():
    ex = {"image": np.full((2, 2, 3), 255, np.uint8)}
    out = tr.normalize("imagenet")(ex, _rng())["image"]
    mean, std = tr.NORMALIZE_PRESETS["imagenet"]
    np.testing.assert_allclose(out[0, 0], (1 - np.array(mean)) / np.array(std), rtol=1e-6)
    assert out.dtype == np.float32
    custom = tr.normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(ex, _rng())["image"]
    np.testing.assert_allclose(custom, 1.0)
    with pytest.raises(ValueError):
        tr.normalize("nope")


def test_random_resized_crop_scale():
    op = tr.random_resized_crop(8, scale=(0.2, 0.3), ratio=(1.0, 1.0))
    rng = _rng(0)
    fracs = []
    for _ in range(200):
        top, left, h, w = op.get_params(100, 100, rng)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 100
        fracs.append(h * w / 1e4)
    fracs = np.array(fracs)
    assert fracs.min() >= 0.19 and fracs.max() <= 0.31
    full = tr.random_resized_crop(8, scale=(1.0, 1.0))
    assert full.get_params(100, 100, _rng())[2:] == (100, 100)


def test_random_resized_crop_fallback_is_central():
    # Impossible ratio for a very wide image -> every try fails -> fallback.
    op = tr.random_resized_crop(8, scale=(0.99, 1.0), ratio=(1.0, 1.0))
    assert op.get_params(10, 100, _rng()) == (0, 45, 10, 10)


def test_random_resized_crop_content_and_interpolation():
    img = np.zeros((40, 40, 3), np.uint8)
    img[:20] = 255  # top half white
    ex = {"image": img}
    for interp in ("bilinear", "bicubic", "nearest"):
        out = tr.random_resized_crop(10, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                     interpolation=interp)(ex, _rng())["image"]
        assert out.shape == (10, 10, 3) and out.dtype == np.uint8
        assert out[0].min() == 255 and out[-1].max() == 0
    with pytest.raises(ValueError):
        tr.random_resized_crop(10, interpolation="cubic")


def test_pixel_ops():
    ex = _example()
    img = ex["image"]
    sol = color_ops.solarize(1.0, threshold=128)(ex, _rng())["image"]
    np.testing.assert_array_equal(sol, np.where(img >= 128, 255 - img, img))
    gray = color_ops.grayscale(1.0)(ex, _rng())["image"]
    assert gray.shape == img.shape and (gray[..., 0] == gray[..., 2]).all()
    blur = color_ops.gaussian_blur(1.0, sigma=(2.0, 2.0))(ex, _rng())["image"]
    assert blur.shape == img.shape and blur.std() < img.std()
    cj = color_ops.color_jitter(0.4, 0.4, 0.4, 0.1, p=1.0)(ex, _rng())["image"]
    assert cj.shape == img.shape and cj.dtype == np.uint8 and not np.array_equal(cj, img)
    unchanged = color_ops.color_jitter(0.4, 0.4, 0.4, 0.1, p=0.0)(ex, _rng())["image"]
    np.testing.assert_array_equal(unchanged, img)
    with pytest.raises(TypeError, match="uint8"):
        tr.parse("normalize|solarize(1.0)")(ex, _rng())


def test_keep_and_outkey():
    ex = _example()
    out = tr.parse("random_resized_crop(8, outkey='view1')|keep('image', 'view1')")(ex, _rng())
    assert set(out) == {"image", "view1"}
    assert out["view1"].shape == (8, 8, 3) and out["image"].shape == ex["image"].shape
    with pytest.raises(KeyError):
        tr.keep("nope")(ex, _rng())


def test_parse():
    t = tr.parse("random_resized_crop(64, scale=(0.2, 1.0))|flip_lr|normalize('imagenet')"
                 "|keep('image', 'label')")
    assert [type(o).__name__ for o in t.transforms] == [
        "random_resized_crop", "flip_lr", "normalize", "keep"]
    assert t.transforms[0].scale == (0.2, 1.0) and t.transforms[0].size == 64
    out = t(_example(80, 80), _rng())
    assert set(out) == {"image", "label"} and out["image"].shape == (64, 64, 3)
    assert tr.parse("")(_example(), _rng())["label"] == 3
    # '|' inside a string literal is not a separator.
    assert tr.parse("keep('a|b')").transforms[0].keys == ("a|b",)


def test_parse_errors():
    with pytest.raises(ValueError, match="unknown op 'bogus'.*valid ops:.*flip_lr"):
        tr.parse("flip_lr|bogus(3)")
    with pytest.raises(ValueError, match="literals"):
        tr.parse("resize(__import__('os'))")
    with pytest.raises(ValueError):
        tr.parse("resize(")
    with pytest.raises(ValueError, match="bad arguments"):
        tr.parse("flip_lr(1, 2, 3, 4)")


def test_swap_words_hard_negative_caption():
    """NegCLIP-style negatives: exactly one listed word (whole word, any case) becomes a
    different listed word; a caption without one is flagged invalid and left as is."""
    op = tr.parse("swap_words(('circle', 'square', 'star'))")
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):
        out = op({"caption": b"a Red circle left of a small star."}, rng)
        assert out["neg_valid"] == 1 and out["caption"] == b"a Red circle left of a small star."
        words, orig = out["neg_caption"].split(), "a Red circle left of a small star.".split()
        changed = [(a, b) for a, b in zip(orig, words) if a != b]
        assert len(words) == len(orig) and len(changed) == 1
        a, b = changed[0]
        assert a.strip(".") in ("circle", "star") and b.strip(".") in ("circle", "square", "star")
        assert a.strip(".") != b.strip(".")
        seen.add(out["neg_caption"])
    assert len(seen) == 4  # 2 positions x 2 replacements, all drawn
    out = op({"caption": "a starry hexagon"}, rng)  # 'starry' is not the word 'star'
    assert out["neg_valid"] == 0 and out["neg_caption"] == "a starry hexagon"
    same = [tr.parse("swap_words(('circle', 'square', 'star'))")({"caption": "a circle and a star"},
                                                                 np.random.default_rng(5))
            for _ in range(2)]
    assert same[0] == same[1]
    clone = pickle.loads(pickle.dumps(op))
    assert clone({"caption": "one SQUARE"}, np.random.default_rng(1))["neg_caption"] in (
        "one circle", "one star")
    with pytest.raises(ValueError, match="at least two distinct words"):
        tr.swap_words(("circle", "Circle"))


def test_contrast_equals_pillows_enhance_bit_for_bit():
    """color_jitter's contrast takes the luma's mean with NumPy instead of ImageStat (faster on
    small views); the image must be Pillow's own, for RGB and L, shrinking and extrapolating,
    including flat images and means that sit on a half (the rounding of int(mean + 0.5))."""
    from PIL import Image, ImageEnhance
    rng = _rng(1)
    cases = 0
    for k in range(400):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if k % 4 == 1:
            img = (img // 85 * 85).astype(np.uint8)          # few levels: ties in the mean
        if k % 4 == 2:
            img[:] = img[0, 0]                                 # flat
        for pil in (Image.fromarray(img), Image.fromarray(img).convert("L")):
            for f in (float(rng.uniform(0.6, 1.4)), float(rng.uniform(0, 3)), 0.0, 1.0):
                want = np.asarray(ImageEnhance.Contrast(pil).enhance(f))
                np.testing.assert_array_equal(np.asarray(color_ops.enhance_contrast(pil, f)), want)
                cases += 1
    two = Image.fromarray(np.array([[[0, 0, 0], [1, 1, 1]]], np.uint8))  # mean 0.5 -> grey 1
    np.testing.assert_array_equal(np.asarray(color_ops.enhance_contrast(two, 0.0)),
                                  np.asarray(ImageEnhance.Contrast(two).enhance(0.0)))
    assert cases == 3200
