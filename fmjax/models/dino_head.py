"""DINO projection head (Caron et al., 2021): MLP -> L2 norm -> weight-normalised last layer.

Param tree: ``mlp_{i}`` (Dense, trunc-normal 0.02, zero bias), ``last_layer_v``
(bottleneck, out_dim), with ``use_bn`` ``bn_{i}_scale`` / ``bn_{i}_bias`` after each hidden
layer, and, unless ``norm_last_layer``, ``last_layer_g`` (1, out_dim)
initialised to 1 — torch's ``weight_norm`` with ``weight_g`` frozen at 1 when
``norm_last_layer`` (the reference's default).

``last_layer_g`` keeps torch's ``weight_g`` layout (the kernel's shape with the normalised
axis kept as 1; torch's is (out_dim, 1) for its transposed weight). It is therefore a 2-D
param, and weight decay applies to it as in the reference, whose ``get_params_groups``
skips only ``.bias`` and 1-D params and so decays ``weight_g``. (A 1-D g, as fmjax had it,
escapes the decay; tests/reference/test_dino_trajectory.py sees the difference.)
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models import layers

Dtype = Any


class DINOHead(nn.Module):
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    norm_last_layer: bool = True
    use_bn: bool = False
    bn_eps: float = 1e-5
    activation: str = "gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, D) backbone features -> (B, out_dim) logits (before the temperature)."""
        act = layers.get_activation(self.activation)
        dims = [self.hidden_dim] * (max(self.num_layers, 1) - 1) + [self.bottleneck_dim]
        for i, d in enumerate(dims):
            axes = ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")  # alternate: one fsdp dim each
            x = nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=f"mlp_{i}",
                         kernel_init=layers.part(nn.initializers.truncated_normal(0.02), axes),
                         bias_init=layers.part(nn.initializers.zeros, axes[1:]))(x)
            if i < len(dims) - 1:
                if self.use_bn:
                    x = self._batch_norm(x, i)
                x = act(x)
        x = x.astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize
        v = self.param("last_layer_v", layers.part(nn.initializers.truncated_normal(0.02),
                                                   ("embed", "classes")),
                       (self.bottleneck_dim, self.out_dim), self.param_dtype)
        w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
        if not self.norm_last_layer:
            g = self.param("last_layer_g", layers.part(nn.initializers.ones, (None, "classes")),
                           (1, self.out_dim), self.param_dtype)
            w = w * g
        return x @ w.astype(jnp.float32)

    def _batch_norm(self, x: jax.Array, i: int) -> jax.Array:
        """The reference's ``use_bn_in_head``: BatchNorm1d after each hidden Linear, in
        training mode (batch statistics over this call's crops; the teacher is never put in
        eval mode during training either). Running statistics are not kept: neither the loss
        nor the kNN features (the backbone's) use them."""
        mean = x.mean(axis=0)
        var = jnp.mean(jnp.square(x - mean), axis=0)
        scale = self.param(f"bn_{i}_scale", layers.part(nn.initializers.ones, ("mlp",)), (x.shape[-1],),
                           self.param_dtype)
        bias = self.param(f"bn_{i}_bias", layers.part(nn.initializers.zeros, ("mlp",)), (x.shape[-1],),
                          self.param_dtype)
        return (x - mean) * jax.lax.rsqrt(var + self.bn_eps) * scale + bias
