"""SAM's input as pp ops: ``resize_longest(S)`` (the longer side to S, as
``segment_anything``'s ``ResizeLongestSide``), then ``normalize``, then ``pad_to(S)`` (zero
padding at the bottom and right). Both take ``keys=`` like the geometric ops of
``fmjax.data.transforms`` (masks follow the image; boxes and points are scaled by
``resize_longest`` and kept by ``pad_to``)."""
import numpy as np

from fmjax.data import geometry
from fmjax.data.registry import register_op
from fmjax.data.transforms import ImageOp, Size, _hw, _Joint, resize


@register_op
class resize_longest(resize):  # noqa: N801
    """Resizes so the longer side is ``size`` (aspect kept; the shorter side rounded as SAM's
    ``ResizeLongestSide.get_preprocess_shape``: ``int(side * size / longer + 0.5)``). ``keys=``:
    masks / boxes / points with the image. SAM's input is this, ``normalize``, then ``pad_to``."""

    def __init__(self, size: int, interpolation: str = "bilinear", key="image", outkey=None, *, keys=None):
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"resize_longest: size must be a positive int, got {size!r}")
        super().__init__(size, interpolation, key, outkey, keys=keys)

    def _target_hw(self, hw):
        h, w = hw
        scale = self.size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)


@register_op
class pad_to(_Joint, ImageOp):  # noqa: N801
    """Zero-pads at the bottom and right to ``size`` (an int: square, or ``(h, w)``), as SAM pads
    its normalised input (so put it after ``normalize``: the padding is the mean colour).
    ``keys=``: masks are padded alike, boxes and points keep their coordinates. A side already
    longer than ``size`` is an error (resize first)."""

    def __init__(self, size: Size, key="image", outkey=None, *, keys=None):
        super().__init__(key, outkey)
        self.size = _hw(size)
        self._init_keys(keys, outkey)

    def _pad(self, value, kind):
        th, tw = self.size
        h, w = geometry.spatial_hw(value, kind)
        if h > th or w > tw:
            raise ValueError(f"pad_to{self.size}: the {kind} is {h}x{w}, larger; resize it first "
                             "(e.g. resize_longest)")
        if kind == "image":
            return np.pad(value, ((0, th - h), (0, tw - w)) + ((0, 0),) * (value.ndim - 2))
        return np.pad(value, ((0, 0),) * (value.ndim - 2) + ((0, th - h), (0, tw - w)))

    def apply(self, image, rng):
        return self._pad(image, "image")

    def __call__(self, example, rng):
        if self.keys is None:
            return super().__call__(example, rng)
        self._frame(example)
        out = dict(example)
        for k, kind in self.keys:
            if kind in ("image", "mask"):
                out[k] = self._pad(np.asarray(example[k]), kind)
        return out
