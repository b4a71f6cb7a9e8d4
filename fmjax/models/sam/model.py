"""``SAM``: image encoder + prompt encoder + mask decoder (Kirillov et al., 2023).

The image encoder runs once per image (``encode_image``); prompts are cheap to re-run on its
output (``predict``). ``__call__(images, points=, labels=, boxes=, masks=)`` does both and
returns ``{'image_embeddings' (B, h, w, 256), 'masks' (B, P, M, 4h, 4w) low-res logits,
'iou_predictions' (B, P, M)}`` with M = 3 (``multimask_output``) or 1. Prompt layouts are
transformers' (``fmjax.models.sam.prompt_encoder``); images are NHWC, already normalised and
padded to ``image_size`` square.

Presets (``config.model = dict(name='sam', variant='vit_b')``): the paper's ``vit_b``
(768 wide, 12 deep, 12 heads, global attention in blocks 2, 5, 8, 11), ``vit_l`` (1024, 24,
16, (5, 11, 17, 23)) and ``vit_h`` (1280, 32, 16, (7, 15, 23, 31)), all 1024 px, 16 px
patches, 14x14 windows, a 256-channel neck, prompt encoder and decoder (2 blocks, 8 heads,
MLP 2048). Param totals (``tests/models/test_sam.py``, by ``jax.eval_shape``): vit_b
93,735,728, vit_l 312,343,088, vit_h 641,090,864 - equal to transformers' ``SamModel`` with
its tied Fourier matrix counted once (counted on the meta device); the original
``segment_anything`` keeps that matrix as a buffer (256 fewer). The image encoders alone are
89,670,912 / 308,278,272 / 637,026,048 (the paper's "ViT-B 91M, ViT-L 308M, ViT-H 636M").

The defaults are a small CPU model: 64 px images, 8 px patches (an 8x8 embedding grid),
width 64, depth 2 with windows of 4 and block 1 global, a 64-channel neck and decoder.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models.core import Dtype, preset_kwargs
from fmjax.models.sam.image_encoder import SamImageEncoder
from fmjax.models.sam.mask_decoder import SamMaskDecoder
from fmjax.models.sam.prompt_encoder import SamPromptEncoder

_PAPER = dict(image_size=1024, patch_size=16, window_size=14, prompt_dim=256, mask_in_chans=16,
              decoder_depth=2, decoder_heads=8, decoder_mlp_dim=2048, iou_head_hidden_dim=256)
VARIANTS: Dict[str, Dict[str, Any]] = {
    "vit_b": dict(_PAPER, width=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(_PAPER, width=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(_PAPER, width=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def sam_kwargs(variant: str = "", **overrides) -> Dict[str, Any]:
    """``SAM`` kwargs of a preset (``vit_b`` / ``vit_l`` / ``vit_h``) with overrides."""
    return preset_kwargs("SAM", VARIANTS, variant, overrides)


class SAM(nn.Module):
    image_size: int = 64
    patch_size: int = 8
    in_chans: int = 3
    width: int = 64
    depth: int = 2
    num_heads: int = 2
    mlp_dim: Optional[int] = None          # image encoder MLP, default 4 * width
    window_size: int = 4
    global_attn_indexes: Sequence[int] = (1,)
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    qkv_bias: bool = True
    prompt_dim: int = 64                   # neck channels = prompt / decoder width
    mask_in_chans: int = 16
    pe_scale: Optional[float] = None       # random-Fourier init scale (HF: width // 2)
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_mlp_dim: int = 128
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 64
    eps: float = 1e-6
    decoder_final_eps: float = 1e-5
    remat: bool = False                    # the image encoder's blocks recompute in the backward pass
    drop_path: float = 0.0                 # the image encoder's stochastic depth (linear over blocks)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    capabilities = frozenset({"promptable_masks"})   # fmjax.models.registry.CAPABILITIES

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        grid = self.image_size // self.patch_size
        self.image_encoder = SamImageEncoder(
            self.image_size, self.patch_size, self.in_chans, self.width, self.depth, self.num_heads,
            self.mlp_dim, self.prompt_dim, self.window_size, tuple(self.global_attn_indexes),
            self.use_abs_pos, self.use_rel_pos, self.qkv_bias, self.eps, self.eps, remat=self.remat,
            drop_path=self.drop_path, **kw)
        self.prompt_encoder = SamPromptEncoder(
            self.prompt_dim, grid, self.image_size, self.mask_in_chans, 4,
            float(self.pe_scale if self.pe_scale is not None else self.width // 2), self.eps, **kw)
        self.mask_decoder = SamMaskDecoder(
            self.prompt_dim, self.num_multimask_outputs, self.decoder_depth, self.decoder_heads,
            self.decoder_mlp_dim, self.attention_downsample_rate, self.iou_head_depth,
            self.iou_head_hidden_dim, self.eps, self.decoder_final_eps, self.eps, **kw)

    def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
        """(B, S, S, C) normalised images -> (B, S/p, S/p, prompt_dim) image embeddings.
        ``train=True`` applies the encoder's drop path (needs a 'dropout' rng when it is > 0)."""
        return self.image_encoder(images, deterministic=not train)

    def image_pe(self) -> jax.Array:
        """(h, w, prompt_dim): the dense positional encoding of the embedding grid."""
        return self.prompt_encoder.dense_pe()

    def predict(self, image_embeddings: jax.Array, points=None, labels=None, boxes=None,
                masks=None, multimask_output: bool = True):
        """Prompts on precomputed embeddings -> (masks (B, P, M, 4h, 4w), iou (B, P, M))."""
        sparse, dense = self.prompt_encoder(points, labels, boxes, masks,
                                            batch_size=image_embeddings.shape[0])
        return self.mask_decoder(image_embeddings, self.image_pe(), sparse, dense, multimask_output)

    def __call__(self, images: jax.Array, points=None, labels=None, boxes=None, masks=None,
                 multimask_output: bool = True, train: bool = False) -> Dict[str, jax.Array]:
        emb = self.encode_image(images, train)
        low_res, iou = self.predict(emb, points, labels, boxes, masks, multimask_output)
        return {"image_embeddings": emb, "masks": low_res, "iou_predictions": iou}

    def init_inputs(self, batch_size: int = 1):
        """Dummy (images, points, labels, boxes) that create every param with ``init``."""
        s = self.image_size
        return (jnp.zeros((batch_size, s, s, self.in_chans), self.dtype),
                jnp.zeros((batch_size, 1, 1, 2), jnp.float32), jnp.ones((batch_size, 1, 1), jnp.int32),
                jnp.zeros((batch_size, 1, 4), jnp.float32))
