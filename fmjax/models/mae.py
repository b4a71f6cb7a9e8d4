"""Masked Autoencoder (He et al. 2021), following facebookresearch/mae models_mae.py.

Encoder: ViT with a class token and FIXED 2-D sin-cos positions (zero row for
the class token); it sees only the kept patches. Decoder: Dense to
``decoder_width``, mask tokens, unshuffle, fixed sin-cos positions, blocks,
norm, Dense to p*p*C pixels. Param tree: ``patch_embed/proj``, ``cls_token``,
``encoder/{block_i,norm}``, ``decoder_embed``, ``mask_token``,
``decoder/{block_i,norm}``, ``decoder_pred``; the encoder part loads unchanged
into ``ViT(pos_embed='sincos')``.
"""
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models import layers
from fmjax.models.layers import patchify, unpatchify  # noqa: F401  (re-exported)

Dtype = Any


def random_masking(x: jax.Array, noise: jax.Array, mask_ratio: float
                   ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sample random masking by argsort of ``noise``, exactly as the reference.

    Args:
      x: (B, L, D) tokens; noise: (B, L) values (uniform [0, 1) in training).
    Returns:
      (x_kept (B, int(L * (1 - mask_ratio)), D), mask (B, L) with 1 = removed,
      ids_restore (B, L) int32).
    """
    b, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = jnp.argsort(noise, axis=1)  # ascend: small is keep, large is remove
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
    mask = jnp.ones((b, length), jnp.float32).at[:, :len_keep].set(0.0)
    mask = jnp.take_along_axis(mask, ids_restore, axis=1)
    return x_kept, mask, ids_restore.astype(jnp.int32)


def mae_loss(images: jax.Array, pred: jax.Array, mask: jax.Array, patch_size: int,
             norm_pix_loss: bool) -> jax.Array:
    """Reference MAE loss: per-patch MSE, averaged over removed patches only.

    With ``norm_pix_loss`` the target is normalised per patch with the UNBIASED
    variance (``torch.var`` default): (t - mean) / sqrt(var + 1e-6).
    """
    target = patchify(images.astype(jnp.float32), patch_size)
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred.astype(jnp.float32) - target) ** 2).mean(axis=-1)  # (B, L)
    return (loss * mask).sum() / mask.sum()


class MAE(nn.Module):
    """Masked autoencoder with a ViT encoder and a light transformer decoder.

    ``__call__(images (B, H, W, C), train=False, noise=None)`` returns dict(
    loss (scalar f32), pred (B, L, p*p*C), mask (B, L) 1 = removed,
    ids_restore (B, L), latent (B, 1 + kept, width)). ``noise`` (B, L) fixes the
    masking; when None it is drawn uniform [0, 1) from the 'mask' rng stream.
    ``encode(images)`` runs the encoder on all patches (no masking).

    ``remat`` (``False`` / ``True`` or a policy name) and ``scan_layers`` apply to the encoder
    and the decoder alike: scanned, their params are ``encoder/block_stack/...`` and
    ``decoder/block_stack/...`` with a leading layer axis (see ``fmjax.models.vit.ViT``).
    """

    capabilities = frozenset({"masked_autoencoder"})   # fmjax.models.registry.CAPABILITIES

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_dim: Optional[int] = None  # default 4 * decoder_width
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    num_channels: int = 3
    drop_path: float = 0.0
    layernorm_eps: float = 1e-6
    activation: str = "gelu"
    attention_impl: str = "xla"
    remat: Any = False  # False / True or a policy name (fmjax.models.scan.REMAT_POLICIES)
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        """Create the encoder and decoder submodules and tokens."""
        normal = nn.initializers.normal(0.02)
        self.patch_embed = layers.PatchEmbed(self.width, self.patch_size, self.dtype,
                                             self.param_dtype)
        self.cls_token = self.param("cls_token", layers.part(normal, (None, None, "embed")),
                                    (1, 1, self.width), self.param_dtype)
        common = dict(layernorm_eps=self.layernorm_eps, activation=self.activation,
                      attention_impl=self.attention_impl, remat=self.remat,
                      scan_layers=self.scan_layers, dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = layers.Encoder(depth=self.depth, num_heads=self.num_heads,
                                      mlp_dim=self.mlp_dim, drop_path=self.drop_path, **common)
        self.decoder_embed = nn.Dense(
            self.decoder_width, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=layers.part(layers.xavier_uniform, (None, "embed")),
            bias_init=layers.part(nn.initializers.zeros, ("embed",)))
        self.mask_token = self.param("mask_token", layers.part(normal, (None, None, "embed")),
                                     (1, 1, self.decoder_width), self.param_dtype)
        self.decoder = layers.Encoder(
            depth=self.decoder_depth, num_heads=self.decoder_heads,
            mlp_dim=self.decoder_mlp_dim or 4 * self.decoder_width, **common)
        self.decoder_pred = nn.Dense(
            self.patch_size ** 2 * self.num_channels, dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=layers.part(layers.xavier_uniform, ("embed", "patch")),
            bias_init=layers.part(nn.initializers.zeros, ("patch",)))

    def _grid(self, images: jax.Array) -> Tuple[int, int]:
        if images.ndim != 4 or images.shape[-1] != self.num_channels:
            raise ValueError(f"MAE expects (B, H, W, {self.num_channels}) images, "
                             f"got shape {images.shape}.")
        return images.shape[1] // self.patch_size, images.shape[2] // self.patch_size

    def _patch_tokens(self, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Patch embeddings with sin-cos positions, and the class token + its position."""
        grid = self._grid(images)
        pos = jnp.asarray(layers.get_2d_sincos_pos_embed(self.width, grid, cls_token=True),
                          self.dtype)
        x = self.patch_embed(images.astype(self.dtype)) + pos[None, 1:]
        cls = self.cls_token.astype(self.dtype) + pos[None, :1]
        return x, jnp.broadcast_to(cls, (x.shape[0], 1, self.width))

    def encode(self, images: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
        """Unmasked encoder features: dict(cls (B, D), mean (B, D) over patch tokens,
        tokens (B, 1 + L, D)), all after the encoder's final norm, and gap (B, D): the mean
        patch token BEFORE the final norm - the reference's ``global_pool`` representation
        (models_vit.py drops the final norm and pools first; its fresh ``fc_norm`` is left to
        the probe, which standardises features)."""
        x, cls = self._patch_tokens(images)
        x, pre = self.encoder(jnp.concatenate([cls, x], axis=1), not train, return_prenorm=True)
        return dict(cls=x[:, 0], mean=x[:, 1:].mean(axis=1), gap=pre[:, 1:].mean(axis=1), tokens=x)

    def forward_encoder(self, images: jax.Array, noise: jax.Array, train: bool = False):
        """Encode the kept patches: (latent (B, 1 + kept, D), mask, ids_restore)."""
        x, cls = self._patch_tokens(images)
        x, mask, ids_restore = random_masking(x, noise, self.mask_ratio)
        latent = self.encoder(jnp.concatenate([cls, x], axis=1), not train)
        return latent, mask, ids_restore

    def forward_decoder(self, latent: jax.Array, ids_restore: jax.Array,
                        grid: Tuple[int, int], train: bool = False) -> jax.Array:
        """Predict pixels for every patch: (B, L, p*p*C)."""
        x = self.decoder_embed(latent)
        b, n, d = x.shape
        length = ids_restore.shape[1]
        mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype), (b, length + 1 - n, d))
        x_ = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
        x_ = jnp.take_along_axis(x_, ids_restore[:, :, None], axis=1)  # unshuffle
        x = jnp.concatenate([x[:, :1], x_], axis=1)
        pos = layers.get_2d_sincos_pos_embed(self.decoder_width, grid, cls_token=True)
        x = layers.constrain(x + jnp.asarray(pos, x.dtype)[None])
        x = self.decoder(x, not train)
        return self.decoder_pred(x)[:, 1:]

    def __call__(self, images: jax.Array, train: bool = False,
                 noise: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
        """Mask, encode, decode and compute the loss; see the class docstring."""
        grid = self._grid(images)
        if noise is None:
            noise = jax.random.uniform(self.make_rng("mask"), (images.shape[0], grid[0] * grid[1]))
        latent, mask, ids_restore = self.forward_encoder(images, noise, train)
        pred = self.forward_decoder(latent, ids_restore, grid, train)
        loss = mae_loss(images, pred, mask, self.patch_size, self.norm_pix_loss)
        return dict(loss=loss, pred=pred, mask=mask, ids_restore=ids_restore, latent=latent)
