"""Diffusion Transformer (Peebles & Xie 2023), following facebookresearch/DiT models.py.

Patchify (``x_embedder``, a Dense over p*p*C patches), fixed 2-D sin-cos positions,
timestep embedder (256-d sinusoid [cos | sin] -> MLP), label embedder with a null class
for classifier-free guidance, optional context-vector projection, ``depth`` adaLN-Zero
blocks, final adaLN layer + Dense to p*p*out, unpatchify.

Param tree: ``x_embedder/proj``, ``t_embedder/{linear_1,linear_2}`` (reference
``mlp.0`` / ``mlp.2``), ``y_embedder`` (``embedding``: ``num_classes + 1`` rows, reference
``embedding_table``), ``context_proj``, ``blocks_{i}/{adaLN_modulation, attn/{query,key,
value,out}, mlp/{fc1,fc2}}`` (reference: fused ``attn.qkv``, ``attn.proj``,
``adaLN_modulation.1``; norm1/norm2 have no params), ``final_layer/{adaLN_modulation,
linear}``.

Init as the reference: Xavier-uniform Dense kernels, zero biases, normal(0.02) timestep
MLP and label table, and zero adaLN modulations and final linear, so the output is exactly
zero at init. (q/k/v are separate (embed, heads, kv) kernels, each Xavier over
(embed, embed); the reference's fused qkv is Xavier over (embed, 3*embed).)
"""
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models import layers
from fmjax.models import scan as scan_lib
from fmjax.models.timesteps import (FREQ_PRECISIONS, TimestepEmbedding, batch_timesteps,  # noqa: F401
                                    timestep_embedding, timestep_freqs_f32)

Dtype = Any

# name -> (width, depth, num_heads); mlp_dim = 4 * width.
DIT_PRESETS: Dict[str, Dict[str, int]] = {
    "S": dict(width=384, depth=12, num_heads=6),
    "B": dict(width=768, depth=12, num_heads=12),
    "L": dict(width=1024, depth=24, num_heads=16),
    "XL": dict(width=1152, depth=28, num_heads=16),
}
DIT_PATCHES = (2, 4, 8)


def dit_kwargs(variant: str, **overrides) -> Dict[str, Any]:
    """Parse 'XL/2' into ``dict(width, depth, num_heads, mlp_dim, patch_size)``.

    ``overrides`` replace preset values, e.g. ``dit_kwargs('S/2', width=64, depth=2,
    num_heads=2, mlp_dim=256)``. Raises ValueError naming the valid variants.
    """
    name, sep, patch = str(variant).partition("/")
    if name not in DIT_PRESETS or not sep or not patch.isdigit() or int(patch) not in DIT_PATCHES:
        valid = ", ".join(f"{k}/{p}" for k in DIT_PRESETS for p in DIT_PATCHES)
        raise ValueError(f"Unknown DiT variant {variant!r}; valid: {valid}.")
    kwargs = dict(DIT_PRESETS[name])
    kwargs.update(mlp_dim=4 * kwargs["width"], patch_size=int(patch))
    kwargs.update(overrides)
    return kwargs


def _timestep_embedding_f32(t: jax.Array, dim: int, freq_shift: float = 0.0,
                            max_period: float = 10000.0) -> jax.Array:
    """facebookresearch/DiT ``TimestepEmbedder.timestep_embedding``: the exponent
    ``-log(max_period) * arange(half) / (half - shift)`` rounded in float32 as torch does
    (float32 scalar times float32 arange, then the float32 division), exp correctly rounded
    from it; [cos | sin]."""
    half = dim // 2
    freqs = jnp.asarray(timestep_freqs_f32(half, freq_shift, max_period))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: x * (1 + scale) + shift, with (B, D) shift/scale broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _plain_norm(eps: float, dtype: Dtype, name: str):
    """LayerNorm without affine params (reference ``elementwise_affine=False``)."""
    return nn.LayerNorm(epsilon=eps, use_scale=False, use_bias=False, dtype=dtype,
                        use_fast_variance=False, name=name)


def _zero_dense(features: int, axes, dtype: Dtype, param_dtype: Dtype, name: str):
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=layers.part(layers.zeros, axes),
                    bias_init=layers.part(layers.zeros, axes[-1:]))


class DiTBlock(nn.Module):
    """adaLN-Zero block: c -> (shift, scale, gate) x 2; x += gate * f(modulate(LN(x)))."""
    num_heads: int
    mlp_dim: int
    layernorm_eps: float = 1e-6
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """(B, L, D) tokens, (B, D) conditioning -> (B, L, D)."""
        return self._forward(x, c)

    def _forward(self, x: jax.Array, c: jax.Array) -> jax.Array:
        x = layers.constrain(x)
        d = x.shape[-1]
        mod = _zero_dense(6 * d, ("embed", "mlp"), self.dtype, self.param_dtype,
                          "adaLN_modulation")(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)
        h = modulate(_plain_norm(self.layernorm_eps, self.dtype, "norm1")(x),
                     shift_msa, scale_msa)
        h = layers.MultiHeadAttention(
            self.num_heads, attention_impl=self.attention_impl, dtype=self.dtype,
            param_dtype=self.param_dtype, name="attn")(h)
        x = x + gate_msa[:, None] * h
        h = modulate(_plain_norm(self.layernorm_eps, self.dtype, "norm2")(x),
                     shift_mlp, scale_mlp)
        h = layers.Mlp(self.mlp_dim, activation="gelu_tanh", dtype=self.dtype,
                       param_dtype=self.param_dtype, name="mlp")(h)
        return layers.constrain(x + gate_mlp[:, None] * h)


class DiTScanBlock(DiTBlock):
    """``DiTBlock`` as an ``nn.scan`` body: ``(x, c) -> (x, None)``, the same params."""

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array):
        return self._forward(x, c), None


class FinalLayer(nn.Module):
    """adaLN (shift, scale) on a plain LayerNorm, then a zero-initialised Dense."""
    features: int
    layernorm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """(B, L, D), (B, D) -> (B, L, features)."""
        d = x.shape[-1]
        mod = _zero_dense(2 * d, ("embed", "mlp"), self.dtype, self.param_dtype,
                          "adaLN_modulation")(nn.silu(c))
        shift, scale = jnp.split(mod, 2, -1)
        x = modulate(_plain_norm(self.layernorm_eps, self.dtype, "norm_final")(x), shift, scale)
        return _zero_dense(self.features, ("embed", "patch"), self.dtype, self.param_dtype,
                           "linear")(x)


class DiT(nn.Module):
    """Diffusion Transformer denoiser; same call as ``fmjax.models.unet.UNet``.

    ``__call__(x, t, y=None, context=None, train=False)``:
      x: (B, H, W, C) float latents / images, H and W divisible by ``patch_size``.
      t: (B,) or scalar timesteps, int or float.
      y: (B,) int labels in [0, num_classes]; ``num_classes`` is the null class (CFG), used
         for all samples when y is None. Must be None when ``num_classes == 0``.
      context: (B, context_dim) float vector projected and added to the conditioning;
         None means zeros. Needs ``context_dim > 0``.
      train: unused (DiT has no dropout); kept for the common signature.
    Returns (B, H, W, out) in ``dtype``, out = (out_channels or C) * (2 if learn_sigma).
    Label dropout for CFG is the caller's job (pass ``y = num_classes``).

    ``remat``: ``False`` / ``True`` or a policy name (``'none'``, ``'full'``, ``'dots_saveable'``,
    ``'dots_with_no_batch_dims_saveable'``, ``'offload'``; ``fmjax.models.scan``).
    ``scan_layers=True``: one ``nn.scan`` over the blocks, params ``blocks_stack/...`` with a
    leading (depth,) axis (logical ``'layers'``) instead of ``blocks_{i}/...``;
    ``fmjax.models.scan.stack_layers`` / ``unstack_layers`` convert.
    """

    # The backbone contract (fmjax.models.registry.CAPABILITIES); no annotation: not a field.
    capabilities = frozenset({"denoiser", "class_conditional", "text_conditional"})

    def capabilities_of(self) -> frozenset:
        return frozenset({"denoiser"} | ({"class_conditional"} if self.num_classes > 0 else set())
                         | ({"text_conditional"} if self.context_dim > 0 else set()))

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    num_classes: int = 0
    context_dim: int = 0
    out_channels: Optional[int] = None
    learn_sigma: bool = False
    frequency_embedding_size: int = 256
    freq_shift: float = 0.0  # reference DiT: 0; diffusers' DiTTransformer2DModel: 1
    # Timestep frequencies exp(-ln(10000) k / (half - shift)): 'float64' (default) computes the
    # exponent in float64 and rounds exp correctly; 'float32' rounds the exponent as
    # facebookresearch/DiT's TimestepEmbedder does in float32 torch (the exp then matches torch's
    # CPU float32 exp in 126 of 128 frequencies; the default differs in 85, by up to 6e-5 in the
    # embedding at t ~ 1000).
    freq_precision: str = "float64"
    label_init_std: float = 0.02  # reference DiT's label table init
    layernorm_eps: float = 1e-6
    attention_impl: str = "xla"
    remat: Any = False  # False / True or a policy name (fmjax.models.scan.REMAT_POLICIES)
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _conditioning(self, t, y, context, batch: int) -> jax.Array:
        """Timestep + label + context embeddings: (B, width)."""
        if self.freq_precision not in FREQ_PRECISIONS:
            raise ValueError(f"freq_precision={self.freq_precision!r}; valid: {', '.join(map(repr, FREQ_PRECISIONS))}.")
        if self.freq_precision == "float64":
            freq = timestep_embedding(batch_timesteps(t, batch), self.frequency_embedding_size,
                                      flip_sin_to_cos=True, freq_shift=self.freq_shift)
        else:
            freq = _timestep_embedding_f32(batch_timesteps(t, batch), self.frequency_embedding_size,
                                           self.freq_shift)
        c = TimestepEmbedding(self.width, init_std=0.02, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="t_embedder")(
                                  freq.astype(self.dtype))
        if self.num_classes:
            y = jnp.full((batch,), self.num_classes, jnp.int32) if y is None else y
            c = c + nn.Embed(
                self.num_classes + 1, self.width, dtype=self.dtype,
                param_dtype=self.param_dtype, name="y_embedder",
                embedding_init=layers.part(nn.initializers.normal(self.label_init_std),
                                              ("classes", "embed")),
            )(jnp.asarray(y, jnp.int32))
        if self.context_dim:
            context = (jnp.zeros((batch, self.context_dim), self.dtype) if context is None
                       else context.astype(self.dtype))
            c = c + nn.Dense(
                self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="context_proj",
                kernel_init=layers.part(layers.xavier_uniform, (None, "embed")),
                bias_init=layers.part(layers.zeros, ("embed",)))(context)
        return c

    @nn.compact
    def __call__(self, x: jax.Array, t, y: Optional[jax.Array] = None,
                 context: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
        """Predict (B, H, W, out) from noisy ``x`` at time ``t``; see the class docstring."""
        del train
        if x.ndim != 4:
            raise ValueError(f"DiT expects (B, H, W, C) inputs, got shape {x.shape}.")
        b, hh, ww, c_in = x.shape
        p = self.patch_size
        if hh % p or ww % p:
            raise ValueError(f"Input size {hh}x{ww} is not divisible by patch_size={p}.")
        if y is not None and not self.num_classes:
            raise ValueError("Class labels y were given but num_classes=0; set num_classes.")
        if context is not None and not self.context_dim:
            raise ValueError("A context vector was given but context_dim=0; set context_dim.")
        grid = (hh // p, ww // p)
        tokens = layers.PatchEmbed(self.width, p, self.dtype, self.param_dtype,
                                   name="x_embedder")(x.astype(self.dtype))
        pos = layers.get_2d_sincos_pos_embed(self.width, grid)
        tokens = layers.constrain(tokens + jnp.asarray(pos, self.dtype)[None])
        c = self._conditioning(t, y, context, b)
        block_args = (self.num_heads, self.mlp_dim, self.layernorm_eps, self.attention_impl,
                      self.dtype, self.param_dtype)
        if self.scan_layers and self.depth:
            stack = scan_lib.stack_module(DiTScanBlock, self.depth, self.remat,
                                          in_axes=(nn.broadcast,))
            tokens, _ = stack(*block_args, name="blocks" + scan_lib.STACK_SUFFIX)(tokens, c)
        else:
            block_cls = scan_lib.remat_module(DiTBlock, self.remat)
            for i in range(self.depth):
                tokens = block_cls(*block_args, name=f"blocks_{i}")(tokens, c)
        out = (self.out_channels or c_in) * (2 if self.learn_sigma else 1)
        tokens = FinalLayer(p * p * out, self.layernorm_eps, self.dtype, self.param_dtype,
                            name="final_layer")(tokens, c)
        return layers.unpatchify(tokens, p, grid=grid, channels=out)
