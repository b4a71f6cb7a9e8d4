"""Masks for masked image modelling, drawn per example in the data pipeline as the references
draw them in their data loaders.

``simmim_mask``: microsoft/SimMIM ``data/data_simmim.py`` ``MaskGenerator``: ``ceil(ratio * T)``
of the ``T = (input_size / mask_patch_size)^2`` mask patches, drawn without replacement, each
then covering ``(mask_patch_size / model_patch_size)^2`` model patches.
"""
import math

import numpy as np

from fmjax.data.registry import register_op
from fmjax.data.transform_base import Transform


@register_op
class simmim_mask(Transform):  # noqa: N801
    """Writes ``outkey`` (default ``mask``): int32 [input_size / model_patch_size]^2, 1 = masked
    (SimMIM's ``MaskGenerator(input_size, mask_patch_size, model_patch_size, mask_ratio)``)."""

    def __init__(self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6, outkey: str = "mask"):
        input_size, mask_patch_size, model_patch_size = int(input_size), int(mask_patch_size), int(model_patch_size)
        if input_size % mask_patch_size or mask_patch_size % model_patch_size:
            raise ValueError(f"simmim_mask: input_size={input_size} must be a multiple of mask_patch_size="
                             f"{mask_patch_size}, and that of model_patch_size={model_patch_size}.")
        if not 0.0 <= float(mask_ratio) <= 1.0:
            raise ValueError(f"simmim_mask: mask_ratio={mask_ratio} must be in [0, 1].")
        self.rand_size = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size ** 2
        self.mask_count = int(math.ceil(self.token_count * float(mask_ratio)))
        self.outkey = outkey

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros(self.token_count, np.int32)
        mask[rng.permutation(self.token_count)[:self.mask_count]] = 1
        mask = mask.reshape(self.rand_size, self.rand_size)
        return mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)

    def __call__(self, example, rng):
        out = dict(example)
        out[self.outkey] = self.draw(rng)
        return out
