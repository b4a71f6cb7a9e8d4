"""randaugment / random_erasing (fmjax/data/autoaugment.py) against timm's semantics
(huggingface/pytorch-image-models@066e4906 timm/data/auto_augment.py, random_erasing.py;
read, not run)."""
import pickle
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageOps

from fmjax.data import autoaugment as aa
from fmjax.data import transforms as tr


def _image(h=40, w=48, seed=0):
    g = np.random.default_rng(seed)
    img = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[10:30, 12:36] = (200, 60, 20)
    return img


def test_deterministic_given_the_rng_and_changes_images():
    t = tr.parse("randaugment(2, 9)|keep('image')")
    clone = pickle.loads(pickle.dumps(t))
    changed = 0
    for seed in range(40):
        a = t({"image": _image()}, np.random.default_rng(seed))["image"]
        b = clone({"image": _image()}, np.random.default_rng(seed))["image"]
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.uint8 and a.shape == (40, 48, 3)
        changed += not np.array_equal(a, _image())
    # each of 2 ops is skipped with p 0.5: ~3/4 of images change (some ops can be no-ops)
    assert changed >= 20
    outs = {t({"image": _image()}, np.random.default_rng(s))["image"].tobytes() for s in range(40)}
    assert len(outs) > 20


def test_default_is_timm_rand_m9_mstd05_inc1():
    default, from_config = aa.randaugment(), aa.randaugment(config="rand-m9-mstd0.5-inc1")
    for field in ("num_ops", "magnitude", "magnitude_std", "magnitude_max", "increasing", "prob"):
        assert getattr(default, field) == getattr(from_config, field), field
    assert default.names == aa.RAND_INCREASING_TRANSFORMS and len(default.names) == 15
    assert default.fill == (124, 116, 104) and default.interpolation == "bicubic"
    assert aa.parse_timm_config("rand-m7-n3-mstd101-mmax12-inc0") == dict(
        magnitude=7, num_ops=3, magnitude_std=float("inf"), magnitude_max=12, increasing=False)
    plain = aa.randaugment(config="rand-m9")   # timm's defaults: n2, no noise, not increasing
    assert (plain.num_ops, plain.magnitude_std, plain.increasing) == (2, 0.0, False)
    with pytest.raises(ValueError, match="'w0' is not supported"):
        aa.randaugment(config="rand-m9-w0")
    with pytest.raises(ValueError, match="must start with 'rand-'"):
        aa.randaugment(config="augmix-m3")


# timm's argument ranges for magnitudes in [0, 10] (the *_level_to_arg functions)
RANGES = {
    "Rotate": (-30, 30), "ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3),
    "TranslateXRel": (-0.45, 0.45), "TranslateYRel": (-0.45, 0.45),
    "PosterizeIncreasing": (0, 4), "SolarizeIncreasing": (0, 256), "SolarizeAdd": (0, 110),
    "ColorIncreasing": (0.1, 1.9), "ContrastIncreasing": (0.1, 1.9),
    "BrightnessIncreasing": (0.1, 1.9), "SharpnessIncreasing": (0.1, 1.9),
}


def test_sampled_ops_and_magnitudes_are_in_range():
    op = aa.randaugment()
    rng = np.random.default_rng(0)
    names, skipped, args = Counter(), 0, {}
    for _ in range(3000):
        plan = op.sample(rng)
        assert len(plan) == 2
        for name, a, resample in plan:
            names[name] += 1
            if a is None:
                skipped += 1
                continue
            args.setdefault(name, []).append(a[0] if a else None)
            assert (resample == Image.BICUBIC) == (name in aa.GEOMETRIC)
    assert set(names) == set(aa.RAND_INCREASING_TRANSFORMS)
    assert min(names.values()) > 6000 / 15 * 0.8                  # uniform choice
    assert abs(skipped / 6000 - 0.5) < 0.03                         # prob 0.5
    for name, (lo, hi) in RANGES.items():
        v = np.asarray(args[name], float)
        assert lo <= v.min() and v.max() <= hi, (name, v.min(), v.max())
    # m ~ N(9, 0.5) clipped to 10: Rotate = +-3 m degrees, both signs
    rot = np.abs(args["Rotate"])
    assert 26 < rot.mean() < 28 and rot.max() <= 30 and np.mean(np.asarray(args["Rotate"]) > 0) > 0.4
    assert set(args["PosterizeIncreasing"]) <= {0, 1, 2}              # 4 - int(0.4 m), m in [7.5, 10]


def test_fixed_magnitude_gives_timms_arguments():
    op = aa.randaugment(num_ops=15, magnitude=9, magnitude_std=0, prob=1.0)
    expected = {"Rotate": 27.0, "ShearX": 0.27, "TranslateXRel": 0.405, "PosterizeIncreasing": 1,
                "SolarizeIncreasing": 26, "SolarizeAdd": 99, "ColorIncreasing": (0.19, 1.81)}
    seen = {}
    for seed in range(20):
        for name, a, _ in op.sample(np.random.default_rng(seed)):
            if name in expected:
                seen[name] = a[0]
                want = expected[name]
                if isinstance(want, tuple):
                    assert any(abs(a[0] - w) < 1e-9 for w in want)
                elif isinstance(want, int):
                    assert a[0] == want
                else:
                    assert abs(abs(a[0]) - want) < 1e-9
    assert set(seen) == set(expected)
    old = aa.randaugment(num_ops=1, magnitude=9, magnitude_std=0, prob=1.0, increasing=False)
    for seed in range(30):
        (name, a, _), = old.sample(np.random.default_rng(seed))
        if name == "Posterize":
            assert a == (3,)                      # int(0.9 * 4)
        if name in ("Color", "Contrast"):
            assert abs(a[0] - 1.72) < 1e-9        # 0.9 * 1.8 + 0.1


def _apply_plan(plan, image):
    op = aa.randaugment()
    op.sample = lambda rng: plan
    return op.apply(image, np.random.default_rng(0))


def test_ops_do_what_timm_does():
    img = _image()
    np.testing.assert_array_equal(_apply_plan([("Invert", (), None)], img), 255 - img)
    np.testing.assert_array_equal(_apply_plan([("SolarizeAdd", (99,), None)], img),
                                  np.where(img < 128, np.minimum(img.astype(int) + 99, 255), img))
    np.testing.assert_array_equal(_apply_plan([("SolarizeIncreasing", (26,), None)], img),
                                  np.where(img >= 26, 255 - img, img))
    np.testing.assert_array_equal(_apply_plan([("PosterizeIncreasing", (1,), None)], img), img & 0x80)
    np.testing.assert_array_equal(_apply_plan([("Equalize", (), None)], img),
                                  np.asarray(ImageOps.equalize(Image.fromarray(img))))
    # TranslateXRel 0.25 of 48 px = 12 px: output x samples input x + 12, fill (124, 116, 104)
    out = _apply_plan([("TranslateXRel", (0.25,), Image.NEAREST)], img)
    np.testing.assert_array_equal(out[:, :36], img[:, 12:])
    assert (out[:, 36:] == (124, 116, 104)).all()
    out = _apply_plan([("Rotate", (90.0,), Image.NEAREST)], _image(40, 40))
    np.testing.assert_array_equal(out, np.rot90(_image(40, 40)))      # PIL rotates counter-clockwise
    # two ops compose in order; a skipped op (args None) does nothing
    both = _apply_plan([("Invert", (), None), ("TranslateYRel", (0.0,), Image.NEAREST),
                        ("AutoContrast", None, None)], img)
    np.testing.assert_array_equal(both, 255 - img)


def test_grayscale_and_type_errors():
    gray = np.random.default_rng(0).integers(0, 256, (20, 24, 1), dtype=np.uint8)
    op = aa.randaugment(num_ops=15, magnitude_std=0, prob=1.0)
    out = op({"image": gray}, np.random.default_rng(0))["image"]
    assert out.shape == (20, 24, 1) and out.dtype == np.uint8
    with pytest.raises(TypeError, match="uint8"):
        tr.parse("normalize|randaugment")({"image": _image()}, np.random.default_rng(0))


def test_random_erasing_pixel_mode():
    t = tr.parse("normalize('imagenet')|random_erasing(1.0)")
    base = tr.parse("normalize('imagenet')")({"image": _image()}, np.random.default_rng(0))["image"]
    fracs = []
    for seed in range(50):
        a = t({"image": _image()}, np.random.default_rng(seed))["image"]
        b = t({"image": _image()}, np.random.default_rng(seed))["image"]
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.float32 and a.shape == base.shape
        diff = (a != base).any(-1)
        ys, xs = np.nonzero(diff)
        if len(ys):
            box = diff[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            assert box.mean() > 0.95                          # one rectangle
            fracs.append(box.size / diff.size)
    assert len(fracs) >= 45 and min(fracs) >= 0.015 and max(fracs) <= 1 / 3 + 0.05
    erased = [not np.array_equal(tr.parse("normalize|random_erasing")({"image": _image()},
                                                                      np.random.default_rng(s))["image"],
                                 base) for s in range(400)]
    assert abs(np.mean(erased) - 0.25) < 0.07                 # p = 0.25
    const = tr.parse("normalize|random_erasing(1.0, mode='const')")({"image": _image()}, np.random.default_rng(1))["image"]
    assert (const == 0).all(-1).sum() > 0.015 * 40 * 48
    with pytest.raises(TypeError, match="after normalize"):
        tr.parse("random_erasing(1.0)")({"image": _image()}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="mode"):
        tr.parse("random_erasing(mode='zeros')")


def test_deit_mae_finetune_pp_string():
    pp = ("random_resized_crop(32, interpolation='bicubic')|flip_lr|randaugment(2, 9)|normalize('imagenet')"
          "|random_erasing(0.25)|keep('image', 'label')")
    t = tr.parse(pp)
    out = t({"image": _image(), "label": 2}, np.random.default_rng(0))
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.float32 and set(out) == {"image", "label"}
