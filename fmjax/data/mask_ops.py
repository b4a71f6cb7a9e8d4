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
        self.input_size, self.mask_patch_size, self.model_patch_size = input_size, mask_patch_size, model_patch_size
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


@register_op
class beit_mask(Transform):  # noqa: N801
    """BEiT's blockwise masking (microsoft/unilm ``beit/masking_generator.py``
    ``MaskingGenerator``): rectangles of ``min_num_patches``..``max_num_patches`` patches with
    a log-uniform aspect ratio in [min_aspect, 1 / min_aspect] are added until
    ``num_masking_patches`` patches are masked (each rectangle may only add up to what is
    left; 10 attempts per rectangle; the mask stops short when none fits). Writes ``outkey``
    (default ``mask``): int32 [input_size]^2, 1 = masked. Draws from the pipeline's
    ``np.random.Generator`` where the reference uses Python's ``random``."""

    def __init__(self, input_size=14, num_masking_patches: int = 75, min_num_patches: int = 16,
                 max_num_patches=None, min_aspect: float = 0.3, max_aspect=None, outkey: str = "mask"):
        if not isinstance(input_size, (tuple, list)):
            input_size = (input_size,) * 2
        self.height, self.width = int(input_size[0]), int(input_size[1])
        self.num_masking_patches = int(num_masking_patches)
        if not 0 < self.num_masking_patches <= self.height * self.width:
            raise ValueError(f"beit_mask: num_masking_patches={num_masking_patches} must be in "
                             f"(0, {self.height * self.width}].")
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = self.num_masking_patches if max_num_patches is None else int(max_num_patches)
        if min_aspect <= 0:
            raise ValueError(f"beit_mask: min_aspect={min_aspect} must be > 0.")
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.outkey = outkey

    def _mask(self, mask, max_mask_patches, rng):
        delta = 0
        for _ in range(10):
            # random.uniform(a, b) = a + (b - a) * random(), b < a allowed (numpy's uniform refuses it)
            target_area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * rng.random()
            lo, hi = self.log_aspect_ratio
            aspect_ratio = math.exp(lo + (hi - lo) * rng.random())
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))     # random.randint: inclusive
                left = int(rng.integers(0, self.width - w + 1))
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    block = mask[top: top + h, left: left + w]
                    delta += int((block == 0).sum())
                    block[...] = 1
                if delta > 0:
                    break
        return delta

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), np.int32)
        count = 0
        while count < self.num_masking_patches:
            left = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._mask(mask, left, rng)
            if delta == 0:
                break
            count += delta
        return mask

    def __call__(self, example, rng):
        out = dict(example)
        out[self.outkey] = self.draw(rng)
        return out
