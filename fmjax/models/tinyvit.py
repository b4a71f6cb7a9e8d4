"""TinyViT (Wu et al. 2022, microsoft/Cream ``TinyViT/models/tiny_vit.py``): a convolutional
first stage of MBConv blocks, then windowed-attention stages with a LeViT-style attention bias
table and a depthwise convolution between attention and MLP; BatchNorm in every convolution.

Layout (channels last, NHWC; param names). ``conv_bn`` is Cream's ``Conv2d_BN``: a bias-free
conv ``conv`` then BatchNorm ``bn`` (scale / bias, running ``mean`` / ``var`` in the
``batch_stats`` collection), padding ``kernel // 2``:

- ``patch_embed``: ``conv1`` (3x3 stride 2 to ``embed_dims[0] // 2``) -> GELU -> ``conv2``
  (3x3 stride 2 to ``embed_dims[0]``): an H / 4 grid;
- ``stage_0_block_{j}`` (MBConv, Cream's ``ConvLayer``): ``conv1`` (1x1 to
  ``mbconv_expand_ratio`` C) -> GELU -> ``conv2`` (depthwise 3x3) -> GELU -> ``conv3`` (1x1
  back to C; its BatchNorm scale starts at 0, so a fresh block is the identity before its
  GELU) -> stochastic depth -> residual -> GELU;
- ``stage_{i}_block_{j}``, i > 0 (Cream's ``TinyViTBlock``): the map zero-padded on the
  bottom / right to a multiple of the window -> ``norm1`` (LayerNorm; Cream's ``attn.norm``,
  applied after the padding as there) -> window attention ``attn`` (a ``MultiHeadAttention``:
  ``query`` / ``key`` / ``value`` / ``out``, head dim C / heads, plus ``attention_biases``
  (heads, ws^2), one learned bias per head and absolute offset (|dy|, |dx|) at row
  |dy| ws + |dx| (the order in which Cream's ``attention_offsets`` meets them), added to the
  logits through the attention injection point, ``fmjax.models.inject``) -> crop ->
  stochastic depth -> residual; ``local_conv`` (depthwise ``local_conv_size``, no residual);
  ``norm2`` (Cream's ``mlp.norm``) -> ``mlp`` (``fc1`` / ``fc2``, GELU) -> stochastic depth ->
  residual. The padded tokens take part in the attention as keys, unmasked, as in Cream;
- stage i < last ends with ``stage_{i}_merge`` (Cream's ``PatchMerging``): ``conv1`` (1x1 to
  ``embed_dims[i + 1]``) -> GELU -> ``conv2`` (depthwise 3x3 stride 2) -> GELU -> ``conv3``
  (1x1);
- head: global average pool -> ``head_norm`` (LayerNorm, Cream's ``norm_head``) -> ``head``
  Linear when ``num_classes > 0``.

Outputs: ``pre_logits`` (B, C_last) (the normed pooled features), ``patch_tokens`` (B, h w,
C_last) (the last stage's map, flattened, not normed), ``feature_maps`` (each stage's (B, h, w,
C) before its merge), ``logits`` with a head. Stochastic depth rises linearly from 0 to
``drop_path`` over all blocks, the MBConv ones included (Cream's ``torch.linspace``).
``remat`` checkpoints each block. ``scan_layers=True`` runs each stage's blocks as one
``nn.scan`` (``stage_{i}_block_stack/...``, params and ``batch_stats`` with a leading
(depth_i,) axis; ``fmjax.models.scan`` converts the layouts), so a stage compiles one block.

**BatchNorm.** ``train=True`` normalises by the batch's statistics and updates the running
ones (momentum 0.9 in flax's convention, torch's 0.1; eps 1e-5); ``train=False`` uses the
running statistics. They live in the ``batch_stats`` collection (``state_collections``): apply
with ``mutable=['batch_stats']`` in training, and pass them back in. An objective carries them
between steps only when it says so (``fmjax.models.registry.require(..., carries=...)``; the
supervised and distill objectives do); the others refuse this backbone in one line. flax
updates the running variance with the batch's biased variance, torch with the unbiased one
(a factor n / (n - 1), n = batch x h x w values per channel); the forward passes are the same.

**Small inputs.** Any size works (each stride-2 conv gives ceil(h / 2)). A stage whose grid
is not larger than its window (``min(h, w) <= window``) uses a window of ``min(h, w)``, as
``fmjax.models.swin`` does (Cream would zero-pad the grid to one full window); a larger grid
that is not a multiple of the window is zero-padded exactly as Cream does. The bias table
always has the configured window's ws^2 rows and a smaller window reads its own offsets from
it, so the param shapes do not depend on the input size (a 224 px checkpoint loads for 32 px
inputs).

Variants (``variant``, the paper's models at 224 px): ``5m`` (64, 128, 160, 320), heads (2, 4,
5, 10); ``11m`` (64, 128, 256, 448), heads (2, 4, 8, 14); ``21m`` (96, 192, 384, 576), heads
(3, 6, 12, 18); all depths (2, 2, 6, 2), windows (7, 7, 14, 7) (the first stage's is unused:
it has no attention). ``fmjax.interop.cream_tinyvit`` converts Cream's checkpoints
(``model_init`` format ``cream_tinyvit``).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.models import core, inject
from fmjax.models.attention import MultiHeadAttention
from fmjax.models.blocks import DropPath, Mlp, stochastic_depth_rates
from fmjax.models import scan as scan_lib
from fmjax.models.swin import window_partition, window_reverse

Dtype = Any
Axes = Tuple[Any, ...]

VARIANTS = {
    "5m": dict(embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10),
               window_sizes=(7, 7, 14, 7)),
    "11m": dict(embed_dims=(64, 128, 256, 448), depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 14),
                window_sizes=(7, 7, 14, 7)),
    "21m": dict(embed_dims=(96, 192, 384, 576), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 18),
                window_sizes=(7, 7, 14, 7)),
}

ConvBN = core.ConvBN   # Cream's Conv2d_BN (torch's default conv init, BatchNorm eps 1e-5)


def tinyvit_kwargs(variant: str = "", **overrides) -> Dict[str, Any]:
    return core.preset_kwargs("TinyViT", VARIANTS, variant, overrides)


def gelu(x):
    return jax.nn.gelu(x, approximate=False)


@functools.lru_cache(maxsize=64)
def attention_bias_index(ws: int, table_ws: int) -> np.ndarray:
    """(ws^2, ws^2) columns of a (heads, table_ws^2) ``attention_biases`` table for the token
    pairs of a ws x ws window (ws <= table_ws): |dy| table_ws + |dx|. With ws == table_ws this
    is Cream's ``attention_bias_idxs``: its first query token (0, 0) meets every offset, in
    row-major order, before any other does."""
    coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
    rel = np.abs(coords[:, :, None] - coords[:, None, :])   # 2, N, N
    return (rel[0] * table_ws + rel[1]).astype(np.int32)


def _attention_bias_hook(ws: int, table_ws: int, num_heads: int, param_dtype):
    """Attention hook: the per-head bias of each token pair's absolute offset, its table a
    param (``attention_biases``) of the attention module."""
    index = attention_bias_index(ws, table_ws)

    def bias(module, q, k):
        table = module.param("attention_biases", core.part(core.zeros, ("heads", None)),
                             (num_heads, table_ws * table_ws), param_dtype)
        return table.astype(jnp.float32)[:, index][None]   # 1, heads, N, N
    return inject.additive_bias(bias)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 ``ConvBN``s with a GELU between: an H / 4 grid of ``dim`` channels."""
    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        cb = functools.partial(ConvBN, kernel_size=3, stride=2, dtype=self.dtype, param_dtype=self.param_dtype)
        x = gelu(cb(self.dim // 2, name="conv1")(x, train))
        return cb(self.dim, name="conv2")(x, train)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise 3x3, 1x1 project (module docstring)."""
    expand_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self._forward(x, train)

    def _forward(self, x, train: bool, drop_path_rate=None):
        c = x.shape[-1]
        hidden = int(c * self.expand_ratio)
        cb = functools.partial(ConvBN, dtype=self.dtype, param_dtype=self.param_dtype)
        y = gelu(cb(hidden, 1, kernel_axes=(None, None, "embed", "mlp"), name="conv1")(x, train))
        y = gelu(cb(hidden, 3, groups=hidden, kernel_axes=(None, None, None, "mlp"), name="conv2")(y, train))
        y = cb(c, 1, kernel_axes=(None, None, "mlp", "embed"), bn_scale_init=0.0, name="conv3")(y, train)
        return gelu(x + DropPath(self.drop_path)(y, not train, drop_path_rate))


class PatchMerging(nn.Module):
    """1x1 to ``out_dim``, depthwise 3x3 stride 2, 1x1, GELUs between (module docstring)."""
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        cb = functools.partial(ConvBN, self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype)
        x = gelu(cb(1, kernel_axes=(None, None, "embed", "mlp"), name="conv1")(x, train))
        x = gelu(cb(3, stride=2, groups=self.out_dim, kernel_axes=(None, None, None, "mlp"),
                    name="conv2")(x, train))
        return cb(1, kernel_axes=(None, None, "mlp", "embed"), name="conv3")(x, train)


class TinyViTBlock(nn.Module):
    """Window attention with the offset bias table, a depthwise conv, an MLP (module docstring)."""
    num_heads: int
    window_size: int = 7
    mlp_ratio: float = 4.0
    local_conv_size: int = 3
    drop_path: float = 0.0
    layernorm_eps: float = 1e-5
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self._forward(x, train)

    def _forward(self, x, train: bool, drop_path_rate=None):
        b, h, w, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"TinyViT width {c} is not divisible by num_heads={self.num_heads}.")
        norm = lambda name: core.layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, name)  # noqa: E731
        ws = min(h, w, self.window_size)
        ph, pw = (-h) % ws, (-w) % ws
        y = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0))) if ph or pw else x
        y = norm("norm1")(y)
        with inject.hooks(attention=_attention_bias_hook(ws, self.window_size, self.num_heads, self.param_dtype)):
            y = MultiHeadAttention(self.num_heads, attention_impl=self.attention_impl, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name="attn")(
                window_partition(y, ws), deterministic=not train)
        y = window_reverse(y, ws, h + ph, w + pw)[:, :h, :w]
        x = x + DropPath(self.drop_path)(y, not train, drop_path_rate)
        x = ConvBN(c, self.local_conv_size, groups=c, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="local_conv")(x, train)
        y = Mlp(int(c * self.mlp_ratio), dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(
            norm("norm2")(x).reshape(b, h * w, c), not train)
        return x + DropPath(self.drop_path)(y.reshape(b, h, w, c), not train, drop_path_rate)


MBConvScanBody = scan_lib.scan_body(MBConv)             # (x, drop_path_rate, train)
TinyViTScanBody = scan_lib.scan_body(TinyViTBlock)


class TinyViT(nn.Module):
    """See the module docstring."""

    capabilities = frozenset({"pooled", "tokens", "classifier", "any_resolution"})
    state_collections = ("batch_stats",)   # BatchNorm's running statistics

    def capabilities_of(self) -> frozenset:
        return self.capabilities if self.num_classes > 0 else self.capabilities - {"classifier"}

    embed_dims: Sequence[int] = (64, 128, 160, 320)
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (2, 4, 5, 10)
    window_sizes: Sequence[int] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    num_classes: int = 0
    drop_path: float = 0.0
    layernorm_eps: float = 1e-5
    attention_impl: str = "xla"
    remat: Any = False  # False / True or a policy name (fmjax.models.scan.REMAT_POLICIES)
    scan_layers: bool = False  # one nn.scan per stage: stage_{i}_block_stack (module docstring)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def width(self) -> int:
        return int(self.embed_dims[-1])

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
        n = len(self.depths)
        if not (len(self.embed_dims) == len(self.num_heads) == len(self.window_sizes) == n):
            raise ValueError(f"TinyViT embed_dims {tuple(self.embed_dims)}, depths {tuple(self.depths)}, num_heads "
                             f"{tuple(self.num_heads)} and window_sizes {tuple(self.window_sizes)} need one "
                             "entry per stage each.")
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = PatchEmbed(self.embed_dims[0], **dt, name="patch_embed")(images.astype(self.dtype), train)
        rates = stochastic_depth_rates(self.drop_path, sum(self.depths))
        mbconv = scan_lib.remat_module(MBConv, self.remat, static_argnums=(2,))
        block = scan_lib.remat_module(TinyViTBlock, self.remat, static_argnums=(2,))
        maps, k = [], 0
        for i, depth in enumerate(self.depths):
            if self.scan_layers and depth:
                # (x, rate) scanned, train the same for every block; params and batch_stats
                # stacked; without drop_path no rate goes in (no 'dropout' rng drawn, as unrolled)
                if i == 0:
                    body, args = MBConvScanBody, (self.mbconv_expand_ratio, float(self.drop_path))
                else:
                    body, args = TinyViTScanBody, (self.num_heads[i], self.window_sizes[i], self.mlp_ratio,
                                                   self.local_conv_size, float(self.drop_path),
                                                   self.layernorm_eps, self.attention_impl)
                stack = scan_lib.stack_module(body, depth, self.remat, static_argnums=(3,),
                                              in_axes=(0, nn.broadcast))
                rate = jnp.asarray(rates[k:k + depth], jnp.float32) if self.drop_path else None
                x, _ = stack(*args, **dt, name=f"stage_{i}_block{scan_lib.STACK_SUFFIX}")(x, rate, train)
                k += depth
            else:
                for j in range(depth):
                    name = f"stage_{i}_block_{j}"
                    if i == 0:
                        x = mbconv(self.mbconv_expand_ratio, rates[k], **dt, name=name)(x, train)
                    else:
                        x = block(self.num_heads[i], self.window_sizes[i], self.mlp_ratio, self.local_conv_size,
                                  rates[k], self.layernorm_eps, self.attention_impl, **dt, name=name)(x, train)
                    k += 1
            maps.append(x)
            if i < n - 1:
                x = PatchMerging(self.embed_dims[i + 1], **dt, name=f"stage_{i}_merge")(x, train)
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        pooled = core.layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "head_norm")(tokens.mean(axis=1))
        out = dict(pre_logits=pooled, patch_tokens=tokens, feature_maps=maps)
        if self.num_classes > 0:
            out["logits"] = nn.Dense(
                self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                kernel_init=core.part(nn.initializers.truncated_normal(0.02), ("embed", "classes")),
                bias_init=core.part(core.zeros, ("classes",)))(pooled)
        return out
