"""Joint geometric augmentation: the crop / resize / flip of an image applied alike to the
keys that live in its pixel frame (masks, boxes, points), for SAM, detection and grounding.

Key kinds. An entry of an op's ``keys=`` is a key name, optionally followed by its kind
(``'seg:mask'``, ``'gt:box'``); without one the kind comes from the name: a name containing
``mask`` is a mask, ``box`` a box, ``point`` a point, anything else an image.

  image  [H, W] or [H, W, C] uint8, resampled with the op's interpolation (PIL), exactly as
         the op transforms ``image`` alone.
  mask   [H, W] or [..., H, W]: the spatial axes are the LAST two (instance masks [N, H, W],
         as fmjax_shapes' ``masks`` [3, H, W]); bool, integer labels or float. Resampled
         nearest (PIL, the same sampling grid as the image), so labels stay labels.
  box    [..., 4] float32 ``(x0, y0, x1, y1)`` in pixels of the current image, continuous
         coordinates: pixel (row r, column c) covers [c, c + 1) x [r, r + 1), and the whole
         image is the box (0, 0, W, H). A crop clips boxes to the new frame; a box left
         outside becomes empty (x0 == x1 or y0 == y1) and stays, so the count never changes
         (drop boxes of zero area downstream, e.g. with a validity mask).
  point  [..., 2] float32 ``(x, y)``, same coordinates (a pixel's centre is (c + .5, r + .5)).
         Not clipped: a point cropped away lies outside [0, W) x [0, H).

The maps, for a crop box (top, left, h, w) of the source resized to (th, tw):
``x' = (x - left) * tw / w``, ``y' = (y - top) * th / h``; a horizontal flip of an image of
width W: ``x' = W - x`` (boxes swap x0 and x1). PIL samples output pixel centres at the
same map, so a mask resampled here stays aligned with the image.
"""
from typing import Sequence, Tuple

import numpy as np
from PIL import Image

KINDS = ("image", "mask", "box", "point")


def parse_keys(keys) -> Tuple[Tuple[str, str], ...]:
    """``('image', 'masks', 'gt:box')`` -> ``(('image', 'image'), ('masks', 'mask'), ('gt', 'box'))``."""
    if isinstance(keys, str):
        keys = (keys,)
    out = []
    for spec in keys:
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"keys entries must be key names, got {spec!r}")
        key, sep, kind = spec.rpartition(":")
        if not sep:
            key, kind = spec, infer_kind(spec)
        elif kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} in keys entry {spec!r}; valid kinds: {', '.join(KINDS)}")
        out.append((key, kind))
    if not out:
        raise ValueError("keys must name at least one key")
    return tuple(out)


def infer_kind(key: str) -> str:
    name = key.lower()
    for word, kind in (("mask", "mask"), ("box", "box"), ("point", "point")):
        if word in name:
            return kind
    return "image"


def spatial_hw(value: np.ndarray, kind: str):
    """(H, W) of an image or mask; None for boxes and points."""
    if kind == "image":
        return tuple(value.shape[:2])
    if kind == "mask":
        if value.ndim < 2:
            raise ValueError(f"a mask needs at least 2 dims [..., H, W], got shape {value.shape}")
        return tuple(value.shape[-2:])
    last, plural = (4, "boxes") if kind == "box" else (2, "points")
    if value.shape[-1:] != (last,):
        raise ValueError(f"{plural} need shape [..., {last}], got {value.shape}")
    return None


def check_frame(example, keys, hw, op: str) -> None:
    """Every image / mask of ``keys`` has spatial size ``hw`` (the reference image's)."""
    for key, kind in keys:
        if key not in example:
            raise KeyError(f"{op}: missing key {key!r}; example has {sorted(example)}")
        got = spatial_hw(np.asarray(example[key]), kind)
        if got is not None and got != tuple(hw):
            raise ValueError(f"{op}: {kind} {key!r} is {got[0]}x{got[1]} but the reference image is "
                             f"{hw[0]}x{hw[1]}; joint ops need one pixel frame")


def _pil_2d(a: np.ndarray):
    """2-D array -> (PIL image, dtype to cast back to) for nearest resampling."""
    if a.dtype == np.bool_ or a.dtype == np.uint8:
        return Image.fromarray(a.astype(np.uint8)), a.dtype
    if a.dtype.kind in "iu":
        if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
            raise ValueError(f"mask values exceed int32 (dtype {a.dtype})")
        return Image.fromarray(a.astype(np.int32), mode="I"), a.dtype
    if a.dtype.kind == "f":
        return Image.fromarray(a.astype(np.float32), mode="F"), a.dtype
    raise TypeError(f"masks must be bool, integer or float, got {a.dtype}")


def resize_mask(mask: np.ndarray, size: Tuple[int, int], box=None) -> np.ndarray:
    """Nearest resampling of the region ``box`` = (left, top, right, bottom) of each [H, W]
    slice of ``mask`` [..., H, W] to ``size`` = (th, tw): the same grid as PIL's image resize."""
    th, tw = size
    lead = mask.shape[:-2]
    flat = mask.reshape((-1,) + mask.shape[-2:])
    out = np.empty((flat.shape[0], th, tw), mask.dtype)
    for i, m in enumerate(flat):
        img, dtype = _pil_2d(m)
        out[i] = np.asarray(img.resize((tw, th), Image.NEAREST, box=box)).astype(dtype)
    return out.reshape(lead + (th, tw))


def _affine(coords: np.ndarray, kind: str, scale, offset, clip=None) -> np.ndarray:
    """``xy' = (xy - offset) * scale`` on the last axis (x, y pairs); boxes clipped to ``clip``
    = (W, H) when given."""
    c = np.asarray(coords, np.float32).copy()
    sx, sy = (np.float32(s) for s in scale)
    ox, oy = (np.float32(o) for o in offset)
    c[..., 0::2] = (c[..., 0::2] - ox) * sx
    c[..., 1::2] = (c[..., 1::2] - oy) * sy
    if kind == "box" and clip is not None:
        c[..., 0::2] = np.clip(c[..., 0::2], 0, clip[0])
        c[..., 1::2] = np.clip(c[..., 1::2], 0, clip[1])
    return c


def crop_resize(value, kind: str, crop, size) -> np.ndarray:
    """The crop ``(top, left, h, w)`` of a mask / box / point value, resized to ``size`` (th, tw)."""
    top, left, h, w = crop
    th, tw = size
    value = np.asarray(value)
    spatial_hw(value, kind)
    if kind == "mask":
        return resize_mask(value, (th, tw), box=(left, top, left + w, top + h))
    if kind in ("box", "point"):
        return _affine(value, kind, (tw / w, th / h), (left, top), clip=(tw, th))
    raise ValueError(f"crop_resize: unsupported kind {kind!r}")


def window(value, kind: str, top: int, left: int, th: int, tw: int) -> np.ndarray:
    """The ``th x tw`` window at (top, left) of a mask / box / point value; the window may
    reach outside the frame (zero padding, as ``center_crop``)."""
    value = np.asarray(value)
    spatial_hw(value, kind)
    if kind == "mask":
        h, w = value.shape[-2:]
        pt, pl = max(-top, 0), max(-left, 0)
        pb, pr = max(top + th - h, 0), max(left + tw - w, 0)
        if pt or pl or pb or pr:
            value = np.pad(value, [(0, 0)] * (value.ndim - 2) + [(pt, pb), (pl, pr)])
        t, l_ = top + pt, left + pl
        return value[..., t:t + th, l_:l_ + tw]
    if kind in ("box", "point"):
        return _affine(value, kind, (1.0, 1.0), (left, top), clip=(tw, th))
    raise ValueError(f"window: unsupported kind {kind!r}")


def flip_lr(value, kind: str, width: int) -> np.ndarray:
    """Horizontal flip of a mask / box / point value in a frame ``width`` pixels wide."""
    value = np.asarray(value)
    spatial_hw(value, kind)
    if kind == "mask":
        return np.ascontiguousarray(value[..., ::-1])
    c = np.asarray(value, np.float32).copy()
    w = np.float32(width)
    if kind == "box":
        x0, x1 = c[..., 0].copy(), c[..., 2].copy()
        c[..., 0], c[..., 2] = w - x1, w - x0
    elif kind == "point":
        c[..., 0] = w - c[..., 0]
    else:
        raise ValueError(f"flip_lr: unsupported kind {kind!r}")
    return c


def resized_hw(hw: Sequence[int], size) -> Tuple[int, int]:
    """``resize``'s output size: an int sets the shorter side (aspect kept), a pair is exact."""
    h, w = hw
    if isinstance(size, (int, np.integer)):
        s = int(size)
        return (s, max(1, int(s * w / h))) if h <= w else (max(1, int(s * h / w)), s)
    th, tw = size
    return int(th), int(tw)
