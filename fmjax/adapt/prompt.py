"""VPT-deep (Jia et al. 2022, "Visual Prompt Tuning"): ``length`` learned prompt tokens at the
input of every transformer block of a ViT, through the block injection point
(``fmjax.models.inject``).

The prompt slots are the ViT's register tokens (``adapt.prepare_config`` adds ``length`` of
them, as for VPT-shallow): they follow the class (and distillation) token and the model's own
registers, carry no position embedding and are dropped before pooling. Every block whose path
matches ``targets`` (default: the image encoder's blocks) overwrites those slots with its own
``vpt_prompts`` param (1, length, width) before it runs, so block 0 sees the first layer's
prompts (the register values are never used) and each later block discards what the previous
block made of the prompts, exactly VPT-deep's ``incorporate_deep_prompt``. Init as VPT's:
uniform(-v, v), ``v = sqrt(6 / (3 * patch_h * patch_w + width))``; under ``scan_layers`` the
param is stacked per layer. ``length * width`` params per block.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from fmjax.adapt.lora import module_path, train_dropout
from fmjax.models import core

PARAMS = ("vpt_prompts", "prompt_embed")  # VPT-deep; CoOp (TextTransformer.num_prompts)
DEFAULT_TARGETS = r"(^|/)encoder/block(_\d+|_stack)$"


def init_bound(patch_size: int, width: int) -> float:
    """VPT's ``val = sqrt(6 / (3 * prod(patch_size) + prompt_dim))``."""
    return math.sqrt(6.0 / (3 * patch_size * patch_size + width))


def deep_hook(length: int, targets: str, offset: int, bound: float, dropout: float = 0.0):
    """The block hook: the ``length`` prompt slots after the first ``offset`` tokens take
    the block's own learned prompts (through ``dropout`` in training passes: VPT's
    ``prompt_dropout``)."""
    pattern = re.compile(targets)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    def hook(block, x, call_next):
        if length <= 0 or not pattern.search(module_path(block)):
            return call_next(x)
        if x.shape[1] < offset + length:
            raise ValueError(f"VPT-deep: block {module_path(block)} has {x.shape[1]} tokens, fewer than "
                             f"the {offset} prefix tokens plus {length} prompt slots.")
        width = x.shape[-1]
        p = block.param("vpt_prompts", core.part(init, (None, None, "embed")), (1, length, width),
                        block.param_dtype)
        p = train_dropout(block, jnp.broadcast_to(p.astype(x.dtype), (x.shape[0], length, width)), dropout)
        return call_next(jnp.concatenate([x[:, :offset], p, x[:, offset + length:]], axis=1))
    return hook


def expected_count(blocks: int, length: int, width: int) -> int:
    return blocks * length * width
