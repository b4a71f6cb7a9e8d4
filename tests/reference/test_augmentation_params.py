"""Sampled augmentation parameters of ``fmjax/data/transforms.py`` against the references.

References (read, not run: torchvision is not installed here):
  - facebookresearch/dino at commit 7c446df5b9f45747937fb0d72314eb9f7b66930a,
    main_dino.py ``DataAugmentationDINO`` (global crops 224px with ``global_crops_scale``
    default (0.4, 1.), local crops 96px with (0.05, 0.4), bicubic; flip p 0.5,
    ``RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)``, ``RandomGrayscale(p=0.2)``;
    ``GaussianBlur(1.0)`` on global 1, ``GaussianBlur(0.1)`` + ``Solarization(0.2)`` on
    global 2, ``GaussianBlur(p=0.5)`` on locals) and utils.py ``GaussianBlur`` (radius
    ``random.uniform(0.1, 2.)``) / ``Solarization`` (``ImageOps.solarize``, threshold 128).
  - pytorch/vision at commit 6247d96d3ce658d553e4e2ceea5cedd77f715b29,
    torchvision/transforms/transforms.py ``RandomResizedCrop.get_params`` (10 tries,
    area * U(scale), exp(U(log ratio)), ``int(round(sqrt(...)))``, ``randint`` offsets,
    then the central crop clipped to ``ratio``; transcribed to NumPy below) and
    ``ColorJitter`` (factors U[max(0, 1 - b), 1 + b], hue U[-h, h], order ``randperm(4)``).

Every op is driven by a recording wrapper around ``np.random.Generator`` so the draws
each op makes (coin, factor, box) are read off directly; where cheap the effect on a
tiny image is checked too (flip, grayscale, solarize). Frequencies are asserted within
5 standard errors over 20000 draws; sampled ranges inside the reference range and within
2e-3 (relative to the range) of both ends. Crop distributions are compared with a
two-sample Kolmogorov-Smirnov statistic (threshold 0.03; the 0.1% critical value at
n = m = 20000 is 0.0195) and a deliberately wrong variant (uniform rather than log-uniform
aspect ratio) is shown to exceed it.
"""
import math
import os
import sys

import numpy as np
import pytest

from fmjax.data import color_ops
from fmjax.data import transforms as T

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 20000
KS_THRESHOLD = 0.03


class Recorder:
    """Wraps a Generator and logs every draw as ``(method, args, result)``."""

    def __init__(self, seed):
        self.g = np.random.default_rng(seed)
        self.log = []

    def _rec(self, name, args, out):
        self.log.append((name, args, out))
        return out

    def random(self, *a):
        return self._rec("random", a, self.g.random(*a))

    def uniform(self, *a):
        return self._rec("uniform", a, self.g.uniform(*a))

    def integers(self, *a):
        return self._rec("integers", a, self.g.integers(*a))

    def permutation(self, *a):
        return self._rec("permutation", a, self.g.permutation(*a))

    def pop(self):
        out, self.log = self.log, []
        return out


def _dino_multi_crop():
    """The multi_crop op of the paper preset's pp string (configs/dino.py)."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import importlib
    c = importlib.import_module("configs.dino").get_config("vit_s16_imagenet")
    comp = T.parse(c.data.pp_train)
    mc = [t for t in comp.transforms if isinstance(t, color_ops.multi_crop)]
    assert len(mc) == 1, c.data.pp_train
    return mc[0]


def _freq_ok(k, n, p, nse=5.0):
    se = math.sqrt(p * (1 - p) / n) if 0 < p < 1 else 0.0
    return abs(k / n - p) <= nse * se + 1e-12


def _range_ok(x, lo, hi, tol=2e-3):
    x = np.asarray(x)
    eps = tol * (hi - lo)
    return lo <= x.min() <= lo + eps and hi - eps <= x.max() <= hi


def _ks(a, b):
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    ca = np.searchsorted(a, grid, side="right") / len(a)
    cb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(ca - cb).max())


# --------------------------------------------------------------------------- DINO config

def test_dino_preset_crop_sizes_scales_and_op_chain():
    mc = _dino_multi_crop()
    assert mc.num_local == 10
    g, l = mc.crop_global, mc.crop_local
    assert (T._hw(g.size), g.scale, g.interpolation) == ((224, 224), (0.4, 1.0), "bicubic")
    assert (T._hw(l.size), l.scale, l.interpolation) == ((96, 96), (0.05, 0.4), "bicubic")
    assert g.ratio == l.ratio == (3 / 4, 4 / 3)

    def chain(ops):
        return [(type(o).__name__, getattr(o, "p", None)) for o in ops]

    common = [("flip_lr", 0.5), ("color_jitter", 0.8), ("grayscale", 0.2)]
    assert chain(mc.global1) == common + [("gaussian_blur", 1.0), ("normalize", None)]
    assert chain(mc.global2) == common + [("gaussian_blur", 0.1), ("solarize", 0.2),
                                          ("normalize", None)]
    assert chain(mc.local) == common + [("gaussian_blur", 0.5), ("normalize", None)]
    for ops in (mc.global1, mc.global2, mc.local):
        cj = ops[1]
        assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == (0.4, 0.4, 0.2, 0.1)
        assert ops[3].sigma == (0.1, 2.0)          # 224px global crops: the reference radius
        assert ops[-1].mean == T.NORMALIZE_PRESETS["imagenet"][0]
    assert mc.global2[4].threshold == 128          # PIL ImageOps.solarize default


def _img(h=4, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


@pytest.mark.parametrize("view", ["global1", "global2", "local"])
def test_dino_per_view_frequencies_and_ranges(view):
    mc = _dino_multi_crop()
    ops = {type(o).__name__: o for o in getattr(mc, view)}
    expect_blur = {"global1": 1.0, "global2": 0.1, "local": 0.5}[view]
    rec = Recorder({"global1": 1, "global2": 2, "local": 3}[view])
    img = _img()
    img[0, 0] = (200, 10, 60)                        # solarize always changes this pixel

    flips = jit = gray = blur = sol = 0
    factors = {i: [] for i in range(4)}
    first = np.zeros(4, int)
    radii = []
    for _ in range(N):
        out = ops["flip_lr"].apply(img, rec)
        rec.pop()
        flips += bool(np.array_equal(out, img[:, ::-1]))

        ops["color_jitter"].apply(img, rec)
        log = rec.pop()
        assert log[0][0] == "random"
        if len(log) > 1:
            jit += 1
            assert log[1][0] == "permutation" and log[1][1] == (4,)
            order = list(log[1][2])
            first[order[0]] += 1
            draws = [e for e in log[2:]]
            assert [e[0] for e in draws] == ["uniform"] * 4
            for i, (_, args, val) in zip(order, draws):
                factors[i].append(val)
                assert args == {0: (0.6, 1.4), 1: (0.6, 1.4), 2: (0.8, 1.2),
                                3: (-0.1, 0.1)}[i]

        out = ops["grayscale"].apply(img, rec)
        rec.pop()
        g = bool(np.all(out == out[..., :1]))
        gray += g

        ops["gaussian_blur"].apply(img, rec)
        log = rec.pop()
        if len(log) > 1:
            blur += 1
            assert log[1][0] == "uniform" and log[1][1] == (0.1, 2.0)
            radii.append(log[1][2])

        if "solarize" in ops:
            out = ops["solarize"].apply(img, rec)
            rec.pop()
            if not np.array_equal(out, img):
                sol += 1
                np.testing.assert_array_equal(out, np.where(img >= 128, 255 - img, img))

    assert _freq_ok(flips, N, 0.5), flips / N
    assert _freq_ok(jit, N, 0.8), jit / N
    assert _freq_ok(gray, N, 0.2), gray / N
    assert _freq_ok(blur, N, expect_blur), blur / N
    assert _freq_ok(sol, N, 0.2 if view == "global2" else 0.0), sol / N
    assert "solarize" in ops if view == "global2" else "solarize" not in ops
    for i in range(4):                               # randperm(4): each op first w.p. 1/4
        assert _freq_ok(first[i], jit, 0.25), first / jit
    for i, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        f = np.asarray(factors[i])
        assert len(f) == jit
        assert _range_ok(f, lo, hi), (i, f.min(), f.max())
        assert abs(f.mean() - (lo + hi) / 2) < 5 * (hi - lo) / math.sqrt(12 * len(f))
        assert _ks(f, np.random.default_rng(10 + i).uniform(lo, hi, len(f))) < KS_THRESHOLD
    if radii:
        r = np.asarray(radii)
        if len(r) > 1000:
            assert _range_ok(r, 0.1, 2.0), (r.min(), r.max())
        else:                                          # global2: ~2000 draws of p 0.1
            assert 0.1 <= r.min() < 0.11 and 1.99 < r.max() <= 2.0
        assert _ks(r, np.random.default_rng(20).uniform(0.1, 2.0, len(r))) < max(
            KS_THRESHOLD, 2.0 / math.sqrt(len(r)))


def test_dino_multi_crop_end_to_end_draw_sequence():
    """One call of multi_crop draws, per view and in the reference's order, one crop
    (scale range of that view), flip, jitter, grayscale, blur (and solarize on global 2)."""
    mc = _dino_multi_crop()
    mc.num_local = 2                                  # keep the resizes cheap
    rec = Recorder(7)
    image = np.random.default_rng(8).integers(0, 256, (40, 48, 3)).astype(np.uint8)
    for _ in range(5):
        out = mc({"image": image}, rec)
        assert out["global_crops"].shape == (2, 224, 224, 3)
        assert out["local_crops"].shape == (2, 96, 96, 3)
        log = rec.pop()
        views = _split_views(log)
        assert [v[0] for v in views] == [(0.4, 1.0), (0.4, 1.0), (0.05, 0.4), (0.05, 0.4)]
        # coins after each crop: flip, jitter, grayscale, blur (+ solarize on global 2)
        assert [v[1] for v in views] == [4, 5, 4, 4], views
        assert views[0][2] == 1                        # global 1 blurs with p 1.0


def _split_views(log):
    """Splits one multi_crop call's draw log into views: ``(scale range, number of
    coins, number of blur radius draws)``."""
    scales = ((0.4, 1.0), (0.05, 0.4))
    views, k = [], 0
    while k < len(log):
        name, args, _ = log[k]
        assert name == "uniform" and args in scales, log[k]
        scale = args
        while k < len(log) and log[k][0] == "uniform" and log[k][1] in (scale,) + (
                (math.log(3 / 4), math.log(4 / 3)),):
            k += 1
        if k < len(log) and log[k][0] == "integers":
            k += 2
        coins = blurs = 0
        while k < len(log) and not (log[k][0] == "uniform" and log[k][1] in scales):
            coins += log[k][0] == "random"
            blurs += log[k][0] == "uniform" and log[k][1] == (0.1, 2.0)
            k += 1
        views.append((scale, coins, blurs))
    return views


# --------------------------------------------------------------------------- RandomResizedCrop

def torchvision_rrc_get_params(height, width, scale, ratio, rng, log_uniform=True):
    """NumPy transcription of torchvision RandomResizedCrop.get_params (commit above).
    Returns ``(i, j, h, w, fell_back)``. ``log_uniform=False`` is a deliberately wrong
    variant (aspect ratio uniform on ``ratio``)."""
    area = height * width
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        if log_uniform:
            log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
            aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        else:
            aspect_ratio = rng.uniform(ratio[0], ratio[1])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w, False
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w, True


def _fmjax_boxes(op, height, width, seed):
    rec = Recorder(seed)
    out = []
    for _ in range(N):
        i, j, h, w = op.get_params(height, width, rec)
        fell_back = not any(e[0] == "integers" for e in rec.pop())
        out.append((i, j, h, w, fell_back))
    return np.asarray(out, dtype=float)


def _ref_boxes(height, width, scale, ratio, seed, log_uniform=True):
    rng = np.random.default_rng(seed)
    return np.asarray([torchvision_rrc_get_params(height, width, scale, ratio, rng, log_uniform)
                       for _ in range(N)], dtype=float)


def _stats(boxes, height, width):
    i, j, h, w, fb = boxes.T
    return dict(area=h * w / (height * width), log_aspect=np.log(w / h),
                top=(i + h / 2) / height, left=(j + w / 2) / width, fallback=fb.mean())


CASES = [  # (height, width, scale): MAE at 224, DeiT/supervised default, small, elongated
    (224, 224, (0.2, 1.0)),
    (224, 224, (0.08, 1.0)),
    (32, 32, (0.2, 1.0)),
    (64, 320, (0.2, 1.0)),     # in_ratio 5 > 4/3: frequent fallback to the clipped centre
    (300, 60, (0.4, 1.0)),     # in_ratio 0.2 < 3/4
]


@pytest.mark.parametrize("height,width,scale", CASES)
def test_random_resized_crop_matches_torchvision(height, width, scale):
    ratio = (3 / 4, 4 / 3)
    op = T.random_resized_crop(8, scale=scale, ratio=ratio)
    fm = _stats(_fmjax_boxes(op, height, width, seed=100 + height), height, width)
    ref = _stats(_ref_boxes(height, width, scale, ratio, seed=200 + height), height, width)
    for k in ("area", "log_aspect", "top", "left"):
        d = _ks(fm[k], ref[k])
        assert d < KS_THRESHOLD, (k, d)
    p = ref["fallback"]
    se = math.sqrt(max(p * (1 - p), 1e-4) / N)
    assert abs(fm["fallback"] - p) < 5 * math.sqrt(2) * se + 1e-12, (fm["fallback"], p)
    # ranges: non-fallback areas inside the scale range up to pixel rounding, aspect in ratio
    boxes = _fmjax_boxes(op, height, width, seed=300 + height)
    i, j, h, w, fb = boxes.T
    ok = fb == 0
    assert np.all(i >= 0) and np.all(j >= 0) and np.all(i + h <= height) and np.all(j + w <= width)
    if ok.any():
        la = np.log(w[ok] / h[ok])
        slack = 2.0 / min(h[ok].min(), w[ok].min())   # rounding of h and w to integers
        assert la.min() >= math.log(3 / 4) - slack and la.max() <= math.log(4 / 3) + slack
    if (height, width) == (224, 224):
        a = h[ok] * w[ok] / (height * width)
        assert scale[0] - 0.01 < a.min() < scale[0] + 0.01 and a.max() > 0.99
        assert fb.mean() == 0 or fb.mean() < 1e-3


def test_random_resized_crop_fallback_box_matches_torchvision():
    ratio = (3 / 4, 4 / 3)
    for height, width in ((64, 320), (300, 60), (50, 50), (10, 1000)):
        # scale > 1 can never fit: every call takes the fallback
        op = T.random_resized_crop(8, scale=(5.0, 6.0), ratio=ratio)
        rec = Recorder(0)
        got = op.get_params(height, width, rec)
        want = torchvision_rrc_get_params(height, width, (5.0, 6.0), ratio,
                                          np.random.default_rng(0))
        assert want[4] and tuple(got) == want[:4], (height, width, got, want)
        assert [e[0] for e in rec.pop()] == ["uniform"] * 20   # 10 tries, 2 draws each


def test_ks_check_rejects_uniform_aspect_ratio_variant():
    """The KS check has power: a uniform (not log-uniform) ratio is caught."""
    height, width, scale, ratio = 224, 224, (0.2, 1.0), (3 / 4, 4 / 3)
    op = T.random_resized_crop(8, scale=scale, ratio=ratio)
    fm = _stats(_fmjax_boxes(op, height, width, seed=11), height, width)
    wrong = _stats(_ref_boxes(height, width, scale, ratio, seed=12, log_uniform=False),
                   height, width)
    right = _stats(_ref_boxes(height, width, scale, ratio, seed=13), height, width)
    assert _ks(fm["log_aspect"], right["log_aspect"]) < KS_THRESHOLD
    assert _ks(fm["log_aspect"], wrong["log_aspect"]) > 1.5 * KS_THRESHOLD
    assert _ks(right["log_aspect"], wrong["log_aspect"]) > 1.5 * KS_THRESHOLD
