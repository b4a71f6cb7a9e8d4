"""The ``config.model_init.format`` names: each PyTorch checkpoint format and its converter.

``FORMATS[name] = (converter, needs_hf_config)``. The converter is ``"module:function"``
under ``fmjax.interop`` and is called as ``function(state_dict, hf_config)`` when the format
needs the checkpoint's ``config.json`` (``needs_hf_config``), else ``function(state_dict,
model_config)`` with ``config.model`` (for head counts and the like). A new format is one
entry here and its converter module; ``fmjax/train/model_init.py`` reads this table.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Optional

FORMATS: dict[str, tuple[str, bool]] = {
    "hf_vit": ("hf_vit:convert_hf_vit", True),
    "hf_deit": ("hf_vit:convert_hf_deit", True),
    "hf_convnext": ("hf_convnext:convert_hf_convnext", True),
    "hf_swin": ("hf_swin:convert_hf_swin", True),
    "hf_resnet": ("hf_resnet:convert_hf_resnet", True),
    "cream_tinyvit": ("cream_tinyvit:convert_cream_tinyvit", False),
    "hf_vit_mae": ("hf_vit:convert_hf_vit_mae", True),
    "hf_dinov2": ("hf_dinov2:convert_hf_dinov2", True),
    "hf_clip": ("hf_clip:convert_hf_clip", True),
    "open_clip": ("formats:_open_clip", False),
    "diffusers_unet": ("diffusers_unet:convert_diffusers_unet", True),
    "timm_vit": ("formats:_timm_vit", False),
    "timm_mae": ("formats:_timm_mae", False),
    "hf_gpt2": ("hf_gpt2:convert_hf_gpt2", True),
    "nanogpt": ("hf_gpt2:convert_nanogpt", False),
    "hf_sam": ("hf_sam:convert_hf_sam", True),
    "hf_owlvit": ("hf_owlvit:convert_hf_owlvit", True),
    "open_clip_coca": ("open_clip_coca:convert_for_model_init", False),
    "blip": ("blip:convert_for_model_init", False),
    "hf_blip": ("hf_blip:convert_hf_blip", True),
    "open_flamingo": ("open_flamingo:convert_open_flamingo", False),
}


def needs_hf_config(fmt: str) -> bool:
    return FORMATS[fmt][1]


def converter(fmt: str) -> Callable:
    module, _, fn = FORMATS[fmt][0].partition(":")
    return getattr(importlib.import_module(f"fmjax.interop.{module}"), fn)


def convert(fmt: str, state_dict: Mapping[str, Any], hf_config=None,
            model_config: Optional[Mapping[str, Any]] = None):
    """The ``params`` subtree of checkpoint ``state_dict`` in format ``fmt``."""
    return converter(fmt)(state_dict, hf_config if needs_hf_config(fmt) else model_config)


def _open_clip(state_dict, model_config=None):
    from fmjax.interop import hf_clip
    return hf_clip.convert_open_clip(state_dict)


def _timm_vit(state_dict, model_config=None):
    from fmjax.interop import timm_vit
    return timm_vit.convert_for_model_init(state_dict, "timm_vit", model_config)


def _timm_mae(state_dict, model_config=None):
    from fmjax.interop import timm_vit
    return timm_vit.convert_for_model_init(state_dict, "timm_mae", model_config)
