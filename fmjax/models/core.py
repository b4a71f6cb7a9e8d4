"""Core of fmjax's layers: sharding helpers, initialisers, the dense projection, norm,
activations and the conv + BatchNorm unit of the convolutional models.

Every parameter carries logical axis names (``nn.with_logical_partitioning``)
and activations are constrained on ``('batch', 'length', 'embed')`` so that
``fmjax/parallel/rules.py`` can shard them; outside a mesh both are no-ops.
Modules work equally on boxed (``nn.Partitioned``) and plain param trees.

``DenseND`` is the one dense projection of the shared layers, and the injection point for
dense hooks (``fmjax.models.inject``: LoRA, quantisation, ...); ``Conv`` (``nn.Conv``'s
params, init and numbers) is every convolution's, the injection point for conv hooks (LoRA).
"""
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.models import inject

Dtype = Any
ACT_AXES = ("batch", "length", "embed")

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
ones = nn.initializers.ones


def constrain(x: jax.Array, axes: Sequence[Optional[str]] = ACT_AXES) -> jax.Array:
    """Logical sharding constraint on an activation (no-op without rules)."""
    return nn.with_logical_constraint(x, tuple(axes))


def at_least_float32(x: jax.Array) -> jax.Array:
    """``x`` upcast to float32 for numerically sensitive work (softmax, losses): bfloat16 and
    float32 become float32, float64 (a float64 model under jax.enable_x64) stays float64."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def part(init, axes: Sequence[Optional[str]]):
    """Shorthand for ``nn.with_logical_partitioning(init, axes)``."""
    return nn.with_logical_partitioning(init, tuple(axes))


def flat_xavier_uniform(num_in_axes: int):
    """Xavier-uniform on the kernel flattened to (prod(in dims), prod(out dims)).

    This is what a PyTorch ``nn.Linear`` over the same flattened dims would use
    (e.g. q/k/v kernels shaped (embed, heads, kv) behave like (embed, heads*kv)).
    """
    def init(key, shape, dtype=jnp.float32):
        flat = (int(np.prod(shape[:num_in_axes])), int(np.prod(shape[num_in_axes:])))
        return xavier_uniform(key, flat, dtype).reshape(shape)
    return init


class DenseND(nn.Module):
    """``DenseGeneral`` over the last ``contract`` input dims, with the kernel created at its
    full N-D shape (e.g. q/k/v (embed, heads, kv)); params ``kernel`` (in dims + features)
    and ``bias`` (features), named by ``kernel_axes`` / ``bias_axes``.

    flax's DenseGeneral initialises kernels flattened to 2-D and unboxes them under
    the ambient mesh, which applies 3-D logical names to a 2-D value and fails; this
    keeps the same param names and shapes, so checkpoints and converters are unchanged.
    With ``contract=1`` and a 2-D kernel it is ``nn.Dense`` (same params, init and numbers).

    ``__call__`` runs the active dense hooks (``fmjax.models.inject``) around ``project``;
    with none it is ``project``. Hooks build on ``kernel_param`` / ``bias_param`` /
    ``project(x, kernel=...)``.
    """
    features: Tuple[int, ...]
    contract: int = 1
    kernel_axes: Tuple[Optional[str], ...] = ()
    bias_axes: Tuple[Optional[str], ...] = ()
    use_bias: bool = True
    kernel_init: Optional[Callable] = None  # None: flat_xavier_uniform(contract)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return inject.call_dense(self, x, self.project)

    def in_shape(self, x: jax.Array) -> Tuple[int, ...]:
        """The contracted (last ``contract``) dims of ``x``."""
        return tuple(x.shape[-self.contract:])

    def kernel_param(self, in_shape: Tuple[int, ...]) -> jax.Array:
        """The ``kernel`` param, (in_shape + features), in ``param_dtype``."""
        init = self.kernel_init or flat_xavier_uniform(self.contract)
        return self.param("kernel", part(init, self.kernel_axes),
                          tuple(in_shape) + tuple(self.features), self.param_dtype)

    def bias_param(self) -> Optional[jax.Array]:
        """The ``bias`` param (features), or None without ``use_bias``."""
        if not self.use_bias:
            return None
        return self.param("bias", part(zeros, self.bias_axes), tuple(self.features),
                          self.param_dtype)

    def contract_with(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """``x``'s last ``contract`` dims times ``kernel``'s first ones, in ``dtype``."""
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        dims = (tuple(range(x.ndim - self.contract, x.ndim)), tuple(range(self.contract)))
        return jax.lax.dot_general(x, kernel, (dims, ((), ())))

    def project(self, x: jax.Array, kernel: Optional[jax.Array] = None) -> jax.Array:
        """The plain projection ``x . kernel + bias``. A hook that passes ``kernel`` (e.g.
        ``fake_quant(module.kernel_param(module.in_shape(x)))``) has created the stored
        kernel itself (a param is created once), so ``project`` does not."""
        if kernel is None:
            kernel = self.kernel_param(self.in_shape(x))
        y = self.contract_with(x, kernel)
        bias = self.bias_param()
        if bias is not None:
            y = y + bias.astype(self.dtype)
        return y


class Conv(nn.Conv):
    """``nn.Conv`` (same fields, params, init, auto-name and numbers) whose ``__call__`` runs the
    active conv hooks (``fmjax.models.inject``) around the plain convolution: the injection
    point through which LoRA reaches convolutions. ``convolve(x, kernel)`` convolves with any
    kernel at this module's strides, padding, dilations and groups, with no bias."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        return inject.call_conv(self, inputs, super().__call__)

    def kernel_shape(self, x: jax.Array) -> Tuple[int, ...]:
        """The ``kernel`` param's shape for input ``x``: (window..., in / groups, features)."""
        size = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        return size + (x.shape[-1] // self.feature_group_count, self.features)

    def convolve(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """``x`` (batch..., spatial..., channels) convolved with ``kernel`` (window..., in / groups,
        out) like the module's own convolution (flax's padding conventions, 'CIRCULAR' /
        'REFLECT' included; 'CAUSAL' is 1-D only there and refused here), in ``dtype``."""
        n = kernel.ndim - 2
        batch = x.shape[:x.ndim - n - 1]
        x = x.reshape((-1,) + x.shape[len(batch):])

        def each(v):
            v = 1 if v is None else v
            return (v,) * n if isinstance(v, int) else tuple(v)
        dilation = each(self.kernel_dilation)
        padding = nn.linear.canonicalize_padding(self.padding, n)
        if padding in ("CIRCULAR", "REFLECT"):
            span = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:n], dilation)]
            pads = [(0, 0)] + [((s - 1) // 2, s // 2) for s in span] + [(0, 0)]
            x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
            padding = "VALID"
        elif padding == "CAUSAL":
            raise ValueError("core.Conv.convolve: 'CAUSAL' padding is not supported.")
        lhs = (0, n + 1) + tuple(range(1, n + 1))
        dims = jax.lax.ConvDimensionNumbers(lhs, (n + 1, n) + tuple(range(n)), lhs)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x, kernel, each(self.strides), padding, lhs_dilation=each(self.input_dilation),
            rhs_dilation=dilation, dimension_numbers=dims, feature_group_count=self.feature_group_count,
            precision=self.precision)
        return y.reshape(batch + y.shape[1:])


def dense(features: int, kernel_axes: Tuple[Optional[str], Optional[str]],
          dtype: Dtype, param_dtype: Dtype, name: str, use_bias: bool = True,
          kernel_init: Optional[Callable] = None) -> DenseND:
    """A 2-D ``DenseND`` (``nn.Dense`` with logical axes): kernel (in, features) on
    ``kernel_axes``, bias on ``kernel_axes[-1:]``; xavier-uniform kernel unless given."""
    return DenseND((features,), contract=1, kernel_axes=tuple(kernel_axes),
                   bias_axes=tuple(kernel_axes[-1:]), use_bias=use_bias,
                   kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype, name=name)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: Optional[str] = None):
    """LayerNorm with ('norm',) partitioned scale/bias and a two-pass variance.

    ``use_fast_variance=False`` matches PyTorch's E[(x-mean)^2] numerics.
    """
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
        scale_init=part(ones, ("norm",)), bias_init=part(zeros, ("norm",)), name=name)


def get_activation(name: str):
    """Activation function by name: gelu (exact), gelu_tanh, quick_gelu, relu, silu."""
    if name == "gelu":
        return lambda x: nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return lambda x: nn.gelu(x, approximate=True)
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "relu":
        return nn.relu
    if name == "silu":
        return nn.silu
    raise ValueError(
        f"Unknown activation {name!r}; valid: gelu, gelu_tanh, quick_gelu, relu, silu.")


def preset_kwargs(model: str, presets: Mapping[str, Mapping[str, Any]], variant: str,
                  overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """A model's kwargs: its preset ``variant`` ('' for none) updated by ``overrides``; one-line
    ValueError naming the valid presets for an unknown one."""
    if variant and variant not in presets:
        raise ValueError(f"Unknown {model} variant {variant!r}; valid: {sorted(presets)}.")
    return {**(presets[variant] if variant else {}), **overrides}


BN_MOMENTUM = 0.9   # flax's running = momentum * running + (1 - momentum) * batch: torch's 0.1
BN_EPS = 1e-5
# torch's default Conv2d init (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class ConvBN(nn.Module):
    """A bias-free conv (``conv``, padding ``kernel // 2`` on each side, as torch's
    ``Conv2d(padding=k // 2)``) then BatchNorm (``bn``: scale / bias params, running ``mean`` /
    ``var`` in the ``batch_stats`` collection; ``train=True`` normalises by the batch's
    statistics, over the GLOBAL batch under a sharded jit, i.e. cross-replica BatchNorm).
    TinyViT's ``Conv2d_BN`` and ResNet's conv + BN. A grouped conv (``groups`` > 1, e.g.
    depthwise) keeps its small kernel replicated whatever ``kernel_axes`` say: with its channel
    axis split, XLA's SPMD partitioner splits the conv by channel and moves the whole batch-split
    activation through all-to-alls (see fmjax/models/convnext.py's ``dwconv``)."""
    features: int
    kernel_size: int = 1
    stride: int = 1
    groups: int = 1
    kernel_axes: Sequence[Optional[str]] = (None, None, None, "embed")
    bn_scale_init: float = 1.0
    kernel_init: Callable = CONV_INIT
    bn_momentum: float = BN_MOMENTUM
    bn_eps: float = BN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        k, p = self.kernel_size, self.kernel_size // 2
        x = Conv(self.features, (k, k), strides=(self.stride, self.stride), padding=((p, p), (p, p)),
                 feature_group_count=self.groups, use_bias=False, dtype=self.dtype,
                 param_dtype=self.param_dtype,
                 kernel_init=part(self.kernel_init, (None,) * 4 if self.groups > 1 else self.kernel_axes),
                 name="conv")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps,
                            use_fast_variance=False, dtype=self.dtype, param_dtype=self.param_dtype,
                            scale_init=part(nn.initializers.constant(self.bn_scale_init), ("norm",)),
                            bias_init=part(zeros, ("norm",)), name="bn")(x)
