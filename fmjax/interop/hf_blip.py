"""Convert transformers' BLIP models (``BlipForImageTextRetrieval``, ``BlipForConditionalGeneration``,
the ``Salesforce/blip-*`` checkpoints) into fmjax BLIP params.

transformers keeps BLIP's text modules under their original names (``text_encoder.*``,
``text_decoder.bert.*``, ``text_decoder.cls.predictions.*``, ``vision_proj``, ``text_proj``,
``itm_head``) and renames the ViT (``vision_model.embeddings.{class_embedding,
position_embedding, patch_embedding}``, ``encoder.layers.{i}.{layer_norm1, self_attn.qkv,
self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2}``, ``post_layernorm``): this module maps
the ViT back to salesforce/BLIP's timm layout and converts with ``fmjax.interop.blip``, so an
ITM / retrieval model gives the image tower, projections, ITM head and the text encoder, a
captioner the image tower and the decoder (``convert_blip``'s partial cases).
``blip_kwargs_from_hf_config`` gives ``config.model`` (``name='blip'``) from the checkpoint's
``BlipConfig``; its vision LayerNorm eps is transformers' (1e-5; salesforce/BLIP's timm ViT
uses 1e-6).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping

from fmjax.interop import blip
from fmjax.interop.timm_vit import timm_state_dict

_VISION = [
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.",
     r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
]


def salesforce_names(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """transformers' BLIP state dict under salesforce/BLIP's names (the ViT renamed back)."""
    out = {}
    for k, v in timm_state_dict(state_dict).items():
        for pattern, repl in _VISION:
            if re.match(pattern, k):
                k = re.sub(pattern, repl, k)
                break
        out[k] = v
    return out


def _cfg(c, key):
    return c.get(key) if isinstance(c, Mapping) else getattr(c, key)


def blip_kwargs_from_hf_config(config) -> Dict[str, Any]:
    """``BlipConfig`` (object or dict) -> ``config.model`` kwargs of ``fmjax.models.blip.BLIP``."""
    v, t = _cfg(config, "vision_config"), _cfg(config, "text_config")
    width = int(_cfg(v, "hidden_size"))
    image = dict(name="vit", width=width, depth=int(_cfg(v, "num_hidden_layers")),
                 num_heads=int(_cfg(v, "num_attention_heads")),
                 mlp_dim=int(_cfg(v, "intermediate_size")), patch_size=int(_cfg(v, "patch_size")),
                 class_token=True, pool="cls", pos_embed="learned", num_classes=0,
                 layernorm_eps=float(_cfg(v, "layer_norm_eps")), activation="gelu")
    for c, what in ((v, "vision"), (t, "text")):
        if _cfg(c, "hidden_act") != "gelu":
            raise ValueError(f"BLIP {what} hidden_act={_cfg(c, 'hidden_act')!r}: fmjax's BLIP "
                             "uses exact gelu.")
    return dict(image=image, embed_dim=int(_cfg(config, "image_text_hidden_size")),
                text_width=int(_cfg(t, "hidden_size")), text_depth=int(_cfg(t, "num_hidden_layers")),
                text_heads=int(_cfg(t, "num_attention_heads")),
                text_mlp_dim=int(_cfg(t, "intermediate_size")), vocab_size=int(_cfg(t, "vocab_size")),
                max_positions=int(_cfg(t, "max_position_embeddings")),
                layernorm_eps=float(_cfg(t, "layer_norm_eps")))


def convert_hf_blip(state_dict: Mapping[str, Any], config) -> Dict[str, Any]:
    """A transformers BLIP state dict + its ``BlipConfig`` -> fmjax BLIP params (partial for
    the fine-tuned halves: ``fmjax.interop.blip.convert_blip``)."""
    v, t = _cfg(config, "vision_config"), _cfg(config, "text_config")
    return blip.convert_blip(salesforce_names(state_dict), num_heads=int(_cfg(v, "num_attention_heads")),
                             text_heads=int(_cfg(t, "num_attention_heads")))
