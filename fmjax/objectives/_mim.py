"""What SimMIM and BEiT share: the learned mask token put into the backbone's input.

Both references (microsoft/SimMIM ``VisionTransformerForSimMIM``, microsoft/unilm beit
``VisionTransformerForMaskedImageModeling``) replace the masked patch embeddings by one learned
``mask_token`` right after the patch embedding, before the class token and the position
embedding: ``x * (1 - w) + mask_token * w``. Here a dense hook on the backbone's
``patch_embed/proj`` (``fmjax.models.inject``) does it, so any ViT-like backbone with that
projection works unchanged and its params stay the plain backbone's (fine-tuning loads them
with ``config.model_init``).
"""
import jax
import jax.numpy as jnp

from fmjax.models import inject, layers


def mask_token_hook(mask, mask_token):
    """A ``inject.hooks`` context: ``mask`` [B, h, w] (1 = masked), ``mask_token`` [1, 1, D]."""
    w = mask.reshape(mask.shape[0], -1, 1)

    def put_mask_tokens(module, x, call_next):
        out = call_next(x)
        if tuple(module.path[-2:]) != ("patch_embed", "proj"):
            return out
        ww = w.astype(out.dtype)
        return out * (1 - ww) + mask_token.astype(out.dtype) * ww
    return inject.hooks(dense=put_mask_tokens)


def init_mask_token(rng, width: int, std: float = 0.02):
    """[1, 1, width]: N(0, std) cut at +-std, timm's ``trunc_normal_(t, std=std, a=-std, b=std)``
    (absolute bounds) as both references' own ``trunc_normal_`` wrappers call it."""
    return layers.part(lambda k, s, d=jnp.float32: std * jax.random.truncated_normal(k, -1.0, 1.0, s, d),
                       (None, None, "embed"))(rng, (1, 1, width))
