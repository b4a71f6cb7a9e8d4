"""ConvNeXt (Liu et al. 2022) and ConvNeXt V2's global response normalisation (Woo et al. 2023).

Layout (channels last, NHWC; param names):

- stem: ``stem`` 4x4 stride-4 conv to ``dims[0]``, then ``stem_norm`` LayerNorm (``stem='conv'``:
  fmjax's ViT conv stem instead, log2(patch_size) overlapping 3x3 stride-2 convs with LayerNorm
  and GELU, then a 1x1 projection; small images, where a 4x4 patchify sees too little);
- stage i > 0 starts with ``downsample_{i}_norm`` (LayerNorm) and ``downsample_{i}_conv``
  (2x2 stride 2) to ``dims[i]``;
- ``stage_{i}_block_{j}``: depthwise 7x7 ``dwconv`` (``kernel_size``: the paper's section 2.5
  tries 3 to 11) -> ``norm`` (LayerNorm over channels) ->
  ``fc1`` (C -> 4C, a ``DenseND``: LoRA / quantisation hooks reach it, e.g. LoRA targets
  ``'fc[12]$'``) -> GELU -> ``grn`` (V2 only) -> ``fc2`` (4C -> C) -> layer scale ``gamma``
  (V1, ``layer_scale_init`` > 0) -> stochastic depth -> residual;
- head: global average pool -> ``head_norm`` LayerNorm -> ``head`` Linear when
  ``num_classes > 0``.

Outputs: ``pre_logits`` (B, dims[-1]) (the normed pooled features), ``patch_tokens`` (B, h w,
dims[-1]) (the last stage's feature map, flattened), ``feature_maps`` (one (B, h, w, C) per
stage), ``logits`` with a head. Stochastic depth rises linearly from 0 to ``drop_path``
over all blocks, as the reference. ``scan_layers=True`` runs each stage's blocks as one
``nn.scan``: its params are ``stage_{i}_block_stack/...`` with a leading (depth_i,) axis
(``fmjax.models.scan`` converts the layouts; checkpoint converters and ``model_init`` use the
unrolled one; the dropout masks differ from the unrolled model's). Any input size whose sides
divide by 32 works.

Variants (``variant``): ``T`` (3, 3, 9, 3) x (96, 192, 384, 768), ``S`` (3, 3, 27, 3), ``B``
(3, 3, 27, 3) x (128 ... 1024), ``L`` (3, 3, 27, 3) x (192 ... 1536); ``grn=True`` with
``layer_scale_init=0`` is V2. ``fmjax.interop.hf_convnext`` converts transformers'
``ConvNextModel`` / ``ConvNextV2Model`` (and their image classifiers).
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models import core
from fmjax.models.blocks import DropPath, stochastic_depth_rates
from fmjax.models.embeddings import ConvStem
from fmjax.models import scan as scan_lib

Dtype = Any

VARIANTS = {
    "T": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "S": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "B": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "L": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
}


def convnext_kwargs(variant: str = "", **overrides) -> Dict[str, Any]:
    return core.preset_kwargs("ConvNeXt", VARIANTS, variant, overrides)


WEIGHT_INITS = ("reference", "lecun")


def _conv_init(kind: str = "reference"):
    """The reference's trunc_normal(0.02) for every conv / linear weight ('reference'), or
    flax's fan-in scaled ``lecun_normal`` ('lecun'; module docstring)."""
    if kind == "lecun":
        return nn.initializers.lecun_normal()
    if kind != "reference":
        raise ValueError(f"ConvNeXt weight_init={kind!r}; valid: {', '.join(map(repr, WEIGHT_INITS))}.")
    return nn.initializers.truncated_normal(0.02)


class GRN(nn.Module):
    """ConvNeXt V2 global response normalisation over (H, W), per channel."""
    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        gamma = self.param("gamma", core.part(core.zeros, ("mlp",)), (c,), self.param_dtype)
        beta = self.param("beta", core.part(core.zeros, ("mlp",)), (c,), self.param_dtype)
        xf = x.astype(jnp.float32)
        gx = jnp.sqrt(jnp.sum(jnp.square(xf), axis=(1, 2), keepdims=True))
        nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + self.eps)
        return (gamma * (xf * nx) + beta + xf).astype(x.dtype)


class ConvNeXtBlock(nn.Module):
    dim: int
    drop_path: float = 0.0
    layer_scale_init: float = 1e-6
    grn: bool = False
    layernorm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_size: int = 7
    weight_init: str = "reference"

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        return self._forward(x, deterministic)

    def _forward(self, x, deterministic: bool, drop_path_rate=None):
        shortcut = x
        k, pad = self.kernel_size, self.kernel_size // 2
        x = core.Conv(self.dim, (k, k), padding=((pad, pad), (pad, pad)), feature_group_count=self.dim,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="dwconv",
                      # replicated, not FSDP-split: with its channel axis split, XLA's SPMD
                      # partitioner splits the grouped conv by channel and moves the whole batch-split
                      # activation through four all-to-alls per block instead of gathering 49 x C
                      # weights (ConvNeXt-T on v5e-256: 123 GB accessed per chip per step; docs/scaling.md)
                      kernel_init=core.part(_conv_init(self.weight_init), (None, None, None, None)),
                      bias_init=core.part(core.zeros, (None,)))(x)
        x = core.layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm")(x)
        dense = lambda f, axes, name: core.DenseND(  # noqa: E731
            (f,), kernel_axes=axes, bias_axes=axes[-1:], dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=_conv_init(self.weight_init), name=name)
        x = dense(4 * self.dim, ("embed", "mlp"), "fc1")(x)
        x = jax.nn.gelu(x, approximate=False)
        if self.grn:
            x = GRN(param_dtype=self.param_dtype, name="grn")(x)
        x = dense(self.dim, ("mlp", "embed"), "fc2")(x)
        if self.layer_scale_init > 0:
            gamma = self.param("gamma", core.part(nn.initializers.constant(self.layer_scale_init), ("embed",)),
                               (self.dim,), self.param_dtype)
            x = x * gamma.astype(x.dtype)
        x = DropPath(self.drop_path)(x, deterministic, drop_path_rate)
        return shortcut + x


ConvNeXtScanBlock = scan_lib.scan_body(ConvNeXtBlock)   # (x, drop_path_rate, deterministic)


class ConvNeXt(nn.Module):
    """See the module docstring."""

    capabilities = frozenset({"pooled", "tokens", "classifier", "any_resolution"})

    def capabilities_of(self) -> frozenset:
        return self.capabilities if self.num_classes > 0 else self.capabilities - {"classifier"}

    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    num_classes: int = 0
    drop_path: float = 0.0
    layer_scale_init: float = 1e-6
    grn: bool = False
    layernorm_eps: float = 1e-6
    head_norm_eps: float = 1e-6
    patch_size: int = 4  # the stem's stride (the first stage's grid is H / 4)
    kernel_size: int = 7  # the depthwise conv's (odd; the paper's 7; its section 2.5 tries 3 to 11)
    weight_init: str = "reference"  # conv / linear weights: 'reference' trunc_normal(0.02) or 'lecun'
    stem: str = "patch"  # 'patch': the paper's patchify conv; 'conv': overlapping 3x3 convs (docstring)
    remat: Any = False  # False / True or a policy name (fmjax.models.scan.REMAT_POLICIES)
    scan_layers: bool = False  # one nn.scan per stage: stage_{i}_block_stack (module docstring)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def width(self) -> int:
        return int(self.dims[-1])

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"ConvNeXt kernel_size={self.kernel_size!r}; must be odd, e.g. 7 (the paper's).")
        if len(self.depths) != len(self.dims):
            raise ValueError(f"ConvNeXt depths {tuple(self.depths)} and dims {tuple(self.dims)} differ in length.")
        x = images.astype(self.dtype)
        norm = lambda name: core.layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, name)  # noqa: E731
        conv = lambda f, k, name: core.Conv(  # noqa: E731
            f, (k, k), strides=(k, k), padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
            name=name, kernel_init=core.part(_conv_init(self.weight_init), (None, None, None, "embed")),
            bias_init=core.part(core.zeros, ("embed",)))
        if self.stem == "patch":
            x = conv(self.dims[0], self.patch_size, "stem")(x)
        elif self.stem == "conv":  # fmjax's ViT conv stem (Xiao et al. 2021), as a feature map
            b, h, w, _ = x.shape
            x = ConvStem(self.dims[0], self.patch_size, self.dtype, self.param_dtype, name="stem")(x)
            x = x.reshape(b, h // self.patch_size, w // self.patch_size, self.dims[0])
        else:
            raise ValueError(f"ConvNeXt stem={self.stem!r}; valid: 'patch' (the paper's), 'conv'.")
        x = norm("stem_norm")(x)
        rates = stochastic_depth_rates(self.drop_path, sum(self.depths))
        block_cls = scan_lib.remat_module(ConvNeXtBlock, self.remat, static_argnums=(2,))
        maps, k = [], 0
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            if i > 0:
                x = conv(dim, 2, f"downsample_{i}_conv")(norm(f"downsample_{i}_norm")(x))
            args = (self.layer_scale_init, self.grn, self.layernorm_eps, self.dtype, self.param_dtype,
                    self.kernel_size, self.weight_init)
            if self.scan_layers and depth:
                # (x, rate) scanned, deterministic the same for every block; without drop_path
                # no rate goes in, so no 'dropout' rng is drawn for it (as unrolled).
                stack = scan_lib.stack_module(ConvNeXtScanBlock, depth, self.remat, static_argnums=(3,),
                                              in_axes=(0, nn.broadcast))
                xs = jnp.asarray(rates[k:k + depth], jnp.float32) if self.drop_path else None
                x, _ = stack(dim, float(self.drop_path), *args,
                             name=f"stage_{i}_block{scan_lib.STACK_SUFFIX}")(x, xs, not train)
                k += depth
            else:
                for j in range(depth):
                    x = block_cls(dim, rates[k], *args, name=f"stage_{i}_block_{j}")(x, not train)
                    k += 1
            maps.append(x)
        b, h, w, c = x.shape
        pooled = core.layer_norm(self.head_norm_eps, self.dtype, self.param_dtype, "head_norm")(
            x.mean(axis=(1, 2)))
        out = dict(pre_logits=pooled, patch_tokens=x.reshape(b, h * w, c), feature_maps=maps)
        if self.num_classes > 0:
            out["logits"] = nn.Dense(
                self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                kernel_init=core.part(_conv_init(self.weight_init), ("embed", "classes")),
                bias_init=core.part(core.zeros, ("classes",)))(pooled)
        return out
