"""Projection and prediction MLPs of the contrastive / BYOL family, with BatchNorm in
training mode.

One module covers the references' heads (``num_layers`` Linear layers; between them BatchNorm
and ReLU; optionally a BatchNorm after the last one):

- SimCLR (google-research/simclr ``model.py`` ProjectionHead, 'nonlinear'): hidden layers
  Linear without bias (``use_bias and not use_bn``) -> BN (centre and scale) -> ReLU; last
  Linear without bias -> BN with scale, no centre: ``hidden_bias=False, last_bn='scale'``.
- MoCo v3 (facebookresearch/moco-v3 ``moco/builder.py`` ``_build_mlp``): Linear(bias=False)
  -> BN -> ReLU; last Linear(bias=False) -> BN(affine=False) when ``last_bn``:
  ``hidden_bias=False, last_bn='plain'`` (projector) or ``'none'`` (predictor).
- BYOL (deepmind-research/byol ``networks.py`` MLP): Linear (bias) -> BN -> ReLU -> Linear
  (``with_bias=False``): ``hidden_bias=True, last_bias=False, last_bn='none'``.

BatchNorm always uses the statistics of the batch it is given (biased variance, eps 1e-5, as
torch / haiku / TF in training mode; the references never use running statistics for these
heads during pre-training, and the heads are dropped afterwards), so no state is kept. The
input is ``[G, B, D]``: statistics are taken over ``B`` within each group ``G``, i.e. per
view where the reference runs the encoder once per view (MoCo v3, BYOL), over both views
with ``G = 1`` where it concatenates them (SimCLR). Under the jit-sharded step ``B`` is the
global batch, which is the references' synchronised BatchNorm (SyncBN / cross-replica BN).

Param tree: ``fc_{i}/kernel`` [in, out] (``fc_{i}/bias``), ``bn_{i}_scale``, ``bn_{i}_bias``.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models import layers

Dtype = Any
LAST_BN = ("none", "affine", "scale", "plain")


class MLPHead(nn.Module):
    hidden_dim: int = 4096
    out_dim: int = 256
    num_layers: int = 2
    hidden_bias: bool = False
    last_bias: bool = False
    last_bn: str = "none"  # 'none' | 'affine' | 'scale' (no centre: SimCLR) | 'plain' (no affine: MoCo v3)
    bn_eps: float = 1e-5
    # or 'xavier_uniform', 'torch_linear' (kaiming_uniform(a=sqrt 5)), 'normal_0.01' (SimCLR)
    kernel_init: str = "lecun_normal"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup_check(self):
        if self.last_bn not in LAST_BN:
            raise ValueError(f"MLPHead.last_bn={self.last_bn!r}; valid: {LAST_BN}.")
        if self.num_layers < 1:
            raise ValueError(f"MLPHead.num_layers={self.num_layers} must be >= 1.")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[G, B, D] -> [G, B, out_dim] (float32 after the last layer)."""
        self.setup_check()
        if x.ndim != 3:
            raise ValueError(f"MLPHead expects [groups, batch, dim], got shape {x.shape}.")
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            d = self.out_dim if last else self.hidden_dim
            axes = ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")  # alternate: one fsdp dim each
            use_bias = self.last_bias if last else self.hidden_bias
            x = nn.Dense(d, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                         name=f"fc_{i}", kernel_init=layers.part(_init(self.kernel_init), axes),
                         bias_init=layers.part(_bias_init(self.kernel_init, x.shape[-1]), axes[1:]))(x)
            if not last:
                x = nn.relu(self._batch_norm(x, i, True, True))
            elif self.last_bn != "none":
                x = self._batch_norm(x, i, self.last_bn in ("affine", "scale"), self.last_bn == "affine")
        return x.astype(jnp.float32)

    def _batch_norm(self, x, i, scale: bool, center: bool):
        x = x.astype(jnp.float32)
        mean = x.mean(axis=-2, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-2, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.bn_eps)
        axes = ("mlp",) if i % 2 == 0 else ("embed",)
        if scale:
            y = y * self.param(f"bn_{i}_scale", layers.part(nn.initializers.ones, axes), (x.shape[-1],),
                               self.param_dtype)
        if center:
            y = y + self.param(f"bn_{i}_bias", layers.part(nn.initializers.zeros, axes), (x.shape[-1],),
                               self.param_dtype)
        return y.astype(self.dtype)


def _init(name: str):
    if name == "lecun_normal":
        return nn.initializers.lecun_normal()
    if name == "xavier_uniform":
        return nn.initializers.xavier_uniform()
    if name == "torch_linear":  # torch.nn.Linear's default: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
        return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    if name == "truncated_normal":
        return nn.initializers.truncated_normal(0.02)
    if name == "normal_0.01":  # SimCLR's LinearLayer: tf.keras RandomNormal(stddev=0.01)
        return nn.initializers.normal(0.01)
    raise ValueError(f"MLPHead.kernel_init={name!r}; valid: lecun_normal, xavier_uniform, "
                     "torch_linear, truncated_normal, normal_0.01.")


def _bias_init(name: str, fan_in: int):
    if name == "torch_linear":  # U(+-1/sqrt(fan_in))
        bound = 1.0 / max(fan_in, 1) ** 0.5
        return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    return nn.initializers.zeros
