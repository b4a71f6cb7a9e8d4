"""Multi-head attention with a pluggable implementation, an optional additive logit bias and
the attention injection point (``fmjax.models.inject``)."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models import inject
from fmjax.models.core import DenseND, Dtype, at_least_float32, constrain

ATTENTION_IMPLS = ("xla", "dot_product", "cudnn")
HEAD_AXES = ("batch", "length", "heads", "kv")


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


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections.

    Params: ``query``/``key``/``value`` kernels (embed, heads, kv) + biases
    (heads, kv); ``out`` kernel (heads, kv, embed) + bias (embed,).
    ``attention_impl``: 'xla' (explicit einsum + float32 softmax), 'dot_product'
    (``jax.nn.dot_product_attention``, XLA picks) or 'cudnn' (cuDNN fused
    kernel; GPU only, fp16/bf16 compute).

    The four projections are ``DenseND``s (dense hooks apply to each); ``attend`` (q, k, v ->
    heads' outputs) runs inside the active attention hooks, which may add a logit bias.
    """
    num_heads: int
    head_dim: Optional[int] = None  # default: embed // num_heads
    out_features: Optional[int] = None  # default: input embed dim
    use_bias: bool = True
    key_bias: Optional[bool] = None  # None: use_bias (False: Swin v2's bias-free key)
    attention_dropout: float = 0.0
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv: Optional[jax.Array] = None,
                 mask: Optional[jax.Array] = None, deterministic: bool = True,
                 bias: Optional[jax.Array] = None) -> jax.Array:
        """Attend from ``x`` (B, Q, D) to ``kv`` (B, T, D') (self-attention if None).

        ``mask``: optional boolean, broadcastable to (B, heads, Q, T), True = attend.
        ``bias``: optional additive bias on the logits q.k * scale, broadcastable to
        (B, heads, Q, T) (e.g. relative positions); 'xla' and 'dot_product' only.
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
            bias = self.use_bias if name != "key" or self.key_bias is None else self.key_bias
            return DenseND(
                features, contract=1, use_bias=bias, dtype=self.dtype,
                param_dtype=self.param_dtype, name=name,
                kernel_axes=("embed", "heads", "kv"), bias_axes=("heads", "kv"))(inp)

        q, k, v = proj("query", x), proj("key", kv), proj("value", kv)
        q = nn.with_logical_constraint(q, HEAD_AXES)
        k = nn.with_logical_constraint(k, HEAD_AXES)
        v = nn.with_logical_constraint(v, HEAD_AXES)
        out = inject.call_attention(self, inject.AttentionInputs(q, k, v, bias, mask),
                                    lambda inputs: self.attend(inputs, deterministic))
        out = nn.with_logical_constraint(out, HEAD_AXES)
        out = DenseND(
            (self.out_features or embed,), contract=2, use_bias=self.use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, name="out",
            kernel_axes=("heads", "kv", "embed"), bias_axes=("embed",))(out)
        return constrain(out)

    def attend(self, inputs: inject.AttentionInputs, deterministic: bool = True) -> jax.Array:
        """softmax(q.k * head_dim^-0.5 + bias, masked) . v per head: (B, Q, heads, head_dim)."""
        q, k, v, bias, mask = inputs
        scale = q.shape[-1] ** -0.5
        use_dropout = self.attention_dropout > 0.0 and not deterministic
        if bias is not None:
            if self.attention_impl == "cudnn":
                raise ValueError(
                    "An attention bias needs attention_impl 'xla' or 'dot_product'; "
                    "'cudnn' (padded fused kernel) does not take one.")
            if jnp.ndim(bias) > 4:
                raise ValueError(f"Attention bias of shape {jnp.shape(bias)} is not "
                                 "broadcastable to (batch, heads, q_len, kv_len).")
        if self.attention_impl == "xla" or use_dropout:
            logits = jnp.einsum("bqhd,bthd->bhqt", q, k) * scale
            logits = at_least_float32(logits)
            if bias is not None:
                logits = logits + jnp.asarray(bias, logits.dtype)
            if mask is not None:
                logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
            if use_dropout:
                probs = nn.Dropout(self.attention_dropout)(probs, deterministic=False)
            return jnp.einsum("bhqt,bthd->bqhd", probs, v)
        if self.attention_impl == "cudnn" and mask is None:
            return _cudnn_attention(q, k, v, scale)
        impl = None if self.attention_impl == "dot_product" else "cudnn"
        if bias is not None:
            bias = jnp.asarray(bias, jnp.float32)
            bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, scale=scale, implementation=impl)
