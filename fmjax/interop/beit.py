"""Convert BEiT-style ViT state dicts (microsoft/unilm beit, microsoft/SimMIM) into fmjax params.

The layout is timm's ViT (``fmjax.interop.timm_vit``) with BEiT's changes, as in SimMIM's
``models/vision_transformer.py`` (commit d3e29bcac950b83edc34ca33fe4404f38309052c) and BEiT's
``modeling_pretrain.py`` / ``modeling_finetune.py``:

- ``blocks.{i}.attn.qkv.weight`` without a bias, and ``attn.q_bias`` / ``attn.v_bias``: the
  fused bias is ``[q_bias; 0; v_bias]`` (no key bias; a key bias would not change the
  softmax anyway), so fmjax's ``key`` bias is 0;
- ``blocks.{i}.gamma_1`` / ``gamma_2``: layer scale (``ViT(layerscale=...)``);
- a shared ``rel_pos_bias.relative_position_bias_table`` (``ViT(rel_pos_bias='shared')``) or one
  per block, ``blocks.{i}.attn.relative_position_bias_table`` (``'per_layer'``); the
  ``relative_position_index`` buffers are recomputed by ``fmjax.models.relpos`` and checked;
- no ``pos_embed`` when the model has no absolute position embedding
  (``use_abs_pos_emb=False``): ``ViT(pos_embed='none')``.

``convert_simmim``: a SimMIM pre-training checkpoint (``encoder.*``, ``encoder.mask_token``,
``decoder.0`` the 1x1 conv before the pixel shuffle) -> ``{'backbone', 'mask_token',
'decoder'}``, the params of ``fmjax.objectives.simmim``. The conv's output channels are in
PixelShuffle's (c, i, j) order, which ``fmjax.objectives.simmim.unpatchify`` reads.
"""
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from fmjax.interop import timm_vit
from fmjax.models import relpos

Params = Dict[str, Any]
_TABLE = re.compile(r"blocks\.(\d+)\.attn\.relative_position_bias_table")
_INDEX = re.compile(r"(blocks\.\d+\.attn\.|rel_pos_bias\.)relative_position_index")


def _grid_of_table(rows: int) -> Tuple[int, int]:
    """The square patch grid whose table has ``rows`` rows ((2g - 1)^2 + 3)."""
    g = int(round(((rows - 3) ** 0.5 + 1) / 2))
    if relpos.num_relative_distance((g, g)) != rows:
        raise ValueError(f"relative_position_bias_table has {rows} rows: not (2g - 1)^2 + 3 for a square grid.")
    return g, g


def _split(sd: Mapping[str, np.ndarray]):
    """(timm-layout state dict, shared table or None, {block: table}, checked index buffers)."""
    rest, shared, per_layer = {}, None, {}
    for k, v in sd.items():
        m = _TABLE.fullmatch(k)
        if m:
            per_layer[int(m.group(1))] = v
        elif k == "rel_pos_bias.relative_position_bias_table":
            shared = v
        elif _INDEX.fullmatch(k):
            idx = np.asarray(v)
            g = int(round((idx.shape[0] - 1) ** 0.5))
            if not np.array_equal(idx, relpos.relative_position_index((g, g))):
                raise ValueError(f"{k} differs from BEiT's relative_position_index for a {g}x{g} grid.")
        elif k.endswith(".attn.q_bias") or k.endswith(".attn.v_bias"):
            continue
        else:
            rest[k] = v
    for k in sd:
        if k.endswith(".attn.q_bias"):
            stem = k[: -len("q_bias")]
            q, v = np.asarray(sd[k]), np.asarray(sd.get(stem + "v_bias"))
            rest[stem + "qkv.bias"] = np.concatenate([q, np.zeros_like(q), v])
    return rest, shared, per_layer


def vit_kwargs_from_beit(state_dict: Mapping[str, Any], num_heads: Optional[int] = None,
                         global_pool: Optional[str] = None) -> Dict[str, Any]:
    """kwargs for ``fmjax.models.vit.ViT`` read off a BEiT / SimMIM encoder state dict."""
    sd = timm_vit.timm_state_dict(state_dict)
    rest, shared, per_layer = _split(sd)
    kw = timm_vit.vit_kwargs_from_timm(rest, num_heads, global_pool)
    if "pos_embed" not in rest:
        kw["pos_embed"] = "none"
    kw["rel_pos_bias"] = "shared" if shared is not None else ("per_layer" if per_layer else "none")
    return kw


def convert_beit_vit(state_dict: Mapping[str, Any], num_heads: Optional[int] = None) -> Params:
    """BEiT / SimMIM ViT encoder state dict -> ``ViT`` params (``vit_kwargs_from_beit`` builds it)."""
    sd = timm_vit.timm_state_dict(state_dict)
    rest, shared, per_layer = _split(sd)
    params = timm_vit.convert_timm_vit(rest, num_heads, abs_pos_embed="pos_embed" in rest)
    if shared is not None and per_layer:
        raise ValueError("A state dict with both a shared and per-block relative position bias tables.")
    if shared is not None:
        _grid_of_table(shared.shape[0])
        params["rel_pos_bias_table"] = np.asarray(shared, np.float32)
    for i, table in per_layer.items():
        _grid_of_table(table.shape[0])
        params["encoder"][f"block_{i}"]["attn"]["rel_pos_bias_table"] = np.asarray(table, np.float32)
    return params


def convert_simmim(state_dict: Mapping[str, Any], num_heads: Optional[int] = None) -> Params:
    """SimMIM pre-training state dict (``SimMIM(encoder, encoder_stride)``) -> the simmim
    objective's params ``{'backbone', 'mask_token', 'decoder'}``."""
    sd = timm_vit.timm_state_dict(state_dict)
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    other = sorted(k for k in sd if not k.startswith("encoder.") and not k.startswith("decoder.0."))
    if other or "decoder.0.weight" not in sd or "mask_token" not in enc:
        raise KeyError(f"Not a SimMIM ViT pre-training state dict: needs encoder.*, encoder.mask_token and "
                       f"decoder.0.weight; unexpected keys {other[:5]}.")
    mask_token = np.asarray(enc.pop("mask_token"), np.float32)
    w = np.asarray(sd["decoder.0.weight"], np.float32)      # (C p^2, D, 1, 1)
    decoder = {"kernel": w[:, :, 0, 0].T, "bias": np.asarray(sd["decoder.0.bias"], np.float32)}
    return {"backbone": convert_beit_vit(enc, num_heads), "mask_token": mask_token, "decoder": decoder}
