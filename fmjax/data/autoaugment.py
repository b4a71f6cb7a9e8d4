"""RandAugment and random erasing as pp ops, after timm (the fine-tuning recipes of DeiT and
MAE: ``auto_augment='rand-m9-mstd0.5-inc1'``, ``re_prob=0.25, re_mode='pixel'``).

Followed (read, not run; timm and torchvision are not dependencies):
huggingface/pytorch-image-models at commit 066e490605ba1d3666861096163246c885603469,
``timm/data/auto_augment.py`` (``rand_augment_transform``, ``RandAugment``, ``AugmentOp``,
the ``*_level_to_arg`` functions and the PIL ops), ``timm/data/random_erasing.py``
(``RandomErasing``) and the ``aa_params`` of ``timm/data/transforms_factory.py``
(``translate_const=int(0.45 * size)``, ``img_mean`` = the normalisation mean in uint8, the
run's interpolation; DeiT and MAE pass ``'bicubic'``).

``randaugment(num_ops=2, magnitude=9)`` == timm ``rand-m9-mstd0.5-inc1`` with bicubic
resampling and the ImageNet-mean fill: ``num_ops`` ops drawn uniformly with replacement from
the 15 below, each applied with probability ``prob`` 0.5 at a magnitude ~ N(magnitude,
``magnitude_std``) clipped to [0, ``magnitude_max`` 10], scaled as timm does (``increasing``
selects timm's ``_RAND_INCREASING_TRANSFORMS``, where every op gets stronger with the
magnitude):

  AutoContrast, Equalize, Invert            (no magnitude)
  Rotate       +-30 * m/10 degrees           Posterize  keep 4 - int(4 m/10) bits (inc)
  Solarize     threshold 256 - int(256 m/10) (inc)       SolarizeAdd  +int(110 m/10) below 128
  Color, Contrast, Brightness, Sharpness     factor 1 +- 0.9 m/10, at least 0.1 (inc)
  ShearX/Y     +-0.3 m/10                    TranslateX/YRel  +-0.45 m/10 of the width/height

``+-`` is a fair coin. Randomness comes from the example's ``np.random.Generator`` (never
Python's ``random``), drawn in timm's order: the op indices, then per op the probability
coin, the magnitude and the sign; so a pipeline stays reproducible and resumable.
Differences from timm: ``inc0`` in a config string means not increasing (timm's
``bool('0')`` is True); the weighted op choice (``w0``) is not supported.
RandAugment moves only ``key``: its Rotate / Shear / Translate do not follow masks or
boxes, so leave it out of joint (``keys=``) pipelines.

``random_erasing(p=0.25)``: timm ``RandomErasing(0.25, mode='pixel')`` on the normalised
float image (put it after ``normalize``): with probability ``p``, ``count`` rectangles of
area fraction U(0.02, 1/3) / count and log-uniform aspect ratio in (0.3, 1/0.3), up to 10
tries each, filled with N(0, 1) noise per pixel ('pixel'), per channel ('rand') or zeros
('const').
"""
import math
import re
from typing import Sequence, Tuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from fmjax.data.color_ops import enhance_contrast
from fmjax.data.registry import register_op
from fmjax.data.transforms import _check_uint8, _from_pil, _resample, _to_pil, ImageOp

_LEVEL_DENOM = 10.0
IMAGENET_FILL = tuple(min(255, round(255 * x)) for x in (0.485, 0.456, 0.406))  # (124, 116, 104)


def _negate(v, rng):
    """timm ``_randomly_negate``: ``-v if random() > 0.5 else v``."""
    return -v if rng.random() > 0.5 else v


# Level (magnitude in [0, magnitude_max]) -> op argument, as timm's *_level_to_arg.
def _rotate_arg(m, rng, hp):
    return (_negate(m / _LEVEL_DENOM * 30.0, rng),)


def _enhance_arg(m, rng, hp):
    return (m / _LEVEL_DENOM * 1.8 + 0.1,)


def _enhance_increasing_arg(m, rng, hp):
    return (max(0.1, 1.0 + _negate(m / _LEVEL_DENOM * 0.9, rng)),)


def _shear_arg(m, rng, hp):
    return (_negate(m / _LEVEL_DENOM * 0.3, rng),)


def _translate_rel_arg(m, rng, hp):
    return (_negate(m / _LEVEL_DENOM * hp["translate_pct"], rng),)


def _posterize_arg(m, rng, hp):
    return (int(m / _LEVEL_DENOM * 4),)


def _posterize_increasing_arg(m, rng, hp):
    return (4 - int(m / _LEVEL_DENOM * 4),)


def _solarize_arg(m, rng, hp):
    return (int(m / _LEVEL_DENOM * 256),)


def _solarize_increasing_arg(m, rng, hp):
    return (256 - int(m / _LEVEL_DENOM * 256),)


def _solarize_add_arg(m, rng, hp):
    return (int(m / _LEVEL_DENOM * 110),)


# The PIL ops (timm's, with the fill colour and resampling passed explicitly).
def _auto_contrast(img, kw):
    return ImageOps.autocontrast(img)


def _equalize(img, kw):
    return ImageOps.equalize(img)


def _invert(img, kw):
    return ImageOps.invert(img)


def _rotate(img, kw, degrees):
    return img.rotate(degrees, resample=kw["resample"], fillcolor=kw["fill"])


def _affine(img, kw, coeffs):
    return img.transform(img.size, Image.AFFINE, coeffs, resample=kw["resample"], fillcolor=kw["fill"])


def _shear_x(img, kw, factor):
    return _affine(img, kw, (1, factor, 0, 0, 1, 0))


def _shear_y(img, kw, factor):
    return _affine(img, kw, (1, 0, 0, factor, 1, 0))


def _translate_x_rel(img, kw, pct):
    return _affine(img, kw, (1, 0, pct * img.size[0], 0, 1, 0))


def _translate_y_rel(img, kw, pct):
    return _affine(img, kw, (1, 0, 0, 0, 1, pct * img.size[1]))


def _posterize(img, kw, bits):
    return img if bits >= 8 else ImageOps.posterize(img, bits)


def _solarize(img, kw, thresh):
    return ImageOps.solarize(img, thresh)


def _solarize_add(img, kw, add, thresh=128):
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    if img.mode not in ("L", "RGB"):
        return img
    return img.point(lut * 3 if img.mode == "RGB" else lut)


def _enhance(cls):
    return lambda img, kw, factor: cls(img).enhance(factor)


def _contrast(img, kw, factor):
    return enhance_contrast(img, factor)


# timm name -> (level function or None, PIL op); GEOMETRIC ops also take the resampling filter
OPS = {
    "AutoContrast": (None, _auto_contrast),
    "Equalize": (None, _equalize),
    "Invert": (None, _invert),
    "Rotate": (_rotate_arg, _rotate),
    "Posterize": (_posterize_arg, _posterize),
    "PosterizeIncreasing": (_posterize_increasing_arg, _posterize),
    "Solarize": (_solarize_arg, _solarize),
    "SolarizeIncreasing": (_solarize_increasing_arg, _solarize),
    "SolarizeAdd": (_solarize_add_arg, _solarize_add),
    "Color": (_enhance_arg, _enhance(ImageEnhance.Color)),
    "ColorIncreasing": (_enhance_increasing_arg, _enhance(ImageEnhance.Color)),
    "Contrast": (_enhance_arg, _contrast),   # = ImageEnhance.Contrast, bit for bit
    "ContrastIncreasing": (_enhance_increasing_arg, _contrast),
    "Brightness": (_enhance_arg, _enhance(ImageEnhance.Brightness)),
    "BrightnessIncreasing": (_enhance_increasing_arg, _enhance(ImageEnhance.Brightness)),
    "Sharpness": (_enhance_arg, _enhance(ImageEnhance.Sharpness)),
    "SharpnessIncreasing": (_enhance_increasing_arg, _enhance(ImageEnhance.Sharpness)),
    "ShearX": (_shear_arg, _shear_x),
    "ShearY": (_shear_arg, _shear_y),
    "TranslateXRel": (_translate_rel_arg, _translate_x_rel),
    "TranslateYRel": (_translate_rel_arg, _translate_y_rel),
}
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def parse_timm_config(config: str) -> dict:
    """``'rand-m9-mstd0.5-inc1'`` -> randaugment keyword arguments (timm's sections m, n,
    mstd, mmax, inc; 'mstd' above 100 means uniform in [0, m])."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaugment config {config!r} must start with 'rand-' (e.g. 'rand-m9-mstd0.5-inc1')")
    kw = {}
    for part in parts[1:]:
        cs = re.split(r"(\d.*)", part)
        if len(cs) < 2:
            continue
        key, val = cs[:2]
        if key == "m":
            kw["magnitude"] = int(val)
        elif key == "n":
            kw["num_ops"] = int(val)
        elif key == "mstd":
            kw["magnitude_std"] = float("inf") if float(val) > 100 else float(val)
        elif key == "mmax":
            kw["magnitude_max"] = int(val)
        elif key == "inc":
            kw["increasing"] = bool(int(val))
        else:
            raise ValueError(f"randaugment config {config!r}: section {part!r} is not supported "
                             "(valid: m, n, mstd, mmax, inc)")
    return kw


@register_op
class randaugment(ImageOp):  # noqa: N801 (op names are lowercase, as in the pp strings)
    """timm RandAugment on a uint8 image (see the module docstring); ``config`` takes a timm
    string instead (``randaugment(config='rand-m9-mstd0.5-inc1')``)."""

    def __init__(self, num_ops: int = 2, magnitude: float = 9, magnitude_std: float = 0.5,
                 increasing: bool = True, prob: float = 0.5, magnitude_max: float = 10,
                 interpolation: str = "bicubic", fill: Sequence[int] = IMAGENET_FILL,
                 translate_pct: float = 0.45, config: str = None, key: str = "image", outkey: str = None):
        super().__init__(key, outkey)
        if config is not None:
            parsed = parse_timm_config(config)
            num_ops = parsed.get("num_ops", 2)
            magnitude = parsed.get("magnitude", _LEVEL_DENOM)
            magnitude_std = parsed.get("magnitude_std", 0.0)
            magnitude_max = parsed.get("magnitude_max", _LEVEL_DENOM)
            increasing = parsed.get("increasing", False)
        self.num_ops, self.magnitude = int(num_ops), float(magnitude)
        self.magnitude_std, self.magnitude_max = float(magnitude_std), float(magnitude_max)
        self.increasing, self.prob = bool(increasing), float(prob)
        if self.num_ops < 0 or self.magnitude < 0 or self.magnitude_std < 0 or not 0 <= self.prob <= 1:
            raise ValueError(f"randaugment: need num_ops, magnitude, magnitude_std >= 0 and prob in [0, 1], "
                             f"got {num_ops}, {magnitude}, {magnitude_std}, {prob}")
        if interpolation != "random":
            _resample(interpolation)
        self.interpolation = interpolation
        self.fill = tuple(int(f) for f in fill)
        self.translate_pct = float(translate_pct)
        self.config = config

    @property
    def names(self) -> Tuple[str, ...]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS

    def sample(self, rng: np.random.Generator):
        """The ops to apply, drawn in timm's order: ``[(name, args, resample)]``; an op the
        probability coin skips is ``(name, None, None)``."""
        names = self.names
        chosen = rng.integers(0, len(names), size=self.num_ops)
        hp = {"translate_pct": self.translate_pct}
        plan = []
        for i in chosen:
            name = names[int(i)]
            if self.prob < 1.0 and rng.random() > self.prob:
                plan.append((name, None, None))
                continue
            m = self.magnitude
            if self.magnitude_std == float("inf"):
                m = rng.uniform(0, m)
            elif self.magnitude_std > 0:
                m = rng.normal(m, self.magnitude_std)
            m = max(0.0, min(float(m), self.magnitude_max or _LEVEL_DENOM))
            level_fn, _ = OPS[name]
            args = level_fn(m, rng, hp) if level_fn is not None else ()
            resample = None
            if name in GEOMETRIC:
                resample = (_resample(self.interpolation) if self.interpolation != "random"
                            else (Image.BILINEAR, Image.BICUBIC)[int(rng.integers(2))])
            plan.append((name, args, resample))
        return plan

    def apply(self, image, rng):
        image = _check_uint8(image)
        plan = self.sample(rng)
        if all(args is None for _, args, _ in plan):
            return image
        img = _to_pil(image)
        fill = self.fill if img.mode == "RGB" else int(round(sum(self.fill) / len(self.fill)))
        for name, args, resample in plan:
            if args is not None:
                img = OPS[name][1](img, {"resample": resample, "fill": fill}, *args)
        return _from_pil(img, image)


@register_op
class random_erasing(ImageOp):  # noqa: N801
    """timm ``RandomErasing`` on a float image (after ``normalize``); see the module docstring."""

    def __init__(self, p: float = 0.25, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, max_aspect: float = None, mode: str = "pixel",
                 count: int = 1, key: str = "image", outkey: str = None):
        super().__init__(key, outkey)
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"random_erasing: mode must be 'pixel', 'rand' or 'const', got {mode!r}")
        self.p, self.min_area, self.max_area = float(p), float(min_area), float(max_area)
        self.min_aspect = float(min_aspect)
        self.max_aspect = float(max_aspect or 1 / min_aspect)
        self.mode, self.count = mode, int(count)

    def apply(self, image, rng):
        image = np.asarray(image)
        if image.dtype.kind != "f":
            raise TypeError(f"random_erasing expects a float image, got {image.dtype} (put it after normalize)")
        if rng.random() > self.p:
            return image
        out = image.copy()
        img_h, img_w = image.shape[:2]
        chan = image.shape[2:]
        area = img_h * img_w
        count = int(rng.integers(1, self.count + 1)) if self.count > 1 else self.count
        log_ratio = (math.log(self.min_aspect), math.log(self.max_aspect))
        for _ in range(count):
            for _attempt in range(10):
                target_area = rng.uniform(self.min_area, self.max_area) * area / count
                aspect = math.exp(rng.uniform(*log_ratio))
                h = int(round(math.sqrt(target_area * aspect)))
                w = int(round(math.sqrt(target_area / aspect)))
                if w < img_w and h < img_h:
                    top = int(rng.integers(0, img_h - h + 1))
                    left = int(rng.integers(0, img_w - w + 1))
                    if self.mode == "pixel":
                        fill = rng.standard_normal((h, w) + chan)
                    elif self.mode == "rand":
                        fill = rng.standard_normal((1, 1) + chan)
                    else:
                        fill = 0.0
                    out[top:top + h, left:left + w] = fill
                    break
        return out
