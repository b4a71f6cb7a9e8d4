"""BEiT's relative position bias for a ViT with a class token, through the attention
injection point (``fmjax.models.inject``).

microsoft/unilm beit (and SimMIM's ``models/vision_transformer.py``, the same code): a table of
``(2 Wh - 1)(2 Ww - 1) + 3`` rows x heads, indexed by the relative (dy, dx) of two patch tokens,
plus three rows for class-to-token, token-to-class and class-to-class; the bias
``table[index]`` (heads, N + 1, N + 1) is added to the attention logits (after the
``1 / sqrt(d)`` scale). ``use_shared_rel_pos_bias`` keeps one table for every block
(``RelativePositionBias``), ``use_rel_pos_bias`` one per block (``Attention``). Tables start at 0.

``ViT(rel_pos_bias='shared' | 'per_layer')`` uses this: 'shared' stores the table as the ViT's
``rel_pos_bias_table`` param; 'per_layer' as ``.../attn/rel_pos_bias_table`` on every
attention module (under ``scan_layers`` one stacked param with the layer axis).
"""
from __future__ import annotations

import functools
from typing import Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fmjax.models import inject, layers

MODES = ("none", "shared", "per_layer")


def num_relative_distance(grid: Tuple[int, int]) -> int:
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


@functools.lru_cache(maxsize=32)
def relative_position_index(grid: Tuple[int, int]) -> np.ndarray:
    """(N + 1, N + 1) int32 rows of the table (BEiT's ``relative_position_index``)."""
    wh, ww = grid
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0).copy()   # N, N, 2
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    n, num = wh * ww, num_relative_distance(grid)
    index = np.zeros((n + 1, n + 1), np.int32)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num - 3
    index[0:, 0] = num - 2
    index[0, 0] = num - 1
    return index


def bias_from_table(table: jnp.ndarray, grid: Tuple[int, int]) -> jnp.ndarray:
    """(num_relative_distance, heads) -> (heads, N + 1, N + 1) float32."""
    index = relative_position_index(tuple(grid))
    return jnp.transpose(table.astype(jnp.float32)[index], (2, 0, 1))


def make_table(module: nn.Module, grid: Tuple[int, int], num_heads: int, dtype=jnp.float32):
    return module.param("rel_pos_bias_table", layers.part(nn.initializers.zeros, (None, "heads")),
                        (num_relative_distance(grid), num_heads), dtype)


def hook(grid: Tuple[int, int], num_heads: int, table=None, param_dtype=jnp.float32):
    """An attention hook adding the relative position bias: ``table`` (shared, a param of the
    caller) or, with ``table=None``, a ``rel_pos_bias_table`` param on each attention module."""
    n_tokens = grid[0] * grid[1] + 1

    def add_bias(module, inputs, call_next):
        if inputs.q.shape[1] != n_tokens or inputs.k.shape[1] != n_tokens:
            raise ValueError(f"rel_pos_bias: the attention sees {inputs.q.shape[1]} tokens, the table is for a "
                             f"{grid[0]}x{grid[1]} grid plus the class token ({n_tokens}); registers and "
                             "other input sizes are not supported with a relative position bias.")
        t = table if table is not None else make_table(module, grid, num_heads, param_dtype)
        bias = bias_from_table(t, grid)[None]
        if inputs.bias is not None:
            bias = bias + inputs.bias
        return call_next(inputs._replace(bias=bias))
    return inject.hooks(attention=add_bias)
