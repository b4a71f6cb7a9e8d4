"""ResNet (He et al. 2016), v1.5: the backbone of SimCLR, MoCo v2 / v3, BYOL and ALIGN-style
towers, with BatchNorm synchronised over the global batch.

Layout (channels last, NHWC; param names). Every conv is a ``core.ConvBN`` (a bias-free conv
``conv`` then BatchNorm ``bn``, padding ``kernel // 2``):

- ``stem``: ``stem='imagenet'``: 7x7 stride-2 ConvBN to ``stem_width``, ReLU, 3x3 stride-2 max
  pool (padding 1); ``stem='cifar'`` (SimCLR's CIFAR-10 ResNet): 3x3 stride-1 ConvBN, ReLU, no
  pool;
- ``stage_{i}_block_{j}``: ``block='bottleneck'`` (ResNet-50 and up): ``conv1`` 1x1 to
  ``dims[i] / 4`` -> ReLU -> ``conv2`` 3x3 (the stage's stride 2 here: v1.5, torchvision's and
  transformers' layout; ``downsample_in_bottleneck=True`` puts it on ``conv1``, the original
  v1) -> ReLU -> ``conv3`` 1x1 to ``dims[i]``; ``block='basic'`` (ResNet-18 / 34): ``conv1``
  3x3 (stride) -> ReLU -> ``conv2`` 3x3; then ``+ shortcut`` (a 1x1 strided ``shortcut``
  ConvBN where the width or the grid changes, else the identity) and ReLU. Stage 0 has stride
  1, the others 2. ``zero_init_residual=True`` starts each block's last BatchNorm scale at 0
  (Goyal et al. 2017; SimCLR's ``init_zero``): a fresh block is the identity.
- head: global average pool -> ``head`` Linear when ``num_classes > 0``.

Outputs: ``pre_logits`` (B, dims[-1]) (the pooled features), ``patch_tokens`` (B, h w,
dims[-1]) (the last stage's map, flattened), ``feature_maps`` (each stage's output), ``logits``
with a head. Any input size works.

**BatchNorm** (``core.ConvBN``): ``train=True`` normalises by the batch's statistics and
updates the running ones (flax momentum 0.9 = torch's 0.1; eps 1e-5); ``train=False`` uses the
running statistics, which live in the ``batch_stats`` collection (``state_collections``; an
objective carries them between steps when it says so: ``registry.require(..., carries=...)``).
Under fmjax's sharded jit the batch mean and variance are over the GLOBAL batch, whatever the
mesh: SimCLR's and BYOL's cross-replica BatchNorm and MoCo's SyncBatchNorm by construction
(PyTorch DDP without SyncBatchNorm normalises per GPU instead). flax updates the running
variance with the biased batch variance, torch with the unbiased one (factor n / (n - 1));
the forward passes and gradients are the same.

Variants (``variant``): ``18``, ``34`` (basic), ``50``, ``101``, ``152`` (bottleneck), widths
(64, 128, 256, 512) x 4 for bottlenecks; ``width_multiplier`` k scales the stem and every
stage (SimCLR's ResNet-50 (2x) / (4x)). Conv kernels start from torch's
``kaiming_normal_(mode='fan_out', nonlinearity='relu')`` (torchvision's and transformers'
init). ``fmjax.interop.hf_resnet`` converts transformers' ``ResNetModel`` /
``ResNetForImageClassification`` (params and running statistics).
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models import core
from fmjax.models import scan as scan_lib

Dtype = Any

VARIANTS = {
    "18": dict(block="basic", depths=(2, 2, 2, 2), dims=(64, 128, 256, 512)),
    "34": dict(block="basic", depths=(3, 4, 6, 3), dims=(64, 128, 256, 512)),
    "50": dict(block="bottleneck", depths=(3, 4, 6, 3), dims=(256, 512, 1024, 2048)),
    "101": dict(block="bottleneck", depths=(3, 4, 23, 3), dims=(256, 512, 1024, 2048)),
    "152": dict(block="bottleneck", depths=(3, 8, 36, 3), dims=(256, 512, 1024, 2048)),
}
BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "cifar")
# torch kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / fan_out), untruncated.
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def resnet_kwargs(variant: str = "", **overrides) -> Dict[str, Any]:
    """A variant's kwargs; ``width_multiplier`` k (an override) multiplies ``stem_width`` and
    ``dims`` (SimCLR's wider ResNets)."""
    k = overrides.pop("width_multiplier", 1)
    k = 1 if k is None else int(k)
    if k < 1:
        raise ValueError(f"ResNet width_multiplier={k}; must be a positive integer.")
    kw = core.preset_kwargs("ResNet", VARIANTS, variant, overrides)
    if k > 1:
        kw["stem_width"] = int(kw.get("stem_width", 64)) * k
        kw["dims"] = tuple(int(d) * k for d in kw.get("dims", ResNet.dims))
    return kw


class ResNetBlock(nn.Module):
    """One residual block (see the module docstring)."""
    dim: int
    stride: int = 1
    block: str = "bottleneck"
    downsample_in_bottleneck: bool = False
    zero_init_residual: bool = False
    bn_momentum: float = core.BN_MOMENTUM
    bn_eps: float = core.BN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        cb = lambda f, k, s, name, scale=1.0: core.ConvBN(  # noqa: E731
            f, k, s, bn_scale_init=scale, kernel_init=KAIMING_FAN_OUT, bn_momentum=self.bn_momentum,
            bn_eps=self.bn_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        last = 0.0 if self.zero_init_residual else 1.0
        if self.block == "bottleneck":
            mid = self.dim // 4
            s1, s2 = (self.stride, 1) if self.downsample_in_bottleneck else (1, self.stride)
            y = nn.relu(cb(mid, 1, s1, "conv1")(x, train))
            y = nn.relu(cb(mid, 3, s2, "conv2")(y, train))
            y = cb(self.dim, 1, 1, "conv3", last)(y, train)
        else:
            y = nn.relu(cb(self.dim, 3, self.stride, "conv1")(x, train))
            y = cb(self.dim, 3, 1, "conv2", last)(y, train)
        if x.shape[-1] != self.dim or self.stride != 1:
            x = cb(self.dim, 1, self.stride, "shortcut")(x, train)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """See the module docstring."""

    capabilities = frozenset({"pooled", "tokens", "classifier", "any_resolution"})
    state_collections = ("batch_stats",)   # BatchNorm's running statistics

    def capabilities_of(self) -> frozenset:
        return self.capabilities if self.num_classes > 0 else self.capabilities - {"classifier"}

    depths: Sequence[int] = (3, 4, 6, 3)
    dims: Sequence[int] = (256, 512, 1024, 2048)
    block: str = "bottleneck"
    stem_width: int = 64
    stem: str = "imagenet"
    num_classes: int = 0
    downsample_in_bottleneck: bool = False
    zero_init_residual: bool = False
    bn_momentum: float = core.BN_MOMENTUM
    bn_eps: float = core.BN_EPS
    remat: Any = False  # False / True or a policy name (fmjax.models.scan.REMAT_POLICIES)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def width(self) -> int:
        return int(self.dims[-1])

    @property
    def patch_size(self) -> int:
        """The total stride of the last stage's grid."""
        return (4 if self.stem == "imagenet" else 1) * 2 ** (len(self.dims) - 1)

    def _check(self):
        if self.block not in BLOCKS:
            raise ValueError(f"ResNet block={self.block!r}; valid: {list(BLOCKS)}.")
        if self.stem not in STEMS:
            raise ValueError(f"ResNet stem={self.stem!r}; valid: {list(STEMS)}.")
        if len(self.depths) != len(self.dims):
            raise ValueError(f"ResNet depths {tuple(self.depths)} and dims {tuple(self.dims)} differ in length.")
        if self.block == "bottleneck" and any(int(d) % 4 for d in self.dims):
            raise ValueError(f"ResNet bottleneck dims {tuple(self.dims)} must divide by 4 (the 1x1 "
                             "reduction to dims / 4).")

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
        self._check()
        x = images.astype(self.dtype)
        k, s = (7, 2) if self.stem == "imagenet" else (3, 1)
        x = nn.relu(core.ConvBN(self.stem_width, k, s, kernel_init=KAIMING_FAN_OUT,
                                bn_momentum=self.bn_momentum, bn_eps=self.bn_eps, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="stem")(x, train))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block_cls = scan_lib.remat_module(ResNetBlock, self.remat, static_argnums=(2,))
        maps = []
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            for j in range(depth):
                x = block_cls(int(dim), 2 if (i > 0 and j == 0) else 1, self.block,
                              self.downsample_in_bottleneck, self.zero_init_residual, self.bn_momentum,
                              self.bn_eps, self.dtype, self.param_dtype,
                              name=f"stage_{i}_block_{j}")(x, train)
            maps.append(x)
        b, h, w, c = x.shape
        pooled = x.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype)
        out = dict(pre_logits=pooled, patch_tokens=x.reshape(b, h * w, c), feature_maps=maps)
        if self.num_classes > 0:
            # torchvision / transformers: nn.Linear's default init for the classifier.
            out["logits"] = nn.Dense(
                self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                kernel_init=core.part(core.CONV_INIT, ("embed", "classes")),
                bias_init=core.part(core.zeros, ("classes",)))(pooled)
        return out
