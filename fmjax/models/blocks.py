"""Transformer blocks: MLP, stochastic depth, layer scale, the pre-norm ``Block`` and the
``Encoder`` stack (unrolled or scanned over layers, see ``fmjax.models.scan``)."""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.models import inject
from fmjax.models import scan as scan_lib
from fmjax.models.attention import MultiHeadAttention
from fmjax.models.core import Dtype, constrain, dense, get_activation, layer_norm, part


class Mlp(nn.Module):
    """Two-layer MLP: fc1 (embed, mlp) -> activation -> dropout -> fc2 (mlp, embed)."""
    mlp_dim: int
    out_dim: Optional[int] = None
    activation: str = "gelu"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Apply the MLP to (B, L, D) tokens."""
        out_dim = self.out_dim or x.shape[-1]
        h = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, self.param_dtype, "fc1")(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = get_activation(self.activation)(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = dense(out_dim, ("mlp", "embed"), self.dtype, self.param_dtype, "fc2")(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return constrain(h)


def stochastic_depth_rates(drop_path: float, total: int) -> list:
    """Per-block drop-path rates rising linearly from 0 to ``drop_path`` over ``total`` blocks
    (torch.linspace(0, drop_path, total), as the Swin / ConvNeXt / TinyViT references build them)."""
    return [drop_path * i / max(total - 1, 1) for i in range(total)]


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample (rng 'dropout')."""
    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True,
                 rate: Optional[jax.Array] = None) -> jax.Array:
        """Zero ``x`` for a random subset of samples and rescale the rest. ``rate``: a per-call
        rate (a traced scalar, e.g. the layer's rate under ``nn.scan``) instead of the field's."""
        if deterministic:
            return x
        if rate is None:
            if self.rate == 0.0:
                return x
            keep = scale = 1.0 - self.rate
        else:
            keep = 1.0 - jnp.asarray(rate, jnp.float32)
            scale = keep.astype(x.dtype)
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / scale, jnp.zeros_like(x))


class LayerScale(nn.Module):
    """Per-channel learned scale (CaiT / DINOv2), initialised to ``init_value``."""
    init_value: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Scale the last axis of ``x``."""
        gamma = self.param("gamma", part(nn.initializers.constant(self.init_value), ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        return x * gamma.astype(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: x + DP(LS(attn(LN(x)))); x + DP(LS(mlp(LN(x))))."""
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    layernorm_eps: float = 1e-6
    layerscale: Optional[float] = None
    activation: str = "gelu"
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True,
                 mask: Optional[jax.Array] = None, bias: Optional[jax.Array] = None,
                 drop_path_rate: Optional[jax.Array] = None) -> jax.Array:
        """Apply the block to (B, L, D) tokens; ``mask`` and ``bias`` (additive attention
        logit bias) as in MultiHeadAttention. ``drop_path_rate``: a per-call stochastic-depth
        rate (a traced scalar) replacing the ``drop_path`` field (as ``ScanBlock`` passes it)."""
        return self._forward(x, deterministic, mask, bias, drop_path_rate)

    def _forward(self, x, deterministic, mask, bias, drop_path_rate):
        """The block's computation (called from the compact ``__call__`` of this class or of
        ``ScanBlock``, so both create the same submodules and params), through the active
        block hooks (``fmjax.models.inject``)."""
        return inject.call_block(self, x, lambda x: self._body(x, deterministic, mask, bias, drop_path_rate))

    def _body(self, x, deterministic, mask, bias, drop_path_rate):
        x = constrain(x)
        h = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm1")(x)
        h = MultiHeadAttention(
            self.num_heads, attention_dropout=self.attention_dropout,
            attention_impl=self.attention_impl, dtype=self.dtype,
            param_dtype=self.param_dtype, name="attn")(h, mask=mask, deterministic=deterministic,
                                                        bias=bias)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        if self.layerscale is not None:
            h = LayerScale(self.layerscale, self.param_dtype, name="ls1")(h)
        x = x + DropPath(self.drop_path)(h, deterministic, drop_path_rate)
        h = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm2")(x)
        h = Mlp(self.mlp_dim, activation=self.activation, dropout=self.dropout,
                dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(
                    h, deterministic=deterministic)
        if self.layerscale is not None:
            h = LayerScale(self.layerscale, self.param_dtype, name="ls2")(h)
        x = x + DropPath(self.drop_path)(h, deterministic, drop_path_rate)
        return constrain(x)


class ScanBlock(Block):
    """``Block`` as an ``nn.scan`` body: ``(x, drop_path_rate, deterministic, mask, bias) ->
    (x, None)``, the same params as ``Block``. ``drop_path_rate`` is the layer's slice of the
    scanned rates (None: the ``drop_path`` field)."""

    @nn.compact
    def __call__(self, x: jax.Array, drop_path_rate: Optional[jax.Array] = None,
                 deterministic: bool = True, mask: Optional[jax.Array] = None,
                 bias: Optional[jax.Array] = None):
        return self._forward(x, deterministic, mask, bias, drop_path_rate), None


class Encoder(nn.Module):
    """A stack of ``Block``s (``block_0`` ...) followed by a final LayerNorm ``norm``.

    ``drop_path`` rises linearly from 0 to the given rate over depth (as in timm).
    ``remat`` recomputes each block's activations in the backward pass: ``False`` / ``True`` or
    a policy name, ``'none'``, ``'full'``, ``'dots_saveable'``,
    ``'dots_with_no_batch_dims_saveable'``, ``'offload'`` (``fmjax.models.scan``).
    ``scan_layers``: one ``nn.scan`` over a ``ScanBlock`` instead of ``depth`` blocks; the params
    are ``block_stack/...`` with a leading (depth,) axis named ``'layers'`` (convert with
    ``fmjax.models.scan.stack_layers`` / ``unstack_layers``). The per-layer drop-path rates are
    the same (scanned in), but the dropout masks are drawn from per-layer split rngs, so they
    differ from the unrolled model's.
    """
    depth: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    drop_path: float = 0.0
    layernorm_eps: float = 1e-6
    layerscale: Optional[float] = None
    activation: str = "gelu"
    attention_impl: str = "xla"
    remat: Any = False  # False / True or a policy name (fmjax.models.scan.REMAT_POLICIES)
    scan_layers: bool = False
    final_norm: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True,
                 mask: Optional[jax.Array] = None, return_prenorm: bool = False,
                 bias: Optional[jax.Array] = None):
        """Run all blocks (and the final norm) on (B, L, D) tokens; ``mask`` (True = attend,
        e.g. causal for a text tower) and ``bias`` (additive logit bias, e.g. BEiT's shared
        relative positions) go to every block's attention. ``return_prenorm``:
        return ``(output, last block's output before the final norm)``."""
        rates = np.linspace(0.0, self.drop_path, self.depth) if self.depth else []
        kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                      layernorm_eps=self.layernorm_eps, layerscale=self.layerscale,
                      activation=self.activation, attention_impl=self.attention_impl,
                      dtype=self.dtype, param_dtype=self.param_dtype)
        if self.scan_layers and self.depth:
            # (x, rate) scanned; deterministic, mask, bias the same for every layer. Without
            # drop_path no rate goes in, so no 'dropout' rng is drawn for it (as unrolled).
            stack = scan_lib.stack_module(
                ScanBlock, self.depth, self.remat, static_argnums=(3,),
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast))
            xs = jnp.asarray(rates, jnp.float32) if self.drop_path else None
            x, _ = stack(drop_path=float(self.drop_path), **kwargs,
                         name="block" + scan_lib.STACK_SUFFIX)(x, xs, deterministic, mask, bias)
        else:
            block_cls = scan_lib.remat_module(Block, self.remat, static_argnums=(2,))
            for i in range(self.depth):
                x = block_cls(drop_path=float(rates[i]), **kwargs,
                              name=f"block_{i}")(x, deterministic, mask, bias)
        prenorm = x
        if self.final_norm:
            x = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm")(x)
        return (constrain(x), constrain(prenorm)) if return_prenorm else constrain(x)
