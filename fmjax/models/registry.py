"""Model construction from ``config.model`` (``name``, ``variant`` and field overrides)."""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from fmjax.models.clip import CLIP, clip_kwargs
from fmjax.models.dit import DiT, dit_kwargs
from fmjax.models.mae import MAE
from fmjax.models.unet import UNet, unet_kwargs
from fmjax.models.vit import ViT, vit_kwargs

MODELS = {"vit": ViT, "mae": MAE, "clip": CLIP, "unet": UNet, "dit": DiT}
# How each model reads ``config.model.variant`` (e.g. 'B/16', 'XL/2', 'ddpm_cifar10').
_VARIANTS = {"vit": vit_kwargs, "mae": vit_kwargs, "clip": clip_kwargs,
             "unet": unet_kwargs, "dit": dit_kwargs}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_kwargs(model_config: Mapping[str, Any]) -> dict:
    cfg = dict(model_config)
    name = cfg.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; valid models: {sorted(MODELS)}.")
    variant = cfg.pop("variant", None)
    return _VARIANTS[name](variant, **cfg) if variant else cfg


def build_model(model_config: Mapping[str, Any], dtype: str = "float32", **extra):
    """``dict(name='mae', variant='S/16', decoder_depth=4)`` -> ``MAE(...)``."""
    kwargs = model_kwargs(model_config)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; valid: {sorted(_DTYPES)}.")
    kwargs.update(extra)
    return MODELS[model_config["name"]](dtype=_DTYPES[dtype], **kwargs)
