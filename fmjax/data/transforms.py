"""Host-side per-example transforms (NumPy/PIL) and a big_vision-style parser.

Every transform is a small picklable class called as
``transform(example: dict, rng: np.random.Generator) -> dict``; the output
depends only on the example and the rng, so pipelines are reproducible.
Image ops read ``key`` (default ``'image'``, uint8 HWC) and write ``outkey``
(default: same key), so several views of one image can be made
(``random_resized_crop(96, outkey='local0')``). Pixel-level ops
(``color_jitter``, ``grayscale``, ``gaussian_blur``, ``solarize``, ``randaugment``)
expect uint8 images, so put them before ``normalize``.

``parse("random_resized_crop(64, scale=(0.2, 1.0))|flip_lr|normalize('imagenet')")``
builds a :class:`Compose` from a string; arguments are Python literals read
with ``ast.literal_eval`` (never ``eval``). Ops are found by name in
``fmjax.data.registry`` (which also splits and builds the op specs; ``@register_op`` adds one from any module; built-in modules
are imported on first use): the caption ops (``tokenize``, ``swap_words``) live in
``fmjax.data.text_ops`` (re-exported here), ``randaugment`` / ``random_erasing`` in
``fmjax.data.autoaugment``, the photometric ops (``color_jitter``, ``grayscale``,
``gaussian_blur``, ``solarize``) and DINO's ``multi_crop`` in ``fmjax.data.color_ops``.

Joint augmentation (SAM, detection, grounding). A random op writes the parameters it
drew into the example under the reserved prefix ``_aug/``: ``random_resized_crop``
writes ``_aug/crop`` = int32 ``(top, left, h, w)`` in pixels of the image it cropped,
``flip_lr`` writes ``_aug/flip`` = bool (``aug='name'`` renames the record to
``_aug/name``, for several crops of one example). Geometric ops take ``keys=`` to apply
the same parameters to several keys, each an image, mask, box or point key
(``fmjax.data.geometry`` has the layouts: masks ``[..., H, W]`` resampled nearest, boxes
``[..., 4]`` xyxy and points ``[..., 2]`` xy in pixels)::

    random_resized_crop(64, keys=('image', 'masks', 'boxes'))|flip_lr(keys=('image', 'masks', 'boxes'))

``apply_crop(size, keys=...)`` / ``apply_flip_lr(keys=...)`` replay a recorded crop /
flip on keys the sampling op did not name, and any op may read ``_aug/*`` (e.g. a
grounding op swapping 'left' and 'right' in a caption when ``_aug/flip`` is set).
Without ``keys=`` every op draws and outputs exactly what it did before records existed.
``_aug/*`` keys are dropped at the end of a pp string (``Compose``) and by ``keep(...)``,
unless ``keep`` names them.
"""
import math
from typing import Callable, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from fmjax.data import geometry
from fmjax.data.registry import (OPS, available_ops, build_op, get_op, has_op,  # noqa: F401 (re-exported)
                                 register_op, split_pp)
from fmjax.data.text_ops import swap_words, tokenize  # noqa: F401 (re-exported)
from fmjax.errors import ConfigError
from fmjax.data.transform_base import Example, Transform

Size = Union[int, Sequence[int]]

NORMALIZE_PRESETS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073),
             (0.26862954, 0.26130258, 0.27577711)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),   # to [-1, 1] (diffusion)
}
AUG_PREFIX = "_aug/"   # reserved: parameters random ops drew (see the module docstring)
# (process index, position in that process's training stream), given to the training pipeline's
# examples when an op of it has ``wants_stream = True`` (e.g. teacher_topk); dropped at the end.
STREAM_KEY = AUG_PREFIX + "stream"
_INTERP = {
    "nearest": Image.NEAREST, "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS,
}


def _hw(size: Size) -> Tuple[int, int]:
    """Returns ``(height, width)`` from an int or a pair."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _resample(interpolation: str) -> int:
    """Maps an interpolation name to a PIL resampling filter."""
    if interpolation not in _INTERP:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {interpolation!r}")
    return _INTERP[interpolation]


def _check_uint8(image: np.ndarray) -> np.ndarray:
    """Raises unless ``image`` is uint8 (pixel ops must precede normalize)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype} (put pixel ops before normalize)")
    return image


def _to_pil(image: np.ndarray) -> Image.Image:
    """uint8 HWC (C in 1, 3) or HW array -> PIL image."""
    image = _check_uint8(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return Image.fromarray(image)


def _from_pil(img: Image.Image, like: np.ndarray) -> np.ndarray:
    """PIL image -> uint8 array with the same channel layout as ``like``."""
    out = np.asarray(img)
    if like.ndim == 3 and out.ndim == 2:
        out = out[..., None]
    return out


class ImageOp(Transform):
    """An op on one image: subclasses implement ``apply(image, rng)``."""

    def __init__(self, key: str = "image", outkey: str = None):
        self.key = key
        self.outkey = outkey or key

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Returns the transformed image."""
        raise NotImplementedError

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        out = dict(example)
        out[self.outkey] = self.apply(np.asarray(example[self.key]), rng)
        return out


class RandomImageOp(ImageOp):
    """An image op applied with probability ``p`` (implement ``apply_always``)."""

    def __init__(self, p: float, key: str = "image", outkey: str = None):
        super().__init__(key, outkey)
        self.p = float(p)

    def apply_always(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Returns the transformed image (called when the coin says so)."""
        raise NotImplementedError

    def apply(self, image, rng):
        if rng.random() < self.p:
            return self.apply_always(image, rng)
        return image


class _Joint:
    """Mixin of the geometric ops: ``keys=`` applies the op alike to several keys (images,
    masks, boxes, points; see ``fmjax.data.geometry``), in place, in the pixel frame of
    ``key``; without it the op reads ``key`` and writes ``outkey`` as every image op does."""

    def _init_keys(self, keys, outkey):
        if keys is not None and outkey not in (None, self.key):
            raise ValueError(f"{type(self).__name__}: give keys= (applied in place) or outkey=, not both")
        self.keys = None if keys is None else geometry.parse_keys(keys)

    def _frame(self, example):
        """(H, W) of the reference key ``self.key``."""
        if self.key not in example:
            raise KeyError(f"{type(self).__name__}: missing key {self.key!r}; example has {sorted(example)}")
        kind = dict(self.keys or ()).get(self.key, "image")
        hw = geometry.spatial_hw(np.asarray(example[self.key]), kind)
        if hw is None:
            raise ValueError(f"{type(self).__name__}: key={self.key!r} must be an image or mask (the pixel frame)")
        if self.keys is not None:
            geometry.check_frame(example, self.keys, hw, type(self).__name__)
        return hw


@register_op
class resize(_Joint, ImageOp):  # noqa: N801 (op names are lowercase, as in the pp strings)
    """Resizes like torchvision ``Resize``: an int sets the shorter side
    (aspect ratio kept), an ``(h, w)`` pair sets the exact size. ``keys=``: resize
    masks / boxes / points with the image."""

    def __init__(self, size: Size, interpolation: str = "bicubic", key="image", outkey=None, *, keys=None):
        super().__init__(key, outkey)
        self.size = size
        self.interpolation = interpolation
        _resample(interpolation)
        self._init_keys(keys, outkey)

    def _target_hw(self, hw):
        return geometry.resized_hw(hw, self.size)

    def apply(self, image, rng):
        h, w = image.shape[:2]
        th, tw = self._target_hw((h, w))
        if (th, tw) == (h, w):
            return image
        img = _to_pil(image).resize((tw, th), _resample(self.interpolation))
        return _from_pil(img, image)

    def __call__(self, example, rng):
        if self.keys is None:
            return super().__call__(example, rng)
        h, w = self._frame(example)
        th, tw = self._target_hw((h, w))
        out = dict(example)
        for k, kind in self.keys:
            v = np.asarray(example[k])
            if kind == "image":
                out[k] = self.apply(v, rng)
            elif (th, tw) != (h, w):
                out[k] = geometry.crop_resize(v, kind, (0, 0, h, w), (th, tw))
        return out


@register_op
class center_crop(_Joint, ImageOp):  # noqa: N801
    """Central crop to ``size`` (int or ``(h, w)``), zero-padding if the image
    is smaller, as torchvision ``CenterCrop``. ``keys=``: crop masks / boxes / points too."""

    def __init__(self, size: Size, key="image", outkey=None, *, keys=None):
        super().__init__(key, outkey)
        self.size = size
        self._init_keys(keys, outkey)

    def _window(self, h, w):
        """(top, left) of the crop in unpadded coordinates (negative where it pads)."""
        th, tw = _hw(self.size)
        ph, pw = max(th - h, 0), max(tw - w, 0)
        top = int(round((h + ph - th) / 2.0)) - ph // 2
        left = int(round((w + pw - tw) / 2.0)) - pw // 2
        return top, left

    def apply(self, image, rng):
        th, tw = _hw(self.size)
        h, w = image.shape[:2]
        if th > h or tw > w:
            ph, pw = max(th - h, 0), max(tw - w, 0)
            pad = [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)] + [(0, 0)] * (image.ndim - 2)
            image = np.pad(image, pad)
            h, w = image.shape[:2]
        top = int(round((h - th) / 2.0))
        left = int(round((w - tw) / 2.0))
        return image[top:top + th, left:left + tw]

    def __call__(self, example, rng):
        if self.keys is None:
            return super().__call__(example, rng)
        h, w = self._frame(example)
        top, left = self._window(h, w)
        th, tw = _hw(self.size)
        out = dict(example)
        for k, kind in self.keys:
            v = np.asarray(example[k])
            out[k] = self.apply(v, rng) if kind == "image" else geometry.window(v, kind, top, left, th, tw)
        return out


@register_op
class random_resized_crop(_Joint, ImageOp):  # noqa: N801
    """torchvision ``RandomResizedCrop``: up to 10 tries at a crop with area
    fraction in ``scale`` and log-uniform aspect ratio in ``ratio``, else the
    central crop clipped to ``ratio``; then resize to ``size``.

    Records the crop as ``_aug/<aug>`` = int32 (top, left, h, w) in pixels of ``key``;
    ``keys=`` crops those keys (images, masks, boxes, points) alike, in place."""

    def __init__(self, size: Size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 interpolation: str = "bicubic", key="image", outkey=None, *, keys=None, aug: str = "crop"):
        super().__init__(key, outkey)
        self.size = size
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.interpolation = interpolation
        _resample(interpolation)
        self._init_keys(keys, outkey)
        self.aug = aug

    def get_params(self, height: int, width: int, rng: np.random.Generator):
        """Returns the crop box ``(top, left, h, w)``."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def crop(self, image, box):
        """The crop ``box`` = (top, left, h, w) of ``image``, resized to ``size``."""
        top, left, h, w = box
        th, tw = _hw(self.size)
        img = _to_pil(image).resize(
            (tw, th), _resample(self.interpolation), box=(left, top, left + w, top + h))
        return _from_pil(img, image)

    def apply(self, image, rng):
        return self.crop(image, self.get_params(image.shape[0], image.shape[1], rng))

    def __call__(self, example, rng):
        h, w = self._frame(example)
        box = self.get_params(h, w, rng)
        out = dict(example)
        out[AUG_PREFIX + self.aug] = np.asarray(box, np.int32)
        for k, kind in self.keys or ((self.key, "image"),):
            v = np.asarray(example[k])
            v = self.crop(v, box) if kind == "image" else geometry.crop_resize(v, kind, box, _hw(self.size))
            out[k if self.keys else self.outkey] = v
        return out


@register_op
class flip_lr(_Joint, RandomImageOp):  # noqa: N801
    """Horizontal flip with probability ``p``. Records ``_aug/<aug>`` = bool (flipped);
    ``keys=`` flips those keys (images, masks, boxes, points) alike, in place."""

    def __init__(self, p: float = 0.5, key="image", outkey=None, *, keys=None, aug: str = "flip"):
        super().__init__(p, key, outkey)
        self._init_keys(keys, outkey)
        self.aug = aug

    def apply_always(self, image, rng):
        return np.ascontiguousarray(image[:, ::-1])

    def __call__(self, example, rng):
        h, w = self._frame(example)
        flip = bool(rng.random() < self.p)
        out = dict(example)
        out[AUG_PREFIX + self.aug] = np.bool_(flip)
        for k, kind in self.keys or ((self.key, "image"),):
            v = np.asarray(example[k])
            if flip:
                v = self.apply_always(v, rng) if kind == "image" else geometry.flip_lr(v, kind, w)
            out[k if self.keys else self.outkey] = v
        return out


def _record(example, aug: str, op: str):
    key = AUG_PREFIX + aug
    if key not in example:
        raise KeyError(f"{op}: no {key!r} in the example; put the op that draws it before {op} "
                       f"(keep(...) drops _aug/* keys it does not name)")
    return example[key]


@register_op
class apply_crop(Transform):  # noqa: N801
    """Replays the crop recorded as ``_aug/<aug>`` (by ``random_resized_crop``) on ``keys``,
    resized to ``size``: e.g. ``random_resized_crop(64)|...|apply_crop(64, keys=('masks',))``."""

    def __init__(self, size: Size, keys=("image",), interpolation: str = "bicubic", aug: str = "crop"):
        self.size = size
        self.keys = geometry.parse_keys(keys)
        self.interpolation = interpolation
        _resample(interpolation)
        self.aug = aug

    def __call__(self, example, rng):
        box = tuple(int(v) for v in np.asarray(_record(example, self.aug, "apply_crop")))
        th, tw = _hw(self.size)
        out = dict(example)
        for k, kind in self.keys:
            v = np.asarray(example[k])
            if kind == "image":
                top, left, h, w = box
                v = _from_pil(_to_pil(v).resize((tw, th), _resample(self.interpolation),
                                                box=(left, top, left + w, top + h)), v)
            else:
                v = geometry.crop_resize(v, kind, box, (th, tw))
            out[k] = v
        return out


@register_op
class apply_flip_lr(Transform):  # noqa: N801
    """Replays the flip recorded as ``_aug/<aug>`` (by ``flip_lr``) on ``keys``; the frame
    width is that of the first image or mask of ``keys``, else of ``key``."""

    def __init__(self, keys=("image",), key: str = "image", aug: str = "flip"):
        self.keys = geometry.parse_keys(keys)
        self.key = key
        self.aug = aug

    def __call__(self, example, rng):
        if not bool(_record(example, self.aug, "apply_flip_lr")):
            return dict(example)
        frames = [(k, kind) for k, kind in self.keys if kind in ("image", "mask")] or [(self.key, "image")]
        ref, kind = frames[0]
        if ref not in example:
            raise KeyError(f"apply_flip_lr: missing key {ref!r} (the frame); example has {sorted(example)}")
        width = geometry.spatial_hw(np.asarray(example[ref]), kind)[1]
        out = dict(example)
        for k, kind in self.keys:
            v = np.asarray(example[k])
            out[k] = np.ascontiguousarray(v[:, ::-1]) if kind == "image" else geometry.flip_lr(v, kind, width)
        return out


@register_op
class normalize(ImageOp):  # noqa: N801
    """uint8 -> float32 ``(x / 255 - mean) / std``; ``mean`` may be a preset
    name ('imagenet', 'clip')."""

    def __init__(self, mean: Union[str, Sequence[float]] = "imagenet", std: Sequence[float] = None,
                 key="image", outkey=None):
        super().__init__(key, outkey)
        if isinstance(mean, str):
            if mean not in NORMALIZE_PRESETS:
                raise ValueError(f"unknown normalize preset {mean!r}; valid: {sorted(NORMALIZE_PRESETS)}")
            mean, std = NORMALIZE_PRESETS[mean]
        if std is None:
            raise ValueError("normalize needs std when mean is not a preset name")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = np.asarray(self.mean, np.float32)  # built once: a view's normalize is
        self._std = np.asarray(self.std, np.float32)    # microseconds on DINO's small crops

    def apply(self, image, rng):
        x = image.astype(np.float32) / np.float32(255.0)
        return (x - self._mean) / self._std


@register_op
class keep(Transform):  # noqa: N801
    """Keeps only the given keys (so ``_aug/*`` records go unless named)."""

    def __init__(self, *keys: str):
        self.keys = keys

    def __call__(self, example, rng):
        missing = [k for k in self.keys if k not in example]
        if missing:
            raise KeyError(f"keep: missing keys {missing}; example has {sorted(example)}")
        return {k: example[k] for k in self.keys}


def _is_aug(key) -> bool:
    return isinstance(key, str) and key.startswith(AUG_PREFIX)


class Compose(Transform):
    """Applies transforms in order with the same rng; picklable. Drops the ``_aug/*``
    records at the end, except those a ``keep(...)`` of the pipeline names."""

    def __init__(self, transforms: Sequence[Callable], spec: str = None):
        self.transforms = list(transforms)
        self.spec = spec
        self.kept_aug = frozenset(k for t in self.transforms if isinstance(t, keep)
                                  for k in t.keys if str(k).startswith(AUG_PREFIX))

    @property
    def wants_stream(self) -> bool:
        """Whether an op reads ``STREAM_KEY`` (the training pipeline then provides it)."""
        return any(getattr(t, "wants_stream", False) for t in self.transforms)

    def __call__(self, example, rng):
        for t in self.transforms:
            example = t(example, rng)
        kept = getattr(self, "kept_aug", frozenset())
        if isinstance(example, dict) and any(_is_aug(k) and k not in kept for k in example):
            example = {k: v for k, v in example.items() if not _is_aug(k) or k in kept}
        return example

    def __repr__(self):
        return f"Compose({self.spec!r})" if self.spec is not None else f"Compose({self.transforms!r})"


def parse(pp: str) -> Compose:
    """Parses a ``|``-separated op string into a :class:`Compose`.

    An empty string gives the identity transform.
    """
    return Compose([build_op(s) for s in split_pp(pp)], spec=pp)


def parse_pp(pp: str, key: str):
    """``parse(pp)``; a bad op or argument is a one-line ConfigError naming ``key``."""
    try:
        return parse(pp)
    except (ValueError, TypeError, SyntaxError) as e:
        raise ConfigError(f"{key}: {e}") from None
