"""Masked autoencoders (He et al., 2021): reconstruct masked patches from the visible 25%.

The model (``fmjax.models.mae.MAE``) holds the masking, the decoder and the
(norm-pix) loss, matching ``facebookresearch/mae`` and transformers'
``ViTMAEForPreTraining`` (see tests/interop/test_mae_parity.py).
"""
from __future__ import annotations

import re

import jax
import numpy as np

from fmjax.data.transforms import NORMALIZE_PRESETS
from fmjax.evals import images as image_lib
from fmjax.models.registry import build_model, require
from fmjax.objectives.base import Objective


# Frozen features for the kNN / linear-probe evals (see MAE.encode).
FEATURES = ("gap", "mean", "cls")
# config.objective.param_init: 'jax' (fmjax's own, as the official JAX ViT / big_vision) or
# 'reference' (facebookresearch/mae's PyTorch initialize_weights; see reference_init).
PARAM_INITS = ("jax", "reference")
_QKV_KERNEL = re.compile(r"\['attn'\]\['(query|key|value)'\]\['kernel'\]")
_PATCH_BIAS = "['patch_embed']['proj']['bias']"


def reference_init(params, rng):
    """Turns fmjax's initial MAE params into draws of facebookresearch/mae's init.

    fmjax (like the official JAX ViT) uses, where the PyTorch reference differs:
      - q/k/v kernels: ``xavier_uniform`` per kernel over (fan_in D, fan_out H*hd), bound
        sqrt(6 / (D + H*hd)). The reference (models_mae.py ``_init_weights`` on timm's
        Attention) applies ``xavier_uniform_`` to the FUSED qkv weight (3*H*hd, D): bound
        sqrt(6 / (D + 3*H*hd)), 1/sqrt(2) of fmjax's for H*hd = D. The uniform draw scaled by
        the ratio of the bounds is exactly the fused draw.
      - the patch-embedding bias: zeros. The reference re-initialises only the Conv2d's
        weight (xavier over its (D, C*p*p) view); its bias keeps torch's Conv2d default,
        U(-1/sqrt(C*p*p), 1/sqrt(C*p*p)), drawn here from ``rng``.
    Works on boxed (``nn.Partitioned``) and plain params."""
    flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    patch_fan_in = next(x.shape[0] for k, x in flat.items()  # kernel (p*p*C, D)
                        if k.startswith("['patch_embed']['proj']['kernel']"))

    def fix(path, x):
        key = jax.tree_util.keystr(path)
        if _QKV_KERNEL.search(key):
            fan_in, fan_out = x.shape[0], int(np.prod(x.shape[1:]))
            return x * np.asarray(np.sqrt((fan_in + fan_out) / (fan_in + 3 * fan_out)), x.dtype)
        if key.startswith(_PATCH_BIAS):
            bound = 1.0 / np.sqrt(patch_fan_in)
            return jax.random.uniform(rng, x.shape, x.dtype, -bound, bound)
        return x
    return jax.tree_util.tree_map_with_path(fix, params)


class MAEObjective(Objective):
    batch_keys = ("image",)

    def __init__(self, config):
        super().__init__(config)
        self.model = build_model(config.model, config.get("dtype", "float32"))
        require(self.model, ("masked_autoencoder",), "objective 'mae'", config.model.name)
        self.patch_size = getattr(self.model, "patch_size", None)
        self.feature = config.objective.get("feature", "mean")
        if self.feature not in FEATURES:
            raise ValueError(f"config.objective.feature={self.feature!r}; valid: {', '.join(FEATURES)}.")
        self.norm = config.data.get("normalization", "imagenet")
        self.param_init = config.objective.get("param_init", "jax")
        if self.param_init not in PARAM_INITS:
            raise ValueError(f"config.objective.param_init={self.param_init!r}; "
                             f"valid: {', '.join(PARAM_INITS)}.")

    def init(self, rng, batch):
        mask_rng, params_rng = jax.random.split(rng)
        variables = self.model.init({"params": params_rng, "mask": mask_rng}, batch["image"])
        params = variables["params"]
        if self.param_init == "reference":  # a third key: the 'jax' init's draws stay as they were
            params = reference_init(params, jax.random.fold_in(rng, 1))
        return params, {}

    def loss(self, params, extra, batch, rng, step):
        mask_rng, drop_rng = jax.random.split(rng)
        out = self.model.apply({"params": params}, batch["image"], train=True,
                               rngs={"mask": mask_rng, "dropout": drop_rng})
        return out["loss"], ({"mask_ratio": out["mask"].mean()}, extra)

    def features(self, params, extra, images):
        return self.model.apply({"params": params}, images, method=self.model.encode)[self.feature]

    def visualize(self, params, extra, batch, rng):
        out = self.model.apply({"params": params}, batch["image"], rngs={"mask": rng})
        mean, std = NORMALIZE_PRESETS[self.norm]
        grid = image_lib.mae_reconstruction_grid(
            np.asarray(batch["image"]), np.asarray(out["pred"]), np.asarray(out["mask"]),
            self.patch_size, mean, std, n=8, norm_pix=self.model.norm_pix_loss)
        return {"reconstruction": grid}


def make(config) -> MAEObjective:
    return MAEObjective(config)
