"""SimMIM (Xie et al., 2022): a simple framework for masked image modelling.

microsoft/SimMIM ``models/simmim.py`` (commit d3e29bcac950b83edc34ca33fe4404f38309052c):
the encoder sees EVERY patch, the masked ones replaced by a learned ``mask_token`` right after
the patch embedding (before the class token and the position embedding); a one-layer linear
decoder (a 1x1 conv to ``stride^2 * 3`` channels and a pixel shuffle: here a Dense per patch
token to ``p * p * 3`` and an unpatchify in the same (c, i, j) channel order) predicts the
pixels of the (normalised) image; the loss is L1 on the masked pixels only,
``sum(|x - x_rec| * mask) / (sum(mask) + 1e-5) / C`` over the whole (global) batch.

The mask is drawn per example in the data pipeline, as SimMIM's loader does
(``simmim_mask`` pp op: its ``MaskGenerator``, masking ``ceil(0.6 T)`` of the 32-px mask
patches), and arrives as ``batch['mask']`` [B, h, w] at the model's patch grid. A batch
without one (the ``loss`` evaluator on validation images) gets the same distribution drawn
in the step from its rng (``objective.mask_patch_size`` / ``mask_ratio``).

Params: ``backbone`` (any ViT-like backbone with a ``patch_embed/proj`` dense projection and
``tokens`` output), ``mask_token`` [1, 1, D] and ``decoder`` (Dense D -> p*p*C).

A hierarchical backbone with the ``mask_input`` capability (Swin: SimMIM's
``SwinTransformerForSimMIM``) takes ``mask`` / ``mask_token`` (its stage-0 width) as arguments
and puts the token in after its patch norm; the decoder maps each FINAL token (its normed
``patch_tokens``) to ``encoder_stride^2 * C`` pixels (SimMIM's 1x1 conv + PixelShuffle with
``encoder_stride``); masks and the loss stay at the model's patch grid. The mask token
is put in by an injection hook on ``patch_embed/proj`` (``fmjax.models.inject.mask_token_hook``),
so the backbone is the plain ViT: ``features`` (kNN / linear probe, and fine-tuning through
``config.model_init`` mapping ``params/backbone``) is the unmasked backbone.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.data.transforms import NORMALIZE_PRESETS
from fmjax.errors import ConfigError
from fmjax.evals import images as image_lib
from fmjax.models import inject, layers
from fmjax.models.registry import build_model, capabilities, require
from fmjax.objectives.base import Objective


def draw_masks(rng, batch: int, grid: tuple, mask_patch_size: int, patch_size: int, ratio: float):
    """[batch, h, w] int32 masks with SimMIM's MaskGenerator distribution, in the step."""
    scale = mask_patch_size // patch_size
    rh, rw = grid[0] // scale, grid[1] // scale
    count = int(math.ceil(rh * rw * ratio))
    noise = jax.random.uniform(rng, (batch, rh * rw))
    ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
    mask = (ranks < count).astype(jnp.int32).reshape(batch, rh, rw)
    return jnp.repeat(jnp.repeat(mask, scale, axis=1), scale, axis=2)


def masked_l1(images, recon, mask, patch_size: int):
    """SimMIM's loss: L1 over the masked pixels, per channel. images / recon [B, H, W, C] and
    mask [B, h, w] at the patch grid."""
    pix = jnp.repeat(jnp.repeat(mask.astype(jnp.float32), patch_size, axis=1), patch_size, axis=2)[..., None]
    l1 = jnp.abs(images.astype(jnp.float32) - recon.astype(jnp.float32))
    return jnp.sum(l1 * pix) / (jnp.sum(pix) + 1e-5) / images.shape[-1]


def unpatchify(tokens, grid, patch_size: int, channels: int):
    """[B, h*w, C*p*p] in PixelShuffle's (c, i, j) channel order -> [B, h*p, w*p, C]."""
    b = tokens.shape[0]
    x = tokens.reshape(b, grid[0], grid[1], channels, patch_size, patch_size)
    return jnp.transpose(x, (0, 1, 4, 2, 5, 3)).reshape(b, grid[0] * patch_size, grid[1] * patch_size, channels)


class SimMIMObjective(Objective):
    batch_keys = ("image", "mask")

    def __init__(self, config):
        super().__init__(config)
        o = config.objective
        self.backbone = build_model(config.model, config.get("dtype", "float32"))
        require(self.backbone, ("tokens", "pooled"), "objective 'simmim'", config.model.name)
        self.patch_size = int(getattr(self.backbone, "patch_size", 0) or 0)
        self.width = int(getattr(self.backbone, "width", 0) or 0)
        # mask_input (Swin): the token has the stage-0 width, the decoder upsamples by the stride
        self.mask_input = "mask_input" in capabilities(self.backbone)
        self.stride = int(self.backbone.encoder_stride) if self.mask_input else self.patch_size
        self.token_width = int(self.backbone.embed_dim) if self.mask_input else self.width
        self.num_prefix = int(getattr(self.backbone, "num_prefix_tokens", 0))
        self.mask_patch_size = int(o.get("mask_patch_size", 32))
        self.mask_ratio = float(o.get("mask_ratio", 0.6))
        self.channels = int(config.data.get("channels", 3))
        self.norm = config.data.get("normalization", "imagenet")
        self.decoder = nn.Dense(self.channels * self.stride ** 2, dtype=self.backbone.dtype,
                                kernel_init=layers.part(nn.initializers.truncated_normal(0.02), ("embed", "patch")),
                                bias_init=layers.part(nn.initializers.zeros, ("patch",)))

    def check(self, config):
        if not self.patch_size or not self.width:
            raise ConfigError(f"objective 'simmim' needs a patch backbone with patch_size and width; "
                              f"config.model.name={config.model.name!r} has none.")
        if self.mask_patch_size % self.patch_size:
            raise ConfigError(f"config.objective.mask_patch_size={self.mask_patch_size} must be a multiple of "
                              f"the model's patch_size={self.patch_size} (SimMIM masks whole model patches).")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"config.objective.mask_ratio={self.mask_ratio} must be in (0, 1).")
        size = int(config.data.get("image_size", 0) or 0)
        if size and size % self.mask_patch_size:
            raise ConfigError(f"config.data.image_size={size} must be a multiple of objective.mask_patch_size="
                              f"{self.mask_patch_size}.")
        if size and size % self.stride:
            raise ConfigError(f"config.data.image_size={size} must be a multiple of the backbone's encoder "
                              f"stride {self.stride} (patch_size x 2^(stages - 1)) for SimMIM's decoder.")
        self._check_mask_op(config)

    def _check_mask_op(self, config):
        """The pp_train's ``simmim_mask`` op draws the mask on the model's patch grid: its
        model_patch_size and mask_patch_size must be the model's and the objective's (a model
        override alone would fail at the first step, deep in the backbone)."""
        from fmjax.data.mask_ops import simmim_mask
        from fmjax.data.registry import build_op, split_pp
        for spec in split_pp(str(config.data.get("pp_train", "") or "")):
            if not spec.startswith("simmim_mask"):
                continue
            try:
                op = build_op(spec)
            except ValueError:
                return  # the pipeline's own check names it
            if not isinstance(op, simmim_mask):
                continue
            mask_patch, model_patch = op.mask_patch_size, op.model_patch_size
            if model_patch != self.patch_size or mask_patch != self.mask_patch_size:
                raise ConfigError(
                    f"config.data.pp_train's {spec!r} masks {mask_patch}-px patches on a grid of "
                    f"{model_patch}-px model patches, but config.model.patch_size={self.patch_size} and "
                    f"config.objective.mask_patch_size={self.mask_patch_size}; use "
                    f"simmim_mask(<image size>, {self.mask_patch_size}, {self.patch_size}, <ratio>).")

    # -- model ------------------------------------------------------------------------------
    def reconstruct(self, params, images, mask, train=False, rng=None):
        """(reconstruction [B, H, W, C], patch-level prediction [B, N, p*p*C])."""
        grid = (images.shape[1] // self.stride, images.shape[2] // self.stride)
        rngs = {"dropout": rng} if rng is not None else {}
        if self.mask_input:
            tokens = self.backbone.apply({"params": params["backbone"]}, images, train=train, mask=mask,
                                         mask_token=params["mask_token"], rngs=rngs)["patch_tokens"]
        else:
            with inject.mask_token_hook(mask, params["mask_token"]):
                tokens = self.backbone.apply({"params": params["backbone"]}, images, train=train,
                                             rngs=rngs)["tokens"][:, self.num_prefix:]
        pred = self.decoder.apply({"params": params["decoder"]}, tokens)
        return unpatchify(pred, grid, self.stride, self.channels), pred

    def init(self, rng, batch):
        b_rng, t_rng, d_rng = jax.random.split(rng, 3)
        images = batch["image"]
        backbone = self.backbone.init({"params": b_rng}, images)["params"]
        mask_token = inject.init_mask_token(t_rng, self.token_width)
        tokens = jnp.zeros((images.shape[0], 1, self.width), self.backbone.dtype)
        decoder = self.decoder.init({"params": d_rng}, tokens)["params"]
        return {"backbone": backbone, "mask_token": mask_token, "decoder": decoder}, {}

    def _mask(self, batch, rng):
        images = batch["image"]
        if "mask" in batch:
            return batch["mask"]
        grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
        return draw_masks(rng, images.shape[0], grid, self.mask_patch_size, self.patch_size, self.mask_ratio)

    def loss(self, params, extra, batch, rng, step):
        mask_rng, drop_rng = jax.random.split(rng)
        mask = self._mask(batch, mask_rng)
        recon, _ = self.reconstruct(params, batch["image"], mask, train=True, rng=drop_rng)
        loss = masked_l1(batch["image"], recon, mask, self.patch_size)
        return loss, ({"mask_ratio": mask.astype(jnp.float32).mean()}, extra)

    def features(self, params, extra, images):
        return self.backbone.apply({"params": params["backbone"]}, images)["pre_logits"]

    def visualize(self, params, extra, batch, rng):
        images = batch["image"]
        mask = self._mask(batch, rng)
        recon, _ = self.reconstruct(params, images, mask)
        # mae_reconstruction_grid reads the model's patches in patchify's (i, j, c) order.
        b, hh, ww, c = recon.shape
        p = self.patch_size
        pred = recon.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(
            b, (hh // p) * (ww // p), p * p * c)
        mean, std = NORMALIZE_PRESETS[self.norm]
        grid = image_lib.mae_reconstruction_grid(
            np.asarray(images), np.asarray(pred), np.asarray(mask.reshape(b, -1)), p, mean, std,
            n=8, norm_pix=False)
        return {"reconstruction": grid}


def make(config) -> SimMIMObjective:
    return SimMIMObjective(config)
