"""Transformer building blocks shared by fmjax's vision models.

Every parameter carries logical axis names (``nn.with_logical_partitioning``)
and activations are constrained on ``('batch', 'length', 'embed')`` so that
``fmjax/parallel/rules.py`` can shard them; outside a mesh both are no-ops.
Modules work equally on boxed (``nn.Partitioned``) and plain param trees.
"""
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
ACT_AXES = ("batch", "length", "embed")
ATTENTION_IMPLS = ("xla", "dot_product", "cudnn")

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
ones = nn.initializers.ones


def constrain(x: jax.Array, axes: Sequence[Optional[str]] = ACT_AXES) -> jax.Array:
    """Logical sharding constraint on an activation (no-op without rules)."""
    return nn.with_logical_constraint(x, tuple(axes))


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


def _cudnn_attention(q, k, v, scale, multiple: int = 64):
    """cuDNN flash attention for any length: pads Q/KV to a multiple of 64 (what the
    kernel supports, e.g. ViT-B/16's 197 tokens are not) and masks the padded keys via
    sequence lengths, then drops the padded queries."""
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    pq, pk = (-lq) % multiple, (-lk) % multiple
    if not (pq or pk):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
    out = jax.nn.dot_product_attention(
        pad(q, pq), pad(k, pk), pad(v, pk), scale=scale, implementation="cudnn",
        query_seq_lengths=jnp.full((b,), lq, jnp.int32),
        key_value_seq_lengths=jnp.full((b,), lk, jnp.int32))
    return out[:, :lq]


class DenseND(nn.Module):
    """``DenseGeneral`` over the last ``contract`` input dims, with the kernel created at its
    full N-D shape (e.g. q/k/v (embed, heads, kv)).

    flax's DenseGeneral initialises kernels flattened to 2-D and unboxes them under
    the ambient mesh, which applies 3-D logical names to a 2-D value and fails; this
    keeps the same param names and shapes, so checkpoints and converters are unchanged.
    """
    features: Tuple[int, ...]
    contract: int = 1
    kernel_axes: Tuple[Optional[str], ...] = ()
    bias_axes: Tuple[Optional[str], ...] = ()
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = tuple(x.shape[-self.contract:])
        kernel = self.param("kernel", part(flat_xavier_uniform(self.contract), self.kernel_axes),
                            in_shape + tuple(self.features), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        dims = (tuple(range(x.ndim - self.contract, x.ndim)), tuple(range(self.contract)))
        y = jax.lax.dot_general(x, kernel, (dims, ((), ())))
        if self.use_bias:
            bias = self.param("bias", part(zeros, self.bias_axes), tuple(self.features),
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


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


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections.

    Params: ``query``/``key``/``value`` kernels (embed, heads, kv) + biases
    (heads, kv); ``out`` kernel (heads, kv, embed) + bias (embed,).
    ``attention_impl``: 'xla' (explicit einsum + float32 softmax), 'dot_product'
    (``jax.nn.dot_product_attention``, XLA picks) or 'cudnn' (cuDNN fused
    kernel; GPU only, fp16/bf16 compute).
    """
    num_heads: int
    head_dim: Optional[int] = None  # default: embed // num_heads
    out_features: Optional[int] = None  # default: input embed dim
    use_bias: bool = True
    attention_dropout: float = 0.0
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv: Optional[jax.Array] = None,
                 mask: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
        """Attend from ``x`` (B, Q, D) to ``kv`` (B, T, D') (self-attention if None).

        ``mask``: optional boolean, broadcastable to (B, heads, Q, T), True = attend.
        """
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"Unknown attention_impl {self.attention_impl!r}; valid: {ATTENTION_IMPLS}.")
        kv = x if kv is None else kv
        embed = x.shape[-1]
        if self.head_dim is None and embed % self.num_heads:
            raise ValueError(f"Width {embed} is not divisible by num_heads={self.num_heads}.")
        head_dim = self.head_dim or embed // self.num_heads
        features = (self.num_heads, head_dim)

        def proj(name, inp):
            return DenseND(
                features, contract=1, use_bias=self.use_bias, dtype=self.dtype,
                param_dtype=self.param_dtype, name=name,
                kernel_axes=("embed", "heads", "kv"), bias_axes=("heads", "kv"))(inp)

        q, k, v = proj("query", x), proj("key", kv), proj("value", kv)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
        v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))
        scale = head_dim ** -0.5
        use_dropout = self.attention_dropout > 0.0 and not deterministic
        if self.attention_impl == "xla" or use_dropout:
            logits = jnp.einsum("bqhd,bthd->bhqt", q, k) * scale
            logits = logits.astype(jnp.float32)
            if mask is not None:
                logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
            if use_dropout:
                probs = nn.Dropout(self.attention_dropout)(probs, deterministic=False)
            out = jnp.einsum("bhqt,bthd->bqhd", probs, v)
        elif self.attention_impl == "cudnn" and mask is None:
            out = _cudnn_attention(q, k, v, scale)
        else:
            impl = None if self.attention_impl == "dot_product" else "cudnn"
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, scale=scale, implementation=impl)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        out = DenseND(
            (self.out_features or embed,), contract=2, use_bias=self.use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, name="out",
            kernel_axes=("heads", "kv", "embed"), bias_axes=("embed",))(out)
        return constrain(out)


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
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1",
                     kernel_init=part(xavier_uniform, ("embed", "mlp")),
                     bias_init=part(zeros, ("mlp",)))(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = get_activation(self.activation)(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = nn.Dense(out_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2",
                     kernel_init=part(xavier_uniform, ("mlp", "embed")),
                     bias_init=part(zeros, ("embed",)))(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return constrain(h)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample (rng 'dropout')."""
    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Zero ``x`` for a random subset of samples and rescale the rest."""
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


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


def patch_grid(shape, patch_size: int) -> Tuple[int, int]:
    """(H/p, W/p) of a (B, H, W, C) ``shape``; ValueError unless p divides H and W."""
    hh, ww = shape[1], shape[2]
    if hh % patch_size or ww % patch_size:
        raise ValueError(f"Image size {hh}x{ww} is not divisible by patch_size={patch_size}.")
    return hh // patch_size, ww // patch_size


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, p*p*C), per patch: p rows, p cols, channels last.

    Same order as the MAE reference (``nchpwq -> nhwpqc``) and HF ``ViTMAE.patchify``.
    """
    b, _, _, c = images.shape
    p = patch_size
    h, w = patch_grid(images.shape, p)
    x = images.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * w, p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, grid: Optional[Tuple[int, int]] = None,
               channels: int = 3) -> jax.Array:
    """Inverse of ``patchify``: (B, h*w, p*p*C) -> (B, h*p, w*p, C); square grid if None."""
    b, n, _ = patches.shape
    p = patch_size
    if grid is None:
        h = w = int(round(n ** 0.5))
        if h * w != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid=(h, w).")
    else:
        h, w = grid
    x = patches.reshape(b, h, w, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, channels)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding as a Dense over flattened patches.

    Equivalent to a conv with kernel = stride = patch_size; the kernel is shaped
    (p*p*C, embed) with axes ('patch', 'embed') and the patch vector ordered as
    in ``patchify`` (a PyTorch conv weight (D, C, p, p) maps to it via
    ``w.transpose(2, 3, 1, 0).reshape(-1, D)``). Returns (B, h*w, embed).
    """
    features: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """Embed (B, H, W, C) images into (B, num_patches, features) tokens."""
        x = patchify(images, self.patch_size)
        x = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="proj",
                     kernel_init=part(xavier_uniform, ("patch", "embed")),
                     bias_init=part(zeros, ("embed",)))(x)
        return constrain(x)


class ConvStem(PatchEmbed):
    """Convolutional patch embedding ("Early convolutions help transformers see better",
    Xiao et al. 2021): log2(patch_size) 3x3 stride-2 convs, each followed by a LayerNorm
    over channels and GELU (the paper's BatchNorm + ReLU, without batch statistics), with
    channels doubling up to ``features / 2``, then a 1x1 conv to ``features``. Same output
    as ``PatchEmbed`` - (B, H/p * W/p, features) - but with overlapping receptive fields,
    which makes small objects easier to see. ``patch_size`` must be a power of two >= 2.
    Same fields as ``PatchEmbed`` (a drop-in replacement).
    """

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        n = p.bit_length() - 1
        if p < 2 or 2 ** n != p:
            raise ValueError(f"stem='conv' needs a power-of-two patch_size >= 2, got {p}; "
                             "use stem='patch'.")
        patch_grid(images.shape, p)  # stride-2 convs would round a partial patch up
        x = images
        for i in range(n):
            ch = max(self.features // 2 ** (n - i), 8)
            x = nn.Conv(ch, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                        param_dtype=self.param_dtype, name=f"conv_{i}",
                        kernel_init=part(nn.initializers.lecun_normal(),
                                         (None, None, "conv_in", "conv_out")),
                        bias_init=part(zeros, ("conv_out",)))(x)
            x = nn.gelu(layer_norm(1e-6, self.dtype, self.param_dtype, f"norm_{i}")(x),
                        approximate=False)
        x = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="proj",
                     kernel_init=part(xavier_uniform, ("conv_out", "embed")),
                     bias_init=part(zeros, ("embed",)))(x)
        return constrain(x.reshape(images.shape[0], -1, self.features))


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE reference 1-D sin-cos embedding: (M,) positions -> (M, D) = [sin | cos]."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}.")
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: Union[int, Tuple[int, int]],
                            cls_token: bool = False) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, exactly as facebookresearch/mae.

    Returns float32 (h*w [+1], embed_dim), with a zero row first if ``cls_token``.
    As in the reference, ``np.meshgrid(grid_w, grid_h)`` puts the column index in
    grid[0], so the layout is [sin(col) | cos(col) | sin(row) | cos(row)].
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}.")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    grid_h = np.arange(gh, dtype=np.float32)
    grid_w = np.arange(gw, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    pos = np.concatenate([emb_h, emb_w], axis=1)
    if cls_token:
        pos = np.concatenate([np.zeros([1, embed_dim]), pos], axis=0)
    return pos.astype(np.float32)


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
                 mask: Optional[jax.Array] = None) -> jax.Array:
        """Apply the block to (B, L, D) tokens; ``mask`` as in MultiHeadAttention."""
        x = constrain(x)
        h = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm1")(x)
        h = MultiHeadAttention(
            self.num_heads, attention_dropout=self.attention_dropout,
            attention_impl=self.attention_impl, dtype=self.dtype,
            param_dtype=self.param_dtype, name="attn")(h, mask=mask, deterministic=deterministic)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        if self.layerscale is not None:
            h = LayerScale(self.layerscale, self.param_dtype, name="ls1")(h)
        x = x + DropPath(self.drop_path)(h, deterministic=deterministic)
        h = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm2")(x)
        h = Mlp(self.mlp_dim, activation=self.activation, dropout=self.dropout,
                dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(
                    h, deterministic=deterministic)
        if self.layerscale is not None:
            h = LayerScale(self.layerscale, self.param_dtype, name="ls2")(h)
        x = x + DropPath(self.drop_path)(h, deterministic=deterministic)
        return constrain(x)


class Encoder(nn.Module):
    """A stack of ``Block``s (``block_0`` ...) followed by a final LayerNorm ``norm``.

    ``drop_path`` rises linearly from 0 to the given rate over depth (as in timm).
    ``remat`` recomputes each block's activations in the backward pass.
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
    remat: bool = False
    final_norm: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True,
                 mask: Optional[jax.Array] = None, return_prenorm: bool = False):
        """Run all blocks (and the final norm) on (B, L, D) tokens; ``mask`` (True = attend,
        e.g. causal for a text tower) goes to every block's attention. ``return_prenorm``:
        return ``(output, last block's output before the final norm)``."""
        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        rates = np.linspace(0.0, self.drop_path, self.depth) if self.depth else []
        for i in range(self.depth):
            x = block_cls(
                num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                drop_path=float(rates[i]), layernorm_eps=self.layernorm_eps,
                layerscale=self.layerscale, activation=self.activation,
                attention_impl=self.attention_impl, dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"block_{i}")(x, deterministic, mask)
        prenorm = x
        if self.final_norm:
            x = layer_norm(self.layernorm_eps, self.dtype, self.param_dtype, "norm")(x)
        return (constrain(x), constrain(prenorm)) if return_prenorm else constrain(x)
