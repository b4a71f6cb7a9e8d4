"""Host-side per-example transforms (NumPy/PIL) and a big_vision-style parser.

Every transform is a small picklable class called as
``transform(example: dict, rng: np.random.Generator) -> dict``; the output
depends only on the example and the rng, so pipelines are reproducible.
Image ops read ``key`` (default ``'image'``, uint8 HWC) and write ``outkey``
(default: same key), so several views of one image can be made
(``random_resized_crop(96, outkey='local0')``). Pixel-level ops
(``color_jitter``, ``grayscale``, ``gaussian_blur``, ``solarize``) expect
uint8 images, so put them before ``normalize``.

``parse("random_resized_crop(64, scale=(0.2, 1.0))|flip_lr|normalize('imagenet')")``
builds a :class:`Compose` from a string; arguments are Python literals read
with ``ast.literal_eval`` (never ``eval``). The caption ops (``tokenize``,
``swap_words``) live in ``fmjax.data.text_ops`` and are re-exported here.
"""
import ast
import math
from typing import Callable, Dict, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from fmjax.data.text_ops import swap_words, tokenize
from fmjax.errors import ConfigError
from fmjax.data.transform_base import Example, Transform

Size = Union[int, Sequence[int]]

NORMALIZE_PRESETS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073),
             (0.26862954, 0.26130258, 0.27577711)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),   # to [-1, 1] (diffusion)
}
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


class resize(ImageOp):  # noqa: N801 (op names are lowercase, as in the pp strings)
    """Resizes like torchvision ``Resize``: an int sets the shorter side
    (aspect ratio kept), an ``(h, w)`` pair sets the exact size."""

    def __init__(self, size: Size, interpolation: str = "bicubic", key="image", outkey=None):
        super().__init__(key, outkey)
        self.size = size
        self.interpolation = interpolation
        _resample(interpolation)

    def apply(self, image, rng):
        h, w = image.shape[:2]
        if isinstance(self.size, (int, np.integer)):
            s = int(self.size)
            th, tw = (s, max(1, int(s * w / h))) if h <= w else (max(1, int(s * h / w)), s)
        else:
            th, tw = _hw(self.size)
        if (th, tw) == (h, w):
            return image
        img = _to_pil(image).resize((tw, th), _resample(self.interpolation))
        return _from_pil(img, image)


class center_crop(ImageOp):  # noqa: N801
    """Central crop to ``size`` (int or ``(h, w)``), zero-padding if the image
    is smaller, as torchvision ``CenterCrop``."""

    def __init__(self, size: Size, key="image", outkey=None):
        super().__init__(key, outkey)
        self.size = size

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


class random_resized_crop(ImageOp):  # noqa: N801
    """torchvision ``RandomResizedCrop``: up to 10 tries at a crop with area
    fraction in ``scale`` and log-uniform aspect ratio in ``ratio``, else the
    central crop clipped to ``ratio``; then resize to ``size``."""

    def __init__(self, size: Size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 interpolation: str = "bicubic", key="image", outkey=None):
        super().__init__(key, outkey)
        self.size = size
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.interpolation = interpolation
        _resample(interpolation)

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

    def apply(self, image, rng):
        top, left, h, w = self.get_params(image.shape[0], image.shape[1], rng)
        th, tw = _hw(self.size)
        img = _to_pil(image).resize(
            (tw, th), _resample(self.interpolation), box=(left, top, left + w, top + h))
        return _from_pil(img, image)


class flip_lr(RandomImageOp):  # noqa: N801
    """Horizontal flip with probability ``p``."""

    def __init__(self, p: float = 0.5, key="image", outkey=None):
        super().__init__(p, key, outkey)

    def apply_always(self, image, rng):
        return np.ascontiguousarray(image[:, ::-1])


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

    def apply(self, image, rng):
        x = image.astype(np.float32) / np.float32(255.0)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


class keep(Transform):  # noqa: N801
    """Keeps only the given keys."""

    def __init__(self, *keys: str):
        self.keys = keys

    def __call__(self, example, rng):
        missing = [k for k in self.keys if k not in example]
        if missing:
            raise KeyError(f"keep: missing keys {missing}; example has {sorted(example)}")
        return {k: example[k] for k in self.keys}


class color_jitter(RandomImageOp):  # noqa: N801
    """torchvision ``ColorJitter`` (random order of brightness, contrast,
    saturation, hue), applied with probability ``p``."""

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p: float = 0.8,
                 key="image", outkey=None):
        super().__init__(p, key, outkey)
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.saturation, self.hue = float(saturation), float(hue)

    def apply_always(self, image, rng):
        img = _to_pil(image)
        rgb = img.mode == "RGB"
        for i in rng.permutation(4):
            if i == 0 and self.brightness > 0:
                f = rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness)
                img = ImageEnhance.Brightness(img).enhance(f)
            elif i == 1 and self.contrast > 0:
                f = rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast)
                img = ImageEnhance.Contrast(img).enhance(f)
            elif i == 2 and self.saturation > 0 and rgb:
                f = rng.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation)
                img = ImageEnhance.Color(img).enhance(f)
            elif i == 3 and self.hue > 0 and rgb:
                f = rng.uniform(-self.hue, self.hue)
                h, s, v = img.convert("HSV").split()
                np_h = np.asarray(h, np.uint8) + np.uint8(int(f * 255) % 256)
                img = Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")
        return _from_pil(img, image)


class grayscale(RandomImageOp):  # noqa: N801
    """With probability ``p``, replaces the image by its luma, keeping the
    channel count."""

    def __init__(self, p: float = 0.2, key="image", outkey=None):
        super().__init__(p, key, outkey)

    def apply_always(self, image, rng):
        gray = np.asarray(_to_pil(image).convert("L"))
        channels = image.shape[-1] if image.ndim == 3 else 0
        return np.repeat(gray[..., None], channels, axis=-1) if channels else gray


class gaussian_blur(RandomImageOp):  # noqa: N801
    """With probability ``p``, PIL Gaussian blur with radius ~ U(sigma)."""

    def __init__(self, p: float = 0.5, sigma=(0.1, 2.0), key="image", outkey=None):
        super().__init__(p, key, outkey)
        self.sigma = tuple(sigma)

    def apply_always(self, image, rng):
        radius = rng.uniform(self.sigma[0], self.sigma[1])
        return _from_pil(_to_pil(image).filter(ImageFilter.GaussianBlur(radius=radius)), image)


class solarize(RandomImageOp):  # noqa: N801
    """With probability ``p``, inverts pixels ``>= threshold``."""

    def __init__(self, p: float = 0.2, threshold: int = 128, key="image", outkey=None):
        super().__init__(p, key, outkey)
        self.threshold = int(threshold)

    def apply_always(self, image, rng):
        image = _check_uint8(image)
        return np.where(image >= self.threshold, 255 - image, image).astype(image.dtype)


class Compose(Transform):
    """Applies transforms in order with the same rng; picklable."""

    def __init__(self, transforms: Sequence[Callable], spec: str = None):
        self.transforms = list(transforms)
        self.spec = spec

    def __call__(self, example, rng):
        for t in self.transforms:
            example = t(example, rng)
        return example

    def __repr__(self):
        return f"Compose({self.spec!r})" if self.spec is not None else f"Compose({self.transforms!r})"


class multi_crop(Transform):  # noqa: N801
    """DINO's ``DataAugmentationDINO``: 2 global crops and ``num_local`` local crops of
    ``key``, stacked as ``global_crops`` [2, G, G, C] and ``local_crops`` [N, L, L, C]
    (float32, normalised), so a batch holds one array per resolution.

    Every crop: random resized crop (bicubic), flip, colour jitter (0.4, 0.4, 0.2, 0.1)
    with p 0.8, grayscale p 0.2, Gaussian blur; the blur probability is 1.0 / 0.1 / 0.5 for
    global 1 / global 2 / locals and global 2 is solarised with p 0.2. The blur radius is the
    reference's U(0.1, 2.0) pixels at 224px global crops and shrinks in proportion below that
    (``blur_sigma`` overrides it): a 2-pixel blur erases the shapes of a 32px image.
    """

    def __init__(self, global_size: Size = 224, local_size: Size = 96, num_local: int = 10,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), normalization="imagenet",
                 jitter=(0.4, 0.4, 0.2, 0.1), grayscale_p: float = 0.2, blur_sigma=None,
                 key: str = "image"):
        self.key, self.num_local = key, int(num_local)
        if self.num_local < 0:
            raise ValueError(f"multi_crop: num_local must be >= 0, got {num_local}")
        if blur_sigma is None:
            f = min(1.0, _hw(global_size)[0] / 224)
            blur_sigma = (0.1 * f, 2.0 * f)
        jit = lambda: [flip_lr(0.5), color_jitter(*jitter, p=0.8), grayscale(grayscale_p)]
        norm = normalize(normalization)
        blur = lambda p: gaussian_blur(p, sigma=blur_sigma)
        self.global1 = jit() + [blur(1.0), norm]
        self.global2 = jit() + [blur(0.1), solarize(0.2), norm]
        self.local = jit() + [blur(0.5), norm]
        self.crop_global = random_resized_crop(global_size, scale=global_scale)
        self.crop_local = random_resized_crop(local_size, scale=local_scale)

    @staticmethod
    def _view(image, crop, ops, rng):
        x = crop.apply(image, rng)
        for op in ops:
            x = op.apply(x, rng)
        return x

    def __call__(self, example, rng):
        image = np.asarray(example[self.key])
        out = dict(example)
        out["global_crops"] = np.stack([self._view(image, self.crop_global, self.global1, rng),
                                        self._view(image, self.crop_global, self.global2, rng)])
        if self.num_local:
            out["local_crops"] = np.stack([self._view(image, self.crop_local, self.local, rng)
                                           for _ in range(self.num_local)])
        return out


OPS: Dict[str, type] = {
    cls.__name__: cls for cls in (
        resize, center_crop, random_resized_crop, flip_lr, normalize, keep,
        color_jitter, grayscale, gaussian_blur, solarize, tokenize, swap_words, multi_crop)
}


def _split_top_level(pp: str) -> list:
    """Splits on ``|`` outside brackets and string literals."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in pp:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _parse_op(spec: str) -> Transform:
    """``name`` or ``name(literal args...)`` -> transform instance."""
    try:
        node = ast.parse(spec, mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"cannot parse op {spec!r}: {e.msg}") from None
    if isinstance(node, ast.Name):
        name, args, kwargs = node.id, [], {}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except ValueError:
            raise ValueError(f"op {spec!r}: arguments must be Python literals") from None
        if any(k is None for k in kwargs):
            raise ValueError(f"op {spec!r}: **kwargs are not supported")
    else:
        raise ValueError(f"cannot parse op {spec!r}: expected name or name(args)")
    if name not in OPS:
        raise ValueError(f"unknown op {name!r} in {spec!r}; valid ops: {', '.join(sorted(OPS))}")
    try:
        return OPS[name](*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for op {spec!r}: {e}") from None


def parse(pp: str) -> Compose:
    """Parses a ``|``-separated op string into a :class:`Compose`.

    An empty string gives the identity transform.
    """
    return Compose([_parse_op(s) for s in _split_top_level(pp)], spec=pp)


def parse_pp(pp: str, key: str):
    """``parse(pp)``; a bad op or argument is a one-line ConfigError naming ``key``."""
    try:
        return parse(pp)
    except (ValueError, TypeError, SyntaxError) as e:
        raise ConfigError(f"{key}: {e}") from None
