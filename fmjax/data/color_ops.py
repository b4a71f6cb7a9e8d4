"""Photometric pp ops (colour jitter, grayscale, Gaussian blur, solarize) and DINO's
multi-crop, which composes them with the geometric ops of ``fmjax.data.transforms``.
All expect uint8 images (put them before ``normalize``); see ``fmjax.data.transforms`` for
the op conventions."""
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from fmjax.data.registry import register_op
from fmjax.data.transform_base import Transform
from fmjax.data.transforms import (RandomImageOp, Size, _check_uint8, _from_pil, _hw, _to_pil,
                                   flip_lr, normalize, random_resized_crop)


@register_op
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
                img = enhance_contrast(img, f)
            elif i == 2 and self.saturation > 0 and rgb:
                f = rng.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation)
                img = ImageEnhance.Color(img).enhance(f)
            elif i == 3 and self.hue > 0 and rgb:
                f = rng.uniform(-self.hue, self.hue)
                h, s, v = img.convert("HSV").split()
                np_h = np.asarray(h, np.uint8) + np.uint8(int(f * 255) % 256)
                img = Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")
        return _from_pil(img, image)


def enhance_contrast(img: Image.Image, factor: float) -> Image.Image:
    """``ImageEnhance.Contrast(img).enhance(factor)``, equal bit for bit, with the luma's mean
    taken by NumPy: ``ImageStat``'s 256-step Python loop over the histogram was a third of
    colour jitter's time on DINO's 16-32 px views. RandAugment's Contrast uses it too. The sum
    of the luma is an exact integer, so ``int(mean + 0.5)`` picks the same grey
    (tests/data/test_transforms.py checks it)."""
    if img.mode not in ("L", "RGB"):
        return ImageEnhance.Contrast(img).enhance(factor)
    luma = img if img.mode == "L" else img.convert("L")
    mean = int(int(np.asarray(luma, np.int64).sum()) / (img.width * img.height) + 0.5)
    grey = Image.new("L", img.size, mean)
    return Image.blend(grey if img.mode == "L" else grey.convert(img.mode), img, factor)


@register_op
class grayscale(RandomImageOp):  # noqa: N801
    """With probability ``p``, replaces the image by its luma, keeping the
    channel count."""

    def __init__(self, p: float = 0.2, key="image", outkey=None):
        super().__init__(p, key, outkey)

    def apply_always(self, image, rng):
        gray = np.asarray(_to_pil(image).convert("L"))
        channels = image.shape[-1] if image.ndim == 3 else 0
        return np.repeat(gray[..., None], channels, axis=-1) if channels else gray


@register_op
class gaussian_blur(RandomImageOp):  # noqa: N801
    """With probability ``p``, PIL Gaussian blur with radius ~ U(sigma)."""

    def __init__(self, p: float = 0.5, sigma=(0.1, 2.0), key="image", outkey=None):
        super().__init__(p, key, outkey)
        self.sigma = tuple(sigma)

    def apply_always(self, image, rng):
        radius = rng.uniform(self.sigma[0], self.sigma[1])
        return _from_pil(_to_pil(image).filter(ImageFilter.GaussianBlur(radius=radius)), image)


@register_op
class solarize(RandomImageOp):  # noqa: N801
    """With probability ``p``, inverts pixels ``>= threshold``."""

    def __init__(self, p: float = 0.2, threshold: int = 128, key="image", outkey=None):
        super().__init__(p, key, outkey)
        self.threshold = int(threshold)

    def apply_always(self, image, rng):
        image = _check_uint8(image)
        return np.where(image >= self.threshold, 255 - image, image).astype(image.dtype)


@register_op
class multi_crop(Transform):  # noqa: N801
    """DINO's ``DataAugmentationDINO``: 2 global crops and ``num_local`` local crops of
    ``key``, stacked as ``global_crops`` [2, G, G, C] and ``local_crops`` [N, L, L, C]
    (float32, normalised), so a batch holds one array per resolution.

    Every crop: random resized crop (bicubic), flip, colour jitter (0.4, 0.4, 0.2, 0.1)
    with p 0.8, grayscale p 0.2, Gaussian blur; the blur probability is 1.0 / 0.1 / 0.5 for
    global 1 / global 2 / locals and global 2 is solarised with p 0.2. The blur radius is the
    reference's U(0.1, 2.0) pixels at 224px global crops and shrinks in proportion below that
    (``blur_sigma`` overrides it): a 2-pixel blur erases the shapes of a 32px image.

    ``rot90=True`` (not in the reference; off by default) turns each view, right after its
    crop, by k * 90 degrees with k ~ U{0, 1, 2, 3}: for images whose label does not change
    under rotation (configs/dino.py:cpu's shapes), it stops the views from sharing the
    object's position and the background's orientation. It needs square crops.
    """

    def __init__(self, global_size: Size = 224, local_size: Size = 96, num_local: int = 10,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), normalization="imagenet",
                 jitter=(0.4, 0.4, 0.2, 0.1), grayscale_p: float = 0.2, blur_sigma=None,
                 rot90: bool = False, key: str = "image"):
        self.key, self.num_local = key, int(num_local)
        if self.num_local < 0:
            raise ValueError(f"multi_crop: num_local must be >= 0, got {num_local}")
        self.rot90 = bool(rot90)
        if self.rot90 and any(_hw(s)[0] != _hw(s)[1] for s in (global_size, local_size)):
            raise ValueError(f"multi_crop: rot90=True needs square crops, got global_size="
                             f"{global_size}, local_size={local_size}")
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

    def _view(self, image, crop, ops, rng):
        x = crop.apply(image, rng)
        if getattr(self, "rot90", False):
            x = np.ascontiguousarray(np.rot90(x, int(rng.integers(4)), axes=(0, 1)))
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


# The two-view recipes of the contrastive / BYOL family: per view, (colour jitter
# (brightness, contrast, saturation, hue) at ``strength`` 1, its probability, grayscale p,
# Gaussian blur p, solarize p). Each view: random resized crop (bicubic), flip 0.5, then these.
TWO_VIEW_RECIPES = {
    # BYOL (deepmind-research/byol augmentations.py) = MoCo v3 (main_moco.py augmentation1/2):
    # blur 1.0 / 0.1, solarize 0 / 0.2, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2.
    "byol": (((0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 1.0, 0.0),
             ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.1, 0.2)),
    # SimCLR (google-research/simclr data_util.py): colour distortion of strength s, jitter
    # (0.8 s, 0.8 s, 0.8 s, 0.2 s) p 0.8, grayscale 0.2, blur 0.5 on both views (ImageNet), no solarize.
    "simclr": (((0.8, 0.8, 0.8, 0.2), 0.8, 0.2, 0.5, 0.0),
               ((0.8, 0.8, 0.8, 0.2), 0.8, 0.2, 0.5, 0.0)),
}


@register_op
class two_views(multi_crop):  # noqa: N801
    """Two augmented views of ``key`` for SimCLR / MoCo / BYOL, stacked as ``global_crops``
    [2, S, S, C] (float32, normalised): the batch layout of ``multi_crop`` without local crops,
    so the objectives and the picture writer share it.

    ``recipe``: ``'byol'`` (= MoCo v3's asymmetric pair) or ``'simclr'`` (``TWO_VIEW_RECIPES``);
    ``strength``: SimCLR's colour-distortion strength s (scales the jitter of either recipe);
    ``scale``: the crop's area range (0.08, 1) in every reference; ``blur_sigma`` as
    ``multi_crop`` (U(0.1, 2.0) px at 224 px, in proportion below); ``rot90`` as ``multi_crop``
    (not in the references: for the rotation-invariant bundled shapes).
    """

    def __init__(self, size: Size = 224, recipe: str = "byol", strength: float = 1.0,
                 scale=(0.08, 1.0), normalization="imagenet", blur_sigma=None, rot90: bool = False,
                 key: str = "image"):
        if recipe not in TWO_VIEW_RECIPES:
            raise ValueError(f"two_views: recipe={recipe!r}; valid: {sorted(TWO_VIEW_RECIPES)}")
        super().__init__(size, size, 0, global_scale=scale, normalization=normalization,
                         blur_sigma=blur_sigma, rot90=rot90, key=key)
        if blur_sigma is None:
            f = min(1.0, _hw(size)[0] / 224)
            blur_sigma = (0.1 * f, 2.0 * f)
        norm = normalize(normalization)
        views = []
        for jitter, jitter_p, gray_p, blur_p, sol_p in TWO_VIEW_RECIPES[recipe]:
            ops = [flip_lr(0.5), color_jitter(*(strength * j for j in jitter), p=jitter_p),
                   grayscale(gray_p), gaussian_blur(blur_p, sigma=blur_sigma)]
            views.append(ops + ([solarize(sol_p)] if sol_p else []) + [norm])
        self.global1, self.global2 = views
        self.recipe, self.strength = recipe, float(strength)
