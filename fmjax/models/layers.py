"""Transformer building blocks shared by fmjax's models: a re-export of

- ``fmjax.models.core``: ``constrain``, ``part``, initialisers, ``DenseND`` / ``dense`` (the
  dense projection), ``layer_norm``, ``get_activation``;
- ``fmjax.models.attention``: ``MultiHeadAttention`` (pluggable implementation, logit bias);
- ``fmjax.models.embeddings``: ``patchify`` / ``unpatchify``, ``PatchEmbed``, ``ConvStem``,
  2-D sin-cos position embeddings;
- ``fmjax.models.blocks``: ``Mlp``, ``DropPath``, ``LayerScale``, ``Block``, ``Encoder``.

Hooks that wrap every dense projection or attention: ``fmjax.models.inject``.
"""
from fmjax.models.attention import (  # noqa: F401
    ATTENTION_IMPLS, HEAD_AXES, MultiHeadAttention, _cudnn_attention)
from fmjax.models.blocks import Block, DropPath, Encoder, LayerScale, Mlp  # noqa: F401
from fmjax.models.core import (  # noqa: F401
    ACT_AXES, Conv, DenseND, Dtype, constrain, dense, flat_xavier_uniform, get_activation, layer_norm,
    ones, part, xavier_uniform, zeros)
from fmjax.models.embeddings import (  # noqa: F401
    ConvStem, PatchEmbed, get_1d_sincos_pos_embed_from_grid, get_2d_sincos_pos_embed, patch_grid,
    patchify, unpatchify)

__all__ = [
    "ACT_AXES", "ATTENTION_IMPLS", "HEAD_AXES", "Block", "Conv", "ConvStem", "DenseND", "DropPath",
    "Dtype", "Encoder", "LayerScale", "Mlp", "MultiHeadAttention", "PatchEmbed", "constrain",
    "dense", "flat_xavier_uniform", "get_1d_sincos_pos_embed_from_grid", "get_2d_sincos_pos_embed",
    "get_activation", "layer_norm", "ones", "part", "patch_grid", "patchify", "unpatchify",
    "xavier_uniform", "zeros", "_cudnn_attention",
]
