"""LoRA (Hu et al. 2021) on any fmjax model, applied from outside it through the dense
injection point (``fmjax.models.inject``), the way MaxText applies it by a regex over paths.

Every ``DenseND`` whose module path (``'/'``-joined, e.g. ``encoder/block_3/attn/query``;
``encoder/block_stack/attn/query`` under ``scan_layers``) matches ``targets`` (``re.search``)
gets two params beside its own kernel:

- ``lora_a``: (in dims..., rank), initialised like PEFT's ``lora_A`` (kaiming-uniform with
  a = sqrt(5) over the flattened input, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)));
- ``lora_b``: (rank, out dims...), zeros, so the adapted model equals the base one at init;

and computes ``y = x . W + b + (alpha / rank) (x . A) . B`` (PEFT's ``scaling = lora_alpha / r``).

Every ``core.Conv`` whose path matches (the conv injection point: the U-Net's, ResNet's,
ConvNeXt's convolutions) gets PEFT's conv LoRA (``peft.tuners.lora.layer.Conv2d``): ``lora_a``
(window..., in, rank), a convolution at the layer's own strides / padding / dilation
(PEFT's ``lora_A = Conv2d(in, r, kernel_size, stride, padding, bias=False)``, same kaiming-uniform
init over ``window * in``), and ``lora_b`` (rank, out), zeros (PEFT's 1x1 ``lora_B``):
``y = conv(x, W) + b + (alpha / rank) conv(x, A) . B``, which is ``conv(x, W + (alpha / rank) A . B)``,
so ``merge`` folds it the same way. Grouped convolutions (ConvNeXt's depthwise ``dwconv``) get
none (PEFT refuses them too); a ``targets`` naming them is reported as unreachable.
``rank = 0`` creates nothing and ``alpha = 0`` adds nothing: the base model, bit for bit.

``merge(params, alpha, rank)`` folds every ``(lora_a, lora_b)`` pair into its kernel,
``W + (alpha / rank) A . B`` (stacked layers included), and drops the pair: the merged params
load into the plain model for export and inference.

``dropout`` > 0 is PEFT's ``lora_dropout``: inverted dropout on the LoRA branch's input only,
``y = x . W + b + (alpha / rank) (drop(x) . A) . B``, drawn from the 'dropout' rng. It is active
when the apply call has a 'dropout' rng, which is how fmjax's objectives mark their training
forward passes (their evaluation passes and frozen teachers get none), like torch's
``module.training``. ``merge`` is unaffected (dropout is the identity at inference).
"""
from __future__ import annotations

import math
import re
from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models import core

LORA_PARAMS = ("lora_a", "lora_b")


def module_path(module) -> str:
    """The '/'-joined path of a linen module inside the model (as in the param tree)."""
    return "/".join(str(p) for p in module.path)


def train_dropout(module, x, rate: float):
    """Inverted dropout of ``x`` drawn from ``module``'s 'dropout' rng when the apply call has
    one (how fmjax's objectives mark their training passes), else ``x``: every adapter's
    ``config.adapter.dropout``."""
    if rate <= 0.0 or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def _a_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def lora_hook(rank: int, alpha: float, targets: str, dropout: float = 0.0):
    """The dense hook: LoRA on every ``DenseND`` whose path matches ``targets``."""
    pattern = re.compile(targets)
    scale = alpha / rank if rank > 0 else 0.0

    def hook(dense, x, call_next):
        if rank <= 0 or not pattern.search(module_path(dense)):
            return call_next(x)
        y = call_next(x)
        in_shape, out_shape = dense.in_shape(x), tuple(dense.features)
        a = dense.param("lora_a", core.part(_a_init(math.prod(in_shape)),
                                            tuple(dense.kernel_axes[:dense.contract]) + (None,)),
                        tuple(in_shape) + (rank,), dense.param_dtype)
        b = dense.param("lora_b", core.part(nn.initializers.zeros,
                                            (None,) + tuple(dense.kernel_axes[dense.contract:])),
                        (rank,) + out_shape, dense.param_dtype)
        if scale == 0.0:
            return y
        x = train_dropout(dense, x, dropout)
        low = jnp.tensordot(dense.contract_with(x, a), b.astype(dense.dtype), axes=1)
        return y + jnp.asarray(scale, dense.dtype) * low
    return hook


def lora_conv_hook(rank: int, alpha: float, targets: str, dropout: float = 0.0):
    """The conv hook: LoRA on every ungrouped ``core.Conv`` whose path matches ``targets``."""
    pattern = re.compile(targets)
    scale = alpha / rank if rank > 0 else 0.0

    def hook(conv, x, call_next):
        if rank <= 0 or conv.feature_group_count != 1 or not pattern.search(module_path(conv)):
            return call_next(x)
        y = call_next(x)
        window_in = conv.kernel_shape(x)[:-1]
        n = len(window_in)
        a = conv.param("lora_a", core.part(_a_init(math.prod(window_in)), (None,) * (n + 1)),
                       window_in + (rank,), conv.param_dtype)
        b = conv.param("lora_b", core.part(nn.initializers.zeros, (None, None)), (rank, conv.features),
                       conv.param_dtype)
        if scale == 0.0:
            return y
        low = conv.convolve(train_dropout(conv, x, dropout), a)
        low = jnp.tensordot(low, b.astype(conv.dtype), axes=1)
        return y + jnp.asarray(scale, conv.dtype) * low
    return hook


def _delta(a, b, kernel_ndim: int):
    """``A . B`` shaped like the kernel; a leading stacked-layer axis (scan) is batched."""
    if a.ndim + b.ndim - 2 == kernel_ndim:
        return jnp.tensordot(a, b, axes=1)
    if a.ndim + b.ndim - 4 == kernel_ndim - 1 and a.shape[0] == b.shape[0]:
        return jax.vmap(lambda ai, bi: jnp.tensordot(ai, bi, axes=1))(a, b)
    raise ValueError(f"lora_a {a.shape} / lora_b {b.shape} do not fit a kernel of {kernel_ndim} dims.")


def merge(params, alpha: float, rank: int):
    """``params`` with every LoRA pair folded into its kernel and removed (see the module
    docstring). Params without LoRA come back unchanged."""
    params = nn.unbox(params)
    scale = alpha / rank if rank > 0 else 0.0

    def walk(node):
        if not isinstance(node, dict) and not hasattr(node, "items"):
            return node
        node = dict(node)
        if "lora_a" in node and "lora_b" in node and "kernel" in node:
            a, b, kernel = node.pop("lora_a"), node.pop("lora_b"), node["kernel"]
            delta = _delta(a.astype(jnp.float32), b.astype(jnp.float32), kernel.ndim)
            node["kernel"] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
        return {k: walk(v) for k, v in node.items()}
    return walk(params)


def count(params) -> int:
    """Number of LoRA parameters in ``params``."""
    n = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]:
        if str(getattr(path[-1], "key", "")) in LORA_PARAMS:
            n += math.prod(leaf.shape)
    return n


def expected_count(shapes: Iterable[tuple[tuple[int, ...], tuple[int, ...]]], rank: int) -> int:
    """The LoRA formula: ``rank * (prod(in dims) + prod(out dims))`` per adapted projection,
    for ``(in dims, out dims)`` pairs."""
    return sum(rank * (math.prod(i) + math.prod(o)) for i, o in shapes)

