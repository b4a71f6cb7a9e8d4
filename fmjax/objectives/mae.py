"""Masked autoencoders (He et al., 2021): reconstruct masked patches from the visible 25%.

The model (``fmjax.models.mae.MAE``) holds the masking, the decoder and the
(norm-pix) loss, matching ``facebookresearch/mae`` and transformers'
``ViTMAEForPreTraining`` (see tests/interop/test_mae_parity.py).
"""
from __future__ import annotations

import jax
import numpy as np

from fmjax.data.transforms import NORMALIZE_PRESETS
from fmjax.evals import images as image_lib
from fmjax.models.registry import build_model
from fmjax.objectives.base import Objective


# Frozen features for the kNN / linear-probe evals (see MAE.encode).
FEATURES = ("gap", "mean", "cls")


class MAEObjective(Objective):
    batch_keys = ("image",)

    def __init__(self, config):
        super().__init__(config)
        self.model = build_model(config.model, config.get("dtype", "float32"))
        if config.model.name != "mae":
            raise ValueError(f"objective 'mae' needs config.model.name='mae', got {config.model.name!r}.")
        self.patch_size = self.model.patch_size
        self.feature = config.objective.get("feature", "mean")
        if self.feature not in FEATURES:
            raise ValueError(f"config.objective.feature={self.feature!r}; valid: {', '.join(FEATURES)}.")
        self.norm = config.data.get("normalization", "imagenet")

    def init(self, rng, batch):
        mask_rng, params_rng = jax.random.split(rng)
        variables = self.model.init({"params": params_rng, "mask": mask_rng}, batch["image"])
        return variables["params"], {}

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
