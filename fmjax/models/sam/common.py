"""Layers shared by SAM's image encoder, prompt encoder and mask decoder.

``SamAttention`` is the one attention of all three parts: separate q / k / v inputs (the mask
decoder attends from tokens with positional encodings added to queries and keys but not to
values), an inner width ``internal_dim`` (the decoder's downsampled cross-attention), and an
optional decomposed relative-position logit bias (the image encoder). Its projections are
``core.DenseND`` named ``query`` / ``key`` / ``value`` / ``out`` (kernels (embed, heads, kv) and
(heads, kv, embed), as ``attention.MultiHeadAttention``), and its core runs inside the
attention hooks (``fmjax.models.inject``), so LoRA / prefix / quantisation adapters apply to
SAM as to the ViT.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.models import inject
from fmjax.models.core import Conv, DenseND, Dtype, dense, layer_norm, part, zeros

HEAD_AXES = ("batch", "length", "heads", "kv")


# -- Windows (image encoder) ----------------------------------------------------------------
def window_partition(x: jax.Array, window: int) -> Tuple[jax.Array, Tuple[int, int]]:
    """(B, H, W, C) -> ((B * nh * nw, window, window, C), (Hp, Wp)): zero-pads H and W up to
    multiples of ``window`` (bottom / right), then cuts non-overlapping windows in row-major
    window order (SAM's / HF's ``window_partition``)."""
    b, h, w, c = x.shape
    ph, pw = (-h) % window, (-w) % window
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // window, window, wp // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: jax.Array, window: int, padded: Tuple[int, int],
                       original: Tuple[int, int]) -> jax.Array:
    """Inverse of ``window_partition``: (B * nh * nw, window, window, C) -> (B, H, W, C)."""
    hp, wp = padded
    h, w = original
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, -1)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :]


# -- Decomposed relative positions (image encoder) ------------------------------------------
def _resize_linear(table: jax.Array, size: int) -> jax.Array:
    """(L, C) -> (size, C) as ``F.interpolate(mode='linear', align_corners=False)`` along L."""
    n = table.shape[0]
    if n == size:
        return table
    # float32 source coordinates, as PyTorch computes them on CPU
    src = np.maximum((np.arange(size, dtype=np.float32) + np.float32(0.5)) * np.float32(n / size)
                     - np.float32(0.5), np.float32(0.0))
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    lam = jnp.asarray((src - i0.astype(np.float32))[:, None], table.dtype)
    return table[i0] * (1 - lam) + table[i1] * lam


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """SAM's ``get_rel_pos``: the (q_size, k_size, C) relative-position embeddings of a
    (2 * max(q, k) - 1, C) table, linearly resized first if it was built for another size;
    the shorter side's coordinates are scaled when q and k differ."""
    max_rel = int(2 * max(q_size, k_size) - 1)
    table = _resize_linear(rel_pos, max_rel)
    q_coords = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[rel.astype(np.int64)]


def decomposed_rel_pos(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array,
                       q_size: Tuple[int, int], k_size: Tuple[int, int]) -> jax.Array:
    """SAM's ``add_decomposed_rel_pos`` as an additive logit bias (MViTv2): ``q`` (B, qh*qw,
    heads, C), unscaled -> (B, heads, qh*qw, kh*kw) with bias[(i, j), (k, l)] =
    q_ij . Rh[i, k] + q_ij . Rw[j, l]."""
    (qh, qw), (kh, kw) = q_size, k_size
    rh = get_rel_pos(qh, kh, rel_pos_h).astype(q.dtype)
    rw = get_rel_pos(qw, kw, rel_pos_w).astype(q.dtype)
    b, _, n, c = q.shape
    r_q = q.reshape(b, qh, qw, n, c)
    rel_h = jnp.einsum("bhwnc,hkc->bnhwk", r_q, rh)
    rel_w = jnp.einsum("bhwnc,wkc->bnhwk", r_q, rw)
    bias = rel_h[..., :, None] + rel_w[..., None, :]
    return bias.reshape(b, n, qh * qw, kh * kw)


def _attend(inputs: inject.AttentionInputs, dtype) -> jax.Array:
    """softmax(q.k * head_dim^-0.5 + bias) . v, float32 logits: (B, Q, heads, head_dim)."""
    q, k, v, bias, mask = inputs
    logits = jnp.einsum("bqhd,bthd->bhqt", q, k) * (q.shape[-1] ** -0.5)
    logits = logits.astype(jnp.float32)
    if bias is not None:
        logits = logits + jnp.asarray(bias, jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("bhqt,bthd->bqhd", probs, v)


class SamAttention(nn.Module):
    """Attention from ``q`` (B, Q, D) to keys ``k`` / values ``v`` (B, T, D) with inner width
    ``internal_dim`` (default D; the decoder's cross-attention uses D / downsample_rate) split
    into ``num_heads``; output width D. ``rel_pos_size=(h, w)``: the query grid the
    decomposed relative-position tables are built for (params ``rel_pos_h`` (2h-1, head_dim),
    ``rel_pos_w``); ``__call__(..., grid=(h, w))`` then adds the bias for the actual grid."""
    num_heads: int
    internal_dim: Optional[int] = None
    use_bias: bool = True
    rel_pos_size: Optional[Tuple[int, int]] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array,
                 grid: Optional[Tuple[int, int]] = None) -> jax.Array:
        embed = q.shape[-1]
        internal = self.internal_dim or embed
        if internal % self.num_heads:
            raise ValueError(f"internal_dim {internal} is not divisible by num_heads={self.num_heads}.")
        head_dim = internal // self.num_heads

        def proj(name, x):
            y = DenseND((self.num_heads, head_dim), contract=1, use_bias=self.use_bias,
                        dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                        kernel_axes=("embed", "heads", "kv"), bias_axes=("heads", "kv"))(x)
            return nn.with_logical_constraint(y, HEAD_AXES)

        q, k, v = proj("query", q), proj("key", k), proj("value", v)
        bias = None
        if self.rel_pos_size is not None:
            h, w = self.rel_pos_size
            rel_h = self.param("rel_pos_h", part(zeros, (None, "kv")), (2 * h - 1, head_dim),
                               self.param_dtype)
            rel_w = self.param("rel_pos_w", part(zeros, (None, "kv")), (2 * w - 1, head_dim),
                               self.param_dtype)
            grid = grid or (h, w)
            bias = decomposed_rel_pos(q, rel_h, rel_w, grid, grid)
        out = inject.call_attention(self, inject.AttentionInputs(q, k, v, bias, None),
                                    lambda inputs: _attend(inputs, self.dtype))
        out = nn.with_logical_constraint(out, HEAD_AXES)
        return DenseND((embed,), contract=2, use_bias=True, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="out",
                       kernel_axes=("heads", "kv", "embed"), bias_axes=("embed",))(out)


def LayerNorm2d(eps: float = 1e-6, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                name: Optional[str] = None):
    """SAM's channels-first LayerNorm (``LayerNorm2d`` / HF ``SamLayerNorm``) on NHWC maps: a
    LayerNorm over channels with PyTorch's two-pass variance (``core.layer_norm``)."""
    return layer_norm(eps, dtype, param_dtype, name)


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, use_bias: bool = True,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: Optional[str] = None):
    """An NHWC ``nn.Conv`` with PyTorch's default (kaiming-uniform a=sqrt(5)) init; params
    ``kernel`` (kh, kw, in, out), ``bias`` (out,)."""
    init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    return Conv(features, (kernel, kernel), strides=(stride, stride),
                padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                dtype=dtype, param_dtype=param_dtype, name=name,
                kernel_init=part(init, (None, None, None, "embed")),
                bias_init=part(zeros, ("embed",)))


class ConvTranspose2x2(nn.Module):
    """``nn.ConvTranspose2d(kernel_size=2, stride=2)`` on NHWC: every input pixel writes a
    2x2 output patch. Params ``kernel`` (in, 2, 2, out) (PyTorch's (in, out, 2, 2) with the
    output channels last) and ``bias`` (out,)."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=(1, 2, 3),
                                                out_axis=0)
        kernel = self.param("kernel", part(init, ("embed", None, None, None)),
                            (c, 2, 2, self.features), self.param_dtype)
        bias = self.param("bias", part(zeros, (None,)), (self.features,), self.param_dtype)
        y = jnp.einsum("bhwc,cijo->bhiwjo", x.astype(self.dtype), kernel.astype(self.dtype))
        return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class FeedForward(nn.Module):
    """SAM's ``MLP`` (HF ``SamFeedForward``): ``num_layers`` dense layers with ReLU between
    them (``proj_in``, ``layers_{i}``, ``proj_out``), optional sigmoid on the output."""
    hidden_dim: int
    output_dim: int
    num_layers: int
    sigmoid_output: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = lambda f, name: dense(f, ("embed", "mlp"), self.dtype, self.param_dtype, name)  # noqa: E731
        x = jax.nn.relu(d(self.hidden_dim, "proj_in")(x))
        for i in range(self.num_layers - 2):
            x = jax.nn.relu(d(self.hidden_dim, f"layers_{i}")(x))
        x = d(self.output_dim, "proj_out")(x)
        return jax.nn.sigmoid(x) if self.sigmoid_output else x
