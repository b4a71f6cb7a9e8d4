"""Convert transformers' ``OwlViTForObjectDetection`` weights into ``fmjax.models.owl.OWLViT``
params (``config.model_init.format='hf_owlvit'``; the published google/owlvit-* checkpoints in
the HF layout load this way).

``owlvit.*`` is a CLIP (``hf_clip.convert_hf_clip``; OWL-ViT spells CLIP's ``pre_layrnorm``
``pre_layernorm``) -> ``clip``; ``layer_norm`` -> ``merged_norm``; ``class_head.*`` and
``box_head.*`` keep their names. The ``box_bias`` buffer is not a param (fmjax computes it).
``owl_kwargs_from_hf_config`` gives the model's fields (text pooling at the argmax token id, as
OWL-ViT's text tower pools).
"""
from __future__ import annotations

from typing import Any, Dict

from fmjax.interop.hf_clip import StateDict, _load, clip_kwargs_from_hf_config, convert_hf_clip
from fmjax.interop.hf_vit import _Reader, _cfg, _layer_norm, _linear


def owl_kwargs_from_hf_config(cfg) -> Dict[str, Any]:
    """``OwlViTConfig`` (object or dict) -> ``config.model`` fields of ``OWLViT``."""
    clip = clip_kwargs_from_hf_config(cfg)
    clip.update(text_pool="argmax", eos_token_id=None)
    return dict(name="owl", clip=clip, layernorm_eps=_cfg(_cfg(cfg, "vision_config"), "layer_norm_eps", 1e-5))


def convert_hf_owlvit(state_dict: StateDict, hf_config) -> Dict[str, Any]:
    sd = _load(state_dict)
    clip_sd = {k[len("owlvit."):].replace("vision_model.pre_layernorm", "vision_model.pre_layrnorm"): v
               for k, v in sd.items() if k.startswith("owlvit.")}
    clip = convert_hf_clip(clip_sd, hf_config)
    r = _Reader({k: v for k, v in sd.items() if not k.startswith("owlvit.")}, "HF OWL-ViT")
    params = {
        "clip": clip,
        "merged_norm": _layer_norm(r, "layer_norm"),
        "class_head": {n: _linear(r, f"class_head.{n}") for n in ("dense0", "logit_shift", "logit_scale")},
        "box_head": {n: _linear(r, f"box_head.{n}") for n in ("dense0", "dense1", "dense2")},
    }
    r.finish(ignore=(r"box_bias",))
    return params
