"""pp ops for the bundled `fmjax_shapes` data (fmjax/data/shapes.py)."""
from __future__ import annotations

import numpy as np

from fmjax.data.registry import register_op
from fmjax.data.transform_base import Transform


@register_op
class silhouette(Transform):  # noqa: N801
    """Replaces ``key`` by object ``index``'s instance mask as a white-on-black uint8 RGB image
    (``masks`` is fmjax_shapes' (3, R, R) visible-instance masks; index 0 is the main object,
    the one the label names). A simpler variant of the shapes in which colour, luminance and
    background say nothing: configs/dino.py:cpu uses it (see its docstring)."""

    def __init__(self, index: int = 0, key: str = "image", masks_key: str = "masks",
                 outkey=None):
        self.index, self.key, self.masks_key = int(index), key, masks_key
        self.outkey = outkey or key

    def __call__(self, example, rng):
        if self.masks_key not in example:
            raise ValueError(f"silhouette: the example has no {self.masks_key!r} (fmjax_shapes "
                             f"data has it; keys: {sorted(example)})")
        masks = np.asarray(example[self.masks_key])
        if masks.ndim != 3 or not 0 <= self.index < masks.shape[0]:
            raise ValueError(f"silhouette: index {self.index} needs masks of shape (N > index, H, W), "
                             f"got {masks.shape}")
        white = (masks[self.index] > 0).astype(np.uint8) * 255
        out = dict(example)
        out[self.outkey] = np.repeat(white[..., None], 3, axis=-1)
        return out
