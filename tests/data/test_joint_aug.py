"""Joint augmentation (fmjax/data/geometry.py and the ``keys=`` / ``_aug/*`` convention of
fmjax/data/transforms.py): masks, boxes and points follow the image's crop and flip; plain
pipelines are unchanged."""
import hashlib
import pickle

import numpy as np
import PIL
import pytest

from fmjax.data import geometry
from fmjax.data import pipeline as pl
from fmjax.data import transforms as tr

# -- plain pipelines are bit-identical to the code before the registry / joint change -------

# Digests of the outputs (keys, dtypes, shapes, bytes) and of the rng's next draw (so the
# same number of draws), computed with fmjax/data/transforms.py as it was before `keys=`,
# `_aug/*` and the op registry existed (Pillow 13.0.0, NumPy 2.4.6).
REFERENCE = {
    "random_resized_crop(32, scale=(0.5, 1.0))|flip_lr|normalize('imagenet')|keep('image', 'label')": "0d2c3af72080fc9e",
    "random_resized_crop(24, scale=(0.2, 1.0))|flip_lr|normalize('imagenet')|keep('image')": "003e937b45531b2c",
    "resize(36)|center_crop(32)|normalize('imagenet')|keep('image', 'label')": "5972da8630a55353",
    "flip_lr|normalize('half')|keep('image', 'label')": "20fd3c8399a65f84",
    "resize(32)|center_crop(32)|flip_lr|normalize('half')|keep('image', 'label')": "b90a52517b7f0698",
    "random_resized_crop(16)|flip_lr|color_jitter(0.4, 0.4, 0.2, 0.1, p=1.0)|grayscale(0.5)"
    "|gaussian_blur(1.0)|solarize(0.5)|normalize('clip')": "4571200321f26cef",
    "random_resized_crop(8, outkey='view1')|flip_lr(0.7, key='view1')|keep('image', 'view1')": "d916bb90005baa58",
    "multi_crop(32, 16, 4, global_scale=(0.4, 1.0), local_scale=(0.1, 0.4))"
    "|keep('global_crops', 'local_crops')": "8914bcce8c8c4792",
    "random_resized_crop(20, scale=(0.9, 1.0), interpolation='bilinear')|flip_lr|tokenize(16)"
    "|keep('image', 'tokens')": "eb6ec02bab083d49",
    "flip_lr": "00124e26c601c802",                 # no keep: the _aug/* records must not leak
    "random_resized_crop(12)": "de220264362c4021",
    "resize((10, 14), interpolation='nearest')|center_crop(12)": "8eed46cdc242252f",
}
PIPELINE_REFERENCE = {  # make_train_iterator, 3 batches of 4
    "random_resized_crop(32, scale=(0.5, 1.0))|flip_lr|normalize('imagenet')|keep('image', 'label')": "c991363a3dcfcac1",
    "flip_lr|normalize('half')": "016f549c9d7b644b",
}
_SAME_LIBS = (PIL.__version__, np.__version__) == ("13.0.0", "2.4.6")


def _example(h, w, seed):
    g = np.random.default_rng(seed)
    return {"image": g.integers(0, 256, (h, w, 3), dtype=np.uint8), "label": seed % 7,
            "caption": "a red square left of a star"}


def _digest(out, rng):
    h = hashlib.sha256()
    for k in sorted(out):
        v = out[k]
        h.update(k.encode())
        if isinstance(v, np.ndarray):
            h.update(str(v.dtype).encode())
            h.update(str(v.shape).encode())
            h.update(np.ascontiguousarray(v).tobytes())
        else:
            h.update(repr(v).encode())
    h.update(str(int(rng.integers(2**62))).encode())
    return h.hexdigest()[:16]


@pytest.mark.skipif(not _SAME_LIBS, reason="reference digests were computed with Pillow 13.0.0 / NumPy 2.4.6")
@pytest.mark.parametrize("pp", sorted(REFERENCE))
def test_plain_pipelines_are_unchanged(pp):
    t = tr.parse(pp)
    parts = []
    for seed in range(4):
        for hw in ((40, 48), (33, 29)):
            rng = np.random.default_rng((seed, 17))
            parts.append(_digest(t(_example(*hw, seed), rng), rng))
    assert hashlib.sha256("".join(parts).encode()).hexdigest()[:16] == REFERENCE[pp]


@pytest.mark.skipif(not _SAME_LIBS, reason="reference digests were computed with Pillow 13.0.0 / NumPy 2.4.6")
@pytest.mark.parametrize("pp", sorted(PIPELINE_REFERENCE))
def test_plain_train_iterator_is_unchanged(pp):
    src = [{"image": np.random.default_rng(i).integers(0, 256, (40, 44, 3), dtype=np.uint8), "label": i % 7}
           for i in range(8)]
    it = pl.make_train_iterator(src, global_batch_size=4, transform=pp, seed=3, process_index=0,
                                process_count=1, read_threads=1)
    h = hashlib.sha256()
    for _ in range(3):
        batch = next(it)
        for k in sorted(batch):
            h.update(k.encode())
            h.update(np.asarray(batch[k]).tobytes())
    assert h.hexdigest()[:16] == PIPELINE_REFERENCE[pp]


def test_keys_do_not_change_the_draws_or_the_image():
    """With keys=, the image and the rng stream are those of the plain op."""
    ex = _example(40, 48, 1)
    ex["masks"] = np.zeros((2, 40, 48), np.uint8)
    for plain, joint in [("random_resized_crop(24, scale=(0.3, 1.0))", "random_resized_crop(24, scale=(0.3, 1.0), keys=('image', 'masks'))"),
                         ("flip_lr", "flip_lr(keys=('image', 'masks'))"),
                         ("resize(20)", "resize(20, keys=('image', 'masks'))"),
                         ("center_crop(44)", "center_crop(44, keys=('image', 'masks'))")]:
        for seed in range(6):
            r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
            a, b = tr.parse(plain)(ex, r1), tr.parse(joint)(ex, r2)
            np.testing.assert_array_equal(a["image"], b["image"])
            assert r1.integers(2**62) == r2.integers(2**62)


# -- alignment -------------------------------------------------------------------------------

H, W = 60, 80
RECT = (12, 18, 34, 52)  # y0, x0, y1, x1 (exclusive) of a filled rectangle


def _scene():
    y0, x0, y1, x1 = RECT
    image = np.zeros((H, W, 3), np.uint8)
    image[y0:y1, x0:x1] = (255, 200, 100)
    masks = np.zeros((2, H, W), np.uint8)
    masks[0, y0:y1, x0:x1] = 1
    masks[1] = 1 - masks[0]
    boxes = np.array([[x0, y0, x1, y1], [0, 0, W, H], [70, 2, 78, 6]], np.float32)
    # pixel centres: well inside the rectangle, and in the background
    points = np.array([[x0 + 4.5, y0 + 4.5], [x1 - 4.5, y1 - 4.5], [x0 + 15.5, y0 + 10.5], [5.5, 55.5]], np.float32)
    return {"image": image, "masks": masks, "boxes": boxes, "points": points, "label": 3}


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _check_aligned(out, exact: bool):
    image, masks, boxes, points = out["image"], out["masks"], out["boxes"], out["points"]
    th, tw = image.shape[:2]
    assert masks.shape == (2, th, tw) and masks.dtype == np.uint8
    assert np.isin(masks, (0, 1)).all() and not (masks[0] & masks[1]).any()  # nearest: labels stay labels
    lit = image[..., 0] > 127
    if exact:
        np.testing.assert_array_equal(lit, masks[0].astype(bool))
    else:  # bicubic image: agree away from the rectangle's edges
        edge = np.zeros_like(lit)
        m = masks[0].astype(bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                edge |= np.roll(np.roll(m, dy, 0), dx, 1) != m
        assert (lit == m)[~edge].all()
    if masks[0].any():
        # The box of the rectangle bounds the mask's pixels: each mask pixel's centre lies in
        # the box, so the edges agree within half an output pixel.
        np.testing.assert_allclose(_bbox(masks[0]), boxes[0], atol=0.5 + 1e-3)
    else:
        assert boxes[0, 0] == boxes[0, 2] or boxes[0, 1] == boxes[0, 3]  # cropped away: empty
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= tw).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= th).all()
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
    for i, (x, y) in enumerate(points):
        if 0 <= x < tw and 0 <= y < th:
            assert masks[0, int(y), int(x)] == (1 if i < 3 else 0), (i, x, y)
    return masks[0].any()


@pytest.mark.parametrize("interp,exact", [("nearest", True), ("bicubic", False), ("bilinear", False)])
def test_crop_and_flip_keep_masks_boxes_points_aligned(interp, exact):
    keys = "('image', 'masks', 'boxes', 'points')"
    t = tr.parse(f"random_resized_crop((40, 48), scale=(0.2, 1.0), interpolation='{interp}', keys={keys})"
                 f"|flip_lr(keys={keys})|keep('image', 'masks', 'boxes', 'points', '_aug/crop', '_aug/flip')")
    flips, visible = set(), 0
    for seed in range(60):
        out = t(_scene(), np.random.default_rng(seed))
        visible += _check_aligned(out, exact)
        flips.add(bool(out["_aug/flip"]))
        top, left, h, w = out["_aug/crop"]
        assert out["_aug/crop"].dtype == np.int32 and 0 <= top < top + h <= H and 0 <= left < left + w <= W
    assert flips == {True, False} and visible > 30


def test_boxes_and_points_follow_the_documented_maps():
    ex = _scene()
    rng = np.random.default_rng(4)
    out = tr.parse("random_resized_crop(30, keys=('image', 'boxes', 'points'))|flip_lr(1.0, keys=('image', 'boxes', 'points'))"
                   "|keep('boxes', 'points', '_aug/crop')")(ex, rng)
    top, left, h, w = out["_aug/crop"]
    sx, sy = 30 / w, 30 / h
    x = (ex["points"][:, 0] - left) * sx
    y = (ex["points"][:, 1] - top) * sy
    np.testing.assert_allclose(out["points"], np.stack([30 - x, y], -1), rtol=1e-5, atol=1e-4)
    b = ex["boxes"]
    x0, x1 = np.clip((b[:, 0] - left) * sx, 0, 30), np.clip((b[:, 2] - left) * sx, 0, 30)
    y0, y1 = np.clip((b[:, 1] - top) * sy, 0, 30), np.clip((b[:, 3] - top) * sy, 0, 30)
    np.testing.assert_allclose(out["boxes"], np.stack([30 - x1, y0, 30 - x0, y1], -1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("pp", ["resize((30, 40), interpolation='nearest', keys={k})",
                                "resize(45, interpolation='nearest', keys={k})",
                                "center_crop(40, keys={k})", "center_crop((70, 90), keys={k})",
                                "center_crop((50, 96), keys={k})|resize(24, interpolation='nearest', keys={k})"])
def test_deterministic_geometric_ops_keep_alignment(pp):
    k = "('image', 'masks', 'boxes', 'points')"
    out = tr.parse(pp.format(k=k))(_scene(), np.random.default_rng(0))
    assert _check_aligned(out, exact=True)


def test_replay_ops_match_the_joint_ops():
    keys = ("image", "masks", "boxes", "points")
    joint = tr.parse(f"random_resized_crop(32, keys={keys})|flip_lr(keys={keys})")
    replay = tr.parse("random_resized_crop(32)|apply_crop(32, keys=('masks', 'boxes', 'points'))"
                      "|flip_lr|apply_flip_lr(keys=('masks', 'boxes', 'points'))")
    for seed in range(10):
        a, b = joint(_scene(), np.random.default_rng(seed)), replay(_scene(), np.random.default_rng(seed))
        assert set(a) == set(b) == set(_scene())  # _aug/* dropped at the end of the pp string
        for key in keys:
            np.testing.assert_array_equal(a[key], b[key])
    # apply_crop on an image key, with a custom record name
    two = tr.parse("random_resized_crop(16, outkey='view', aug='view_crop')|apply_crop(16, keys=('masks',), "
                   "interpolation='nearest', aug='view_crop')|keep('view', 'masks', '_aug/view_crop')")
    out = two(_scene(), np.random.default_rng(1))
    assert out["masks"].shape == (2, 16, 16) and set(out) == {"view", "masks", "_aug/view_crop"}


def test_aug_records_live_until_the_end_of_the_pipeline():
    seen = {}

    class Spy(tr.Transform):
        def __call__(self, example, rng):
            seen.update({k: v for k, v in example.items() if k.startswith("_aug/")})
            return example

    t = tr.Compose([tr.random_resized_crop(16), tr.flip_lr(), Spy()])
    out = t(_scene(), np.random.default_rng(0))
    assert set(seen) == {"_aug/crop", "_aug/flip"} and not any(k.startswith("_aug/") for k in out)
    assert set(tr.parse("flip_lr|keep('image')")(_scene(), np.random.default_rng(0))) == {"image"}
    kept = tr.parse("flip_lr|keep('image', '_aug/flip')")(_scene(), np.random.default_rng(0))
    assert set(kept) == {"image", "_aug/flip"} and kept["_aug/flip"].dtype == np.bool_
    # a single op called on its own returns its record (callers that do this see it)
    assert "_aug/flip" in tr.flip_lr()(_scene(), np.random.default_rng(0))
    # grounding-style use: an op reads the record (swap 'left'/'right' when flipped)
    class swap_sides(tr.Transform):  # noqa: N801
        def __call__(self, example, rng):
            if not example["_aug/flip"]:
                return example
            words = {"left": "right", "right": "left"}
            return {**example, "caption": " ".join(words.get(w, w) for w in example["caption"].split())}
    t = tr.Compose([tr.flip_lr(1.0), swap_sides()])
    assert t({**_scene(), "caption": "a square left of a star"}, np.random.default_rng(0))["caption"] == \
        "a square right of a star"


def test_key_kinds_and_layouts():
    assert geometry.parse_keys(("image", "masks", "gt_boxes", "prompt_points", "seg:mask", "depth:image")) == (
        ("image", "image"), ("masks", "mask"), ("gt_boxes", "box"), ("prompt_points", "point"),
        ("seg", "mask"), ("depth", "image"))
    with pytest.raises(ValueError, match="unknown kind 'polygon'"):
        geometry.parse_keys(("a:polygon",))
    # 2-D masks, bool and int32 labels, float masks; extra leading dims on boxes / points
    ex = {"image": np.zeros((20, 30, 3), np.uint8), "seg": np.arange(600, dtype=np.int32).reshape(20, 30),
          "valid_mask": np.ones((20, 30), bool), "soft_mask": np.full((1, 20, 30), 0.25, np.float32),
          "boxes": np.zeros((2, 3, 4), np.float32), "points": np.zeros((5, 2), np.float32)}
    keys = "('image', 'seg:mask', 'valid_mask', 'soft_mask', 'boxes', 'points')"
    out = tr.parse(f"random_resized_crop(10, keys={keys})|flip_lr(1.0, keys={keys})")(ex, np.random.default_rng(0))
    assert out["seg"].shape == (10, 10) and out["seg"].dtype == np.int32
    assert np.isin(out["seg"], ex["seg"]).all()            # nearest: only source labels
    assert out["valid_mask"].dtype == bool and out["valid_mask"].all()
    assert out["soft_mask"].shape == (1, 10, 10) and np.allclose(out["soft_mask"], 0.25)
    assert out["boxes"].shape == (2, 3, 4) and out["points"].shape == (5, 2)


def test_joint_errors_are_one_line():
    ex = _scene()
    ex["masks"] = ex["masks"][:, :50]
    with pytest.raises(ValueError) as excinfo:
        tr.parse("random_resized_crop(16, keys=('image', 'masks'))")(ex, np.random.default_rng(0))
    assert "\n" not in str(excinfo.value) and "'masks' is 50x80 but the reference image is 60x80" in str(excinfo.value)
    with pytest.raises(KeyError, match="no '_aug/crop' in the example"):
        tr.parse("keep('image', 'masks')|apply_crop(16, keys=('masks',))")(_scene(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="keys= .* or outkey=, not both"):
        tr.parse("flip_lr(keys=('image', 'masks'), outkey='x')")
    with pytest.raises(ValueError, match=r"boxes need shape \[..., 4\]"):
        tr.parse("flip_lr(1.0, keys=('image', 'boxes'))")({**_scene(), "boxes": np.zeros((3, 5))},
                                                        np.random.default_rng(0))
    with pytest.raises(KeyError, match="missing key 'points'"):
        tr.parse("flip_lr(keys=('image', 'points'))")({"image": _scene()["image"]}, np.random.default_rng(0))


def test_joint_ops_pickle():
    t = tr.parse("random_resized_crop(16, keys=('image', 'masks', 'boxes'))|flip_lr(keys=('image', 'masks', 'boxes'))"
                 "|apply_flip_lr(keys=('points',))|center_crop(12, keys=('image', 'masks'))")
    clone = pickle.loads(pickle.dumps(t))
    a, b = t(_scene(), np.random.default_rng(5)), clone(_scene(), np.random.default_rng(5))
    for k in ("image", "masks", "boxes", "points"):
        np.testing.assert_array_equal(a[k], b[k])
