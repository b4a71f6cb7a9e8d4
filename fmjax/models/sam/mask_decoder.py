"""SAM's mask decoder: a two-way transformer between prompt tokens and the image embedding,
then an upscaling path and hypernetwork MLPs that turn each mask token into a mask.

- output tokens: ``iou_token`` (1, D) and ``mask_tokens`` (num_multimask_outputs + 1, D),
  prepended to the sparse prompt tokens;
- ``TwoWayTransformer``: ``depth`` blocks of (token self-attention, token -> image
  cross-attention, MLP, image -> token cross-attention), each followed by a LayerNorm; the
  cross-attentions run at width D / ``attention_downsample_rate``; the prompt tokens' own
  values are their positional encodings (added to queries and keys, not to values; the
  first block's self-attention skips them), the image's is ``dense_pe``; then a final token ->
  image attention and LayerNorm;
- upscaling: 2x2/2 transposed conv to D/4, LayerNorm2d, GELU, 2x2/2 transposed conv to D/8,
  GELU: masks are 4x the embedding grid (256x256 for a 1024 input);
- a 3-layer hypernetwork MLP per mask token (D -> D -> D -> D/8): mask m = its output . the
  upscaled map; an IoU head MLP on the IoU token predicts each mask's IoU;
- ``multimask_output``: masks 1..3 (the ambiguity-aware outputs) else mask 0 only; None:
  all four (mask 0 first), for a caller that needs both from one pass.

Matches transformers' ``SamMaskDecoder`` (its block LayerNorms use ``layer_norm_eps`` 1e-6,
the final one PyTorch's default 1e-5; the original code uses 1e-5 throughout).
"""
from __future__ import annotations


import flax.linen as nn
import jax.numpy as jnp

from fmjax.models.blocks import Mlp
from fmjax.models.core import Dtype, layer_norm, part
from fmjax.models.sam.common import ConvTranspose2x2, FeedForward, LayerNorm2d, SamAttention


class TwoWayAttentionBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    attention_downsample_rate: int = 2
    skip_first_layer_pe: bool = False
    eps: float = 1e-6
    activation: str = "relu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe):
        d = queries.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: layer_norm(self.eps, self.dtype, self.param_dtype, name)  # noqa: E731
        cross = d // self.attention_downsample_rate
        if self.skip_first_layer_pe:
            queries = SamAttention(self.num_heads, name="self_attn", **kw)(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + SamAttention(self.num_heads, name="self_attn", **kw)(q, q, queries)
        queries = ln("norm1")(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = queries + SamAttention(self.num_heads, cross, name="cross_attn_token_to_image",
                                         **kw)(q, k, keys)
        queries = ln("norm2")(queries)
        queries = queries + Mlp(self.mlp_dim, activation=self.activation, name="mlp", **kw)(queries)
        queries = ln("norm3")(queries)
        q, k = queries + query_pe, keys + key_pe
        keys = keys + SamAttention(self.num_heads, cross, name="cross_attn_image_to_token",
                                   **kw)(k, q, queries)
        keys = ln("norm4")(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    eps: float = 1e-6
    final_eps: float = 1e-5
    activation: str = "relu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embedding, image_pe, point_embedding):
        """image_embedding / image_pe (B, HW, D), point_embedding (B, N, D) ->
        (queries (B, N, D), keys (B, HW, D))."""
        queries, keys = point_embedding, image_embedding
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(
                self.num_heads, self.mlp_dim, self.attention_downsample_rate,
                skip_first_layer_pe=(i == 0), eps=self.eps, activation=self.activation,
                dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")(
                    queries, keys, point_embedding, image_pe)
        q, k = queries + point_embedding, keys + image_pe
        d = queries.shape[-1]
        queries = queries + SamAttention(
            self.num_heads, d // self.attention_downsample_rate, dtype=self.dtype,
            param_dtype=self.param_dtype, name="final_attn_token_to_image")(q, k, keys)
        queries = layer_norm(self.final_eps, self.dtype, self.param_dtype, "norm_final_attn")(queries)
        return queries, keys


class SamMaskDecoder(nn.Module):
    """See the module docstring. ``__call__(image_embeddings (B, h, w, D), image_pe (h, w, D),
    sparse (B, P, N, D) or None, dense (B, h, w, D), multimask_output)`` ->
    (masks (B, P, M, 4h, 4w) logits, iou_pred (B, P, M)), M = 3 or 1."""
    transformer_dim: int = 256
    num_multimask_outputs: int = 3
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    eps: float = 1e-6
    final_eps: float = 1e-5
    upscale_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embeddings, image_pe, sparse, dense, multimask_output: bool = True):
        b, h, w, d = image_embeddings.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        num_mask_tokens = self.num_multimask_outputs + 1
        emb = part(nn.initializers.normal(1.0), (None, "embed"))
        iou_token = self.param("iou_token", emb, (1, d), self.param_dtype)
        mask_tokens = self.param("mask_tokens", emb, (num_mask_tokens, d), self.param_dtype)
        p = sparse.shape[1] if sparse is not None else 1
        out_tokens = jnp.concatenate([iou_token, mask_tokens], axis=0).astype(self.dtype)
        tokens = jnp.broadcast_to(out_tokens, (b, p) + out_tokens.shape)
        if sparse is not None:
            tokens = jnp.concatenate([tokens, sparse.astype(self.dtype)], axis=2)
        n = tokens.shape[2]
        tokens = tokens.reshape(b * p, n, d)
        src = (image_embeddings + dense).reshape(b, h * w, d)
        src = jnp.repeat(src, p, axis=0)
        pos = jnp.broadcast_to(image_pe.reshape(-1, h * w, d), (b * p, h * w, d)).astype(self.dtype)
        hs, src = TwoWayTransformer(self.depth, self.num_heads, self.mlp_dim,
                                    self.attention_downsample_rate, self.eps, self.final_eps,
                                    name="transformer", **kw)(src, pos, tokens)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1:1 + num_mask_tokens]

        gelu = lambda x: nn.gelu(x, approximate=False)  # noqa: E731
        up = ConvTranspose2x2(d // 4, name="upscale_conv1", **kw)(src.reshape(b * p, h, w, d))
        up = gelu(LayerNorm2d(self.upscale_eps, name="upscale_norm", **kw)(up))
        up = gelu(ConvTranspose2x2(d // 8, name="upscale_conv2", **kw)(up))
        hyper = jnp.stack([
            FeedForward(d, d // 8, 3, name=f"output_hypernetworks_mlps_{i}", **kw)(mask_tokens_out[:, i])
            for i in range(num_mask_tokens)], axis=1)
        masks = jnp.einsum("bmc,bhwc->bmhw", hyper, up)
        masks = masks.reshape(b, p, num_mask_tokens, 4 * h, 4 * w)
        iou_pred = FeedForward(self.iou_head_hidden_dim, num_mask_tokens, self.iou_head_depth,
                               name="iou_prediction_head", **kw)(iou_token_out).reshape(b, p, -1)
        sl = slice(None) if multimask_output is None else slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, :, sl], iou_pred[:, :, sl]
