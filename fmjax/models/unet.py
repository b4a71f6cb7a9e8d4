"""DDPM U-Net (Ho et al. 2020), laid out so diffusers' ``UNet2DModel`` weights map 1:1.

Defaults are the CIFAR-10 model: base ``channels`` 128, ``channel_mult`` (1, 2, 2, 2),
2 res blocks per level, self-attention at 16x16, dropout 0.1, GroupNorm(32, eps 1e-6),
SiLU, sinusoidal time embedding (sin first, ``freq_shift`` 1) -> MLP to 4x channels,
downsampling convs padded only bottom/right (TF 'SAME', diffusers
``downsample_padding=0``).

Param tree (diffusers name in brackets where it differs):
``conv_in``; ``time_embedding/{linear_1,linear_2}``; ``class_embedding`` (``num_classes``
> 0; ``num_classes + 1`` rows, the last is the null class); ``context_proj``
(``context_dim`` > 0; no diffusers equivalent); ``down_blocks_{i}/{resnets_{j},
attentions_{j}, downsample [downsamplers.0.conv]}``; ``mid_block/{resnets_0, attentions_0,
resnets_1}``; ``up_blocks_{i}/{resnets_{j}, attentions_{j}, upsample [upsamplers.0.conv]}``
(``up_blocks_0`` is the deepest level, as in diffusers); ``conv_norm_out``; ``conv_out``.
A resnet holds ``norm1, conv1, time_emb_proj, norm2, conv2`` and ``conv_shortcut``
(a 1x1 conv, present when in != out channels: diffusers' ``use_in_shortcut``; DDPM's
``nin_shortcut``). An attention holds ``group_norm`` and ``attn/{query,key,value,out}``
(``layers.MultiHeadAttention``; [``to_q, to_k, to_v, to_out.0``]). As in DDPM, ``conv_in``
and the sinusoid have ``channels`` features and level i has ``channels * channel_mult[i]``;
diffusers uses ``block_out_channels[0]`` for both, the same when ``channel_mult[0] == 1``.

Logical axes: conv kernels (None, None, 'conv_in', 'conv_out'), conv biases ('conv_out',),
GroupNorm ('norm',), time MLP (None, 'mlp') -> ('mlp', 'embed'), ``time_emb_proj``
('embed', 'conv_out'), class table ('classes', 'embed'), ``context_proj`` (None, 'embed'),
attention as in ``layers.MultiHeadAttention``. Activations: ('batch', None, None, 'act_embed').

Init follows DDPM: fan-avg uniform (Xavier) kernels and zero biases, with each resnet's
``conv2`` and the final ``conv_out`` at zero (DDPM: scale 1e-10); the attention output
projection keeps ``layers.MultiHeadAttention``'s Xavier init (DDPM: 1e-10).
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models import layers
from fmjax.models import scan as scan_lib
from fmjax.models.timesteps import (FREQ_PRECISIONS, TimestepEmbedding, batch_timesteps,  # noqa: F401
                                    timestep_embedding, timestep_freqs_f32)

Dtype = Any
ACT_AXES = ("batch", None, None, "act_embed")
CONV_AXES = (None, None, "conv_in", "conv_out")
TIME_SCALE_SHIFTS = ("default", "scale_shift")

UNET_PRESETS: Dict[str, Dict[str, Any]] = {
    # Ho et al. CIFAR-10 (35.7M params): the class defaults.
    "ddpm_cifar10": dict(),
    # Ho et al. CelebA-HQ / LSUN 256x256 layout; set dropout as the dataset needs.
    "ddpm_256": dict(channel_mult=(1, 1, 2, 2, 4, 4), sample_size=256, dropout=0.0),
}


def unet_kwargs(variant: Optional[str], **overrides) -> Dict[str, Any]:
    """Preset name ('ddpm_cifar10', 'ddpm_256') -> UNet kwargs, with ``overrides`` applied.

    Sequence fields given as lists (e.g. from a config) become tuples.
    """
    if variant is not None and variant not in UNET_PRESETS:
        raise ValueError(f"Unknown UNet variant {variant!r}; valid: {sorted(UNET_PRESETS)}.")
    kwargs = dict(UNET_PRESETS[variant]) if variant else {}
    kwargs.update(overrides)
    for key in ("channel_mult", "attention_resolutions"):
        if key in kwargs and kwargs[key] is not None:
            kwargs[key] = tuple(kwargs[key])
    return kwargs


def group_norm(groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str):
    """GroupNorm with ('norm',) scale/bias and PyTorch's two-pass variance."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, name=name,
                        scale_init=layers.part(layers.ones, ("norm",)),
                        bias_init=layers.part(layers.zeros, ("norm",)))


def conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype,
         strides: int = 1, padding=None, zero_init: bool = False):
    """``layers.Conv`` (``nn.Conv``, the conv injection point) with logical axes; default padding keeps the size (kernel // 2 each side)."""
    pad = kernel // 2
    padding = ((pad, pad), (pad, pad)) if padding is None else padding
    init = layers.zeros if zero_init else layers.xavier_uniform
    return layers.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                       dtype=dtype, param_dtype=param_dtype, name=name,
                       kernel_init=layers.part(init, CONV_AXES),
                       bias_init=layers.part(layers.zeros, ("conv_out",)))


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` / DDPM ``resnet_block`` (pre-norm, time conditioning).

    h = conv1(silu(norm1(x))); 'default': h = norm2(h + proj(silu(temb))), 'scale_shift':
    h = norm2(h) * (1 + scale) + shift; h = conv2(dropout(silu(h)));
    out = (shortcut(x) + h) / output_scale_factor.
    """
    out_channels: int
    num_groups: int = 32
    eps: float = 1e-6
    dropout: float = 0.0
    time_scale_shift: str = "default"
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, deterministic: bool = True) -> jax.Array:
        """(B, H, W, C_in), (B, T) -> (B, H, W, out_channels)."""
        dt, pdt, c = self.dtype, self.param_dtype, self.out_channels
        h = nn.silu(group_norm(self.num_groups, self.eps, dt, pdt, "norm1")(x))
        h = conv(c, 3, "conv1", dt, pdt)(h)
        scale_shift = self.time_scale_shift == "scale_shift"
        # DenseND: nn.Dense's params, init and numbers, through the dense injection point
        # (fmjax.models.inject), so adapters reach the time / class modulation (LoRA on it:
        # configs/diffusion.py:lora)
        t = layers.DenseND(((2 if scale_shift else 1) * c,), kernel_axes=("embed", "conv_out"),
                           bias_axes=("conv_out",), kernel_init=layers.xavier_uniform, dtype=dt,
                           param_dtype=pdt, name="time_emb_proj")(nn.silu(temb))
        t = t[:, None, None, :]
        norm2 = group_norm(self.num_groups, self.eps, dt, pdt, "norm2")
        if scale_shift:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + t)
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
        h = conv(c, 3, "conv2", dt, pdt, zero_init=True)(h)
        if x.shape[-1] != c:
            x = conv(c, 1, "conv_shortcut", dt, pdt)(x)
        out = (x.astype(h.dtype) + h) / self.output_scale_factor
        return layers.constrain(out, ACT_AXES)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual (diffusers ``Attention`` from the deprecated
    attention block): out = (x + attn(group_norm(x))) / output_scale_factor.

    ``head_dim`` None: one head over all channels (DDPM). ``num_groups`` None: no norm.
    """
    head_dim: Optional[int] = None
    num_groups: Optional[int] = 32
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, hh, ww, c = x.shape
        if self.head_dim is not None and c % self.head_dim:
            raise ValueError(f"{c} channels are not divisible by attention_head_dim="
                             f"{self.head_dim}.")
        heads = c // self.head_dim if self.head_dim else 1
        h = x
        if self.num_groups:
            h = group_norm(self.num_groups, self.eps, self.dtype, self.param_dtype,
                           "group_norm")(h)
        h = layers.constrain(h.reshape(b, hh * ww, c))
        h = layers.MultiHeadAttention(
            heads, attention_impl=self.attention_impl, dtype=self.dtype,
            param_dtype=self.param_dtype, name="attn")(h)
        out = (x.astype(h.dtype) + h.reshape(b, hh, ww, c)) / self.output_scale_factor
        return layers.constrain(out, ACT_AXES)


class _Level(nn.Module):
    """Shared fields of the down / up blocks."""
    out_channels: int
    num_layers: int
    attention: bool
    resample: bool
    num_groups: int = 32
    eps: float = 1e-6
    dropout: float = 0.0
    time_scale_shift: str = "default"
    head_dim: Optional[int] = None
    attention_impl: str = "xla"
    remat: Any = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _resnet(self, j: int):
        cls = scan_lib.remat_module(ResnetBlock, self.remat, static_argnums=(3,))
        return cls(self.out_channels, self.num_groups, self.eps, self.dropout,
                   self.time_scale_shift, dtype=self.dtype, param_dtype=self.param_dtype,
                   name=f"resnets_{j}")

    def _attention(self, j: int):
        cls = scan_lib.remat_module(AttentionBlock, self.remat)
        return cls(self.head_dim, self.num_groups, self.eps, attention_impl=self.attention_impl,
                   dtype=self.dtype, param_dtype=self.param_dtype, name=f"attentions_{j}")


class DownBlock(_Level):
    """diffusers ``DownBlock2D`` / ``AttnDownBlock2D``: ``num_layers`` x (resnet [+ attention]),
    then an optional stride-2 3x3 conv ``downsample``. Returns (h, skip outputs)."""
    downsample_padding: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, deterministic: bool = True
                 ) -> Tuple[jax.Array, List[jax.Array]]:
        """Run the level; every resnet/attention output and the downsampled h are skips."""
        skips = []
        for j in range(self.num_layers):
            x = self._resnet(j)(x, temb, deterministic)
            if self.attention:
                x = self._attention(j)(x)
            skips.append(x)
        if self.resample:
            p = self.downsample_padding
            pad = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
            x = conv(self.out_channels, 3, "downsample", self.dtype, self.param_dtype,
                     strides=2, padding=pad)(x)
            skips.append(layers.constrain(x, ACT_AXES))
        return x, skips


class UpBlock(_Level):
    """diffusers ``UpBlock2D`` / ``AttnUpBlock2D``: per layer concat [h, skip] on channels,
    resnet [+ attention]; then optional nearest x2 + 3x3 conv ``upsample``."""

    @nn.compact
    def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """``skips`` holds this level's ``num_layers`` skips; they are used last first."""
        skips = list(skips)
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = self._resnet(j)(x, temb, deterministic)
            if self.attention:
                x = self._attention(j)(x)
        if self.resample:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = conv(self.out_channels, 3, "upsample", self.dtype, self.param_dtype)(x)
        return layers.constrain(x, ACT_AXES)


class MidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D``: resnet, [attention], resnet; ``output_scale_factor``
    divides every residual sum. ``attn_groups`` None: the attention has no GroupNorm."""
    channels: int
    num_groups: int = 32
    attn_groups: Optional[int] = 32
    attention: bool = True
    eps: float = 1e-6
    dropout: float = 0.0
    time_scale_shift: str = "default"
    output_scale_factor: float = 1.0
    head_dim: Optional[int] = None
    attention_impl: str = "xla"
    remat: Any = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, deterministic: bool = True) -> jax.Array:
        """(B, h, w, channels) -> same shape."""
        res_cls = scan_lib.remat_module(ResnetBlock, self.remat, static_argnums=(3,))
        attn_cls = scan_lib.remat_module(AttentionBlock, self.remat)

        def resnet(j):
            return res_cls(self.channels, self.num_groups, self.eps, self.dropout,
                           self.time_scale_shift, self.output_scale_factor, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=f"resnets_{j}")

        x = resnet(0)(x, temb, deterministic)
        if self.attention:
            x = attn_cls(self.head_dim, self.attn_groups, self.eps, self.output_scale_factor,
                         self.attention_impl, self.dtype, self.param_dtype,
                         name="attentions_0")(x)
        return resnet(1)(x, temb, deterministic)


class UNet(nn.Module):
    """DDPM U-Net denoiser.

    ``__call__(x, t, y=None, context=None, train=False)``:
      x: (B, H, W, C) float images / latents; H, W divisible by 2**(len(channel_mult) - 1).
      t: (B,) or scalar timesteps, int or float (any scale: the sinusoid takes them as is).
      y: (B,) int class labels in [0, num_classes]; ``num_classes`` is the null (CFG
         "unconditional") class, also used for every sample when y is None. Ignored
         (must be None) when ``num_classes == 0``.
      context: (B, context_dim) float vector (e.g. a pooled text embedding), projected by
         ``context_proj`` and added to the time embedding; None means zeros. Needs
         ``context_dim > 0``.
      train: enables dropout (rng stream 'dropout').
    Returns (B, H, W, out) in ``dtype``, out = (out_channels or C) * (2 if learn_sigma).

    Label dropout for classifier-free guidance is the caller's job: pass ``y = num_classes``
    (and/or ``context = 0``) for the dropped samples.

    ``attention_resolutions`` are feature-map sizes relative to ``sample_size``: level i
    (size sample_size / 2**i) gets attention blocks when its size is listed. The layout is
    fixed at construction, so other input sizes run with the same levels attended.

    ``remat``: ``False`` / ``True`` or a policy name (``'none'``, ``'full'``, ``'dots_saveable'``,
    ``'dots_with_no_batch_dims_saveable'``, ``'offload'``; ``fmjax.models.scan``), applied to
    every resnet and attention block. ``scan_layers`` is refused: the levels' blocks differ in
    channels, and a level holds only ``num_res_blocks`` (2-3) of them.
    """

    # The backbone contract (fmjax.models.registry.CAPABILITIES); no annotation: not a field.
    capabilities = frozenset({"denoiser", "class_conditional", "text_conditional"})

    def capabilities_of(self) -> frozenset:
        return frozenset({"denoiser"} | ({"class_conditional"} if self.num_classes > 0 else set())
                         | ({"text_conditional"} if self.context_dim > 0 else set()))

    channels: int = 128
    channel_mult: Tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Tuple[int, ...] = (16,)
    sample_size: int = 32
    dropout: float = 0.1
    num_groups: int = 32
    norm_eps: float = 1e-6
    attention_head_dim: Optional[int] = None  # None: one head per attention block (DDPM)
    time_embed_dim: Optional[int] = None  # None: 4 * channels
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    downsample_padding: int = 0
    resnet_time_scale_shift: str = "default"
    attn_norm_num_groups: Optional[int] = None  # mid attention; None: diffusers' default
    mid_attention: bool = True
    mid_block_scale_factor: float = 1.0
    num_classes: int = 0
    context_dim: int = 0
    out_channels: Optional[int] = None
    learn_sigma: bool = False
    attention_impl: str = "xla"
    remat: Any = False  # False / True or a policy name (fmjax.models.scan.REMAT_POLICIES)
    scan_layers: bool = False  # not supported: a one-line ValueError when True
    # Timestep frequencies: 'float64' (default, correctly rounded) or 'float32' (the exponent
    # rounded as diffusers' get_timestep_embedding does in float32 torch); see timestep_embedding.
    freq_precision: str = "float64"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def level_channels(self) -> Tuple[int, ...]:
        """Output channels of each level."""
        return tuple(self.channels * m for m in self.channel_mult)

    def attention_levels(self) -> Tuple[bool, ...]:
        """Per level, whether its blocks have self-attention."""
        levels = len(self.channel_mult)
        if self.sample_size % 2 ** (levels - 1):
            raise ValueError(f"sample_size={self.sample_size} is not divisible by "
                             f"2**{levels - 1} (len(channel_mult) - 1 downsamplings).")
        sizes = [self.sample_size // 2 ** i for i in range(levels)]
        unknown = sorted(set(self.attention_resolutions) - set(sizes))
        if unknown:
            raise ValueError(f"attention_resolutions {unknown} match no level; the level sizes "
                             f"for sample_size={self.sample_size} are {sizes}.")
        return tuple(s in tuple(self.attention_resolutions) for s in sizes)

    def _check(self, x: jax.Array, y, context):
        if self.scan_layers:
            raise ValueError("UNet does not support scan_layers=True (its blocks differ per "
                             "level); use a DiT, or scan_layers=False.")
        if self.resnet_time_scale_shift not in TIME_SCALE_SHIFTS:
            raise ValueError(f"Unknown resnet_time_scale_shift {self.resnet_time_scale_shift!r};"
                             f" valid: {TIME_SCALE_SHIFTS}.")
        if x.ndim != 4:
            raise ValueError(f"UNet expects (B, H, W, C) inputs, got shape {x.shape}.")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"Input size {x.shape[1]}x{x.shape[2]} is not divisible by "
                             f"{factor} (len(channel_mult) - 1 downsamplings).")
        if y is not None and not self.num_classes:
            raise ValueError("Class labels y were given but num_classes=0; set num_classes.")
        if context is not None and not self.context_dim:
            raise ValueError("A context vector was given but context_dim=0; set context_dim.")

    def _conditioning(self, t, y, context, batch: int) -> jax.Array:
        """Time embedding + class embedding + projected context: (B, time_embed_dim)."""
        tdim = self.time_embed_dim or 4 * self.channels
        emb = timestep_embedding(batch_timesteps(t, batch), self.channels,
                                 self.flip_sin_to_cos, self.freq_shift,
                                 freq_precision=self.freq_precision)
        emb = TimestepEmbedding(tdim, dtype=self.dtype, param_dtype=self.param_dtype,
                                name="time_embedding")(emb.astype(self.dtype))
        if self.num_classes:
            y = jnp.full((batch,), self.num_classes, jnp.int32) if y is None else y
            emb = emb + nn.Embed(
                self.num_classes + 1, tdim, dtype=self.dtype, param_dtype=self.param_dtype,
                name="class_embedding",
                embedding_init=layers.part(nn.initializers.normal(1.0), ("classes", "embed")),
            )(jnp.asarray(y, jnp.int32))
        if self.context_dim:
            context = (jnp.zeros((batch, self.context_dim), self.dtype) if context is None
                       else context.astype(self.dtype))
            emb = emb + nn.Dense(
                tdim, dtype=self.dtype, param_dtype=self.param_dtype, name="context_proj",
                kernel_init=layers.part(layers.xavier_uniform, (None, "embed")),
                bias_init=layers.part(layers.zeros, ("embed",)))(context)
        return emb

    @nn.compact
    def __call__(self, x: jax.Array, t, y: Optional[jax.Array] = None,
                 context: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
        """Predict (B, H, W, out) from noisy ``x`` at time ``t``; see the class docstring."""
        self._check(x, y, context)
        dt, pdt = self.dtype, self.param_dtype
        attn = self.attention_levels()
        chans = self.level_channels()
        deterministic = not train
        b, c_in = x.shape[0], x.shape[-1]
        temb = self._conditioning(t, y, context, b)
        common = dict(num_groups=self.num_groups, eps=self.norm_eps, dropout=self.dropout,
                      time_scale_shift=self.resnet_time_scale_shift,
                      head_dim=self.attention_head_dim, attention_impl=self.attention_impl,
                      remat=self.remat, dtype=dt, param_dtype=pdt)

        h = conv(self.channels, 3, "conv_in", dt, pdt)(x.astype(dt))
        skips = [layers.constrain(h, ACT_AXES)]
        last = len(chans) - 1
        for i, ch in enumerate(chans):
            h, level_skips = DownBlock(
                ch, self.num_res_blocks, attn[i], i != last,
                downsample_padding=self.downsample_padding, name=f"down_blocks_{i}",
                **common)(h, temb, deterministic)
            skips += level_skips

        attn_groups = self.attn_norm_num_groups
        if attn_groups is None and self.resnet_time_scale_shift == "default":
            attn_groups = self.num_groups
        h = MidBlock(chans[-1], self.num_groups, attn_groups, self.mid_attention, self.norm_eps,
                     self.dropout, self.resnet_time_scale_shift, self.mid_block_scale_factor,
                     self.attention_head_dim, self.attention_impl, self.remat, dt, pdt,
                     name="mid_block")(h, temb, deterministic)

        n = self.num_res_blocks + 1
        for k, i in enumerate(reversed(range(len(chans)))):
            level_skips, skips = skips[-n:], skips[:-n]
            h = UpBlock(chans[i], n, attn[i], i != 0, name=f"up_blocks_{k}",
                        **common)(h, level_skips, temb, deterministic)

        h = nn.silu(group_norm(self.num_groups, self.norm_eps, dt, pdt, "conv_norm_out")(h))
        out = (self.out_channels or c_in) * (2 if self.learn_sigma else 1)
        h = conv(out, 3, "conv_out", dt, pdt, zero_init=True)(h)
        return layers.constrain(h, ACT_AXES)
