"""Convert salesforce/BLIP pre-training state dicts (``BLIP_Pretrain``) into fmjax BLIP params.

The layout is ``models/blip_pretrain.py`` / ``models/med.py`` (the released
``model_base.pth`` / ``model_large.pth`` hold ``{'model': state_dict}``):

* ``visual_encoder.*``: a timm-layout ViT -> ``image`` (``fmjax.interop.timm_vit``);
* ``vision_proj``, ``text_proj``, ``itm_head`` (Linear) -> Dense; ``temp`` -> ``temp``;
* ``text_encoder.embeddings.{word_embeddings, position_embeddings, LayerNorm}`` ->
  ``text/{word_embed, pos_embed, embed_norm}``; per layer ``text_encoder.encoder.layer.{i}``:
  ``attention.{self.{query,key,value}, output.{dense,LayerNorm}}`` -> ``attn``,
  ``crossattention.*`` -> ``cross``, ``intermediate.dense`` / ``output.{dense,LayerNorm}`` ->
  ``ffn/{fc1, fc2, norm}``;
* ``text_decoder.bert.encoder.layer.{i}.attention.*`` -> ``dec_attn`` (the decoder's own
  self-attention); ``text_decoder.cls.predictions.{transform.dense, transform.LayerNorm,
  bias}`` -> ``text/lm_head/{transform, norm, bias}``. Every other ``text_decoder.*`` entry is
  tied to the encoder's (``tie_encoder_decoder_weights``; the LM decoder to the word
  embedding): it must equal it, else the checkpoint is not a pre-training one (one-line error).
* The momentum copies (``*_m``) and the queues are not params: ``momentum_state`` returns
  them as the objective's ``extra`` (for resuming BLIP's own pre-training).

Head counts are not stored: ``num_heads`` (the ViT's) and ``text_heads`` (default 12, BERT).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional

import numpy as np

from fmjax.interop.hf_vit import _layer_norm, _linear, _Reader
from fmjax.interop.timm_vit import _heads, _width, convert_timm_vit, timm_state_dict

Params = Dict[str, Any]
MOMENTUM = re.compile(r"(visual_encoder_m|vision_proj_m|text_encoder_m|text_proj_m)\..*"
                      r"|image_queue|text_queue|queue_ptr|idx_queue|ptr_queue")


def _sub(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _bert_attention(r: _Reader, name: str, num_heads: int) -> Params:
    """med.py ``BertAttention`` -> ``PostNormAttention`` params."""
    def proj(p):
        lin = _linear(r, f"{name}.self.{p}")
        d_in = lin["kernel"].shape[0]
        return {"kernel": lin["kernel"].reshape(d_in, num_heads, -1),
                "bias": lin["bias"].reshape(num_heads, -1)}
    out = _linear(r, f"{name}.output.dense")
    out["kernel"] = out["kernel"].reshape(num_heads, -1, out["kernel"].shape[-1])
    return {"attn": {"query": proj("query"), "key": proj("key"), "value": proj("value"),
                     "out": out},
            "norm": _layer_norm(r, f"{name}.output.LayerNorm")}


def _dense(r: _Reader, name: str) -> Params:
    return _linear(r, name)


def text_layers(sd: Mapping[str, np.ndarray]) -> int:
    ids = {int(m.group(1)) for k in sd
           for m in [re.match(r"text_encoder\.encoder\.layer\.(\d+)\.", k)] if m}
    return max(ids) + 1 if ids else 0


def blip_kwargs_from_state_dict(state_dict: Mapping[str, Any], num_heads: Optional[int] = None,
                                text_heads: int = 12) -> Dict[str, Any]:
    """``config.model`` kwargs (``name='blip'``) read off a BLIP pre-training state dict."""
    from fmjax.interop.timm_vit import vit_kwargs_from_timm
    sd = timm_state_dict(state_dict)
    vis = _sub(sd, "visual_encoder.")
    image = dict(name="vit", **vit_kwargs_from_timm(vis, num_heads))
    word = sd["text_encoder.embeddings.word_embeddings.weight"]
    return dict(
        image=image, embed_dim=int(sd["vision_proj.weight"].shape[0]),
        text_width=int(word.shape[1]), text_depth=text_layers(sd), text_heads=text_heads,
        text_mlp_dim=int(sd["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0]),
        vocab_size=int(word.shape[0]),
        max_positions=int(sd["text_encoder.embeddings.position_embeddings.weight"].shape[0]))


def convert_blip(state_dict: Mapping[str, Any], num_heads: Optional[int] = None,
                 text_heads: int = 12) -> Params:
    """BLIP_Pretrain state dict -> ``fmjax.models.blip.BLIP`` params (module docstring)."""
    sd = timm_state_dict(state_dict)
    vis = _sub(sd, "visual_encoder.")
    if not vis:
        raise ValueError("Not a BLIP pre-training state dict: no visual_encoder.* keys.")
    heads = _heads(_width(vis), num_heads)
    params: Params = {"image": convert_timm_vit(vis, heads)}
    rest = {k: v for k, v in sd.items() if not k.startswith("visual_encoder.")
            and not MOMENTUM.fullmatch(k)}
    r = _Reader(rest, "BLIP")
    for name in ("vision_proj", "text_proj", "itm_head"):
        params[name] = _dense(r, name)
    params["temp"] = np.asarray(r("temp"), np.float32).reshape(())
    e = "text_encoder.embeddings"
    text: Params = {"word_embed": {"embedding": r(f"{e}.word_embeddings.weight")},
                    "pos_embed": r(f"{e}.position_embeddings.weight"),
                    "embed_norm": _layer_norm(r, f"{e}.LayerNorm")}
    for i in range(text_layers(sd)):
        enc, dec = f"text_encoder.encoder.layer.{i}", f"text_decoder.bert.encoder.layer.{i}"
        text[f"layer_{i}"] = {
            "attn": _bert_attention(r, f"{enc}.attention", text_heads),
            "dec_attn": _bert_attention(r, f"{dec}.attention", text_heads),
            "cross": _bert_attention(r, f"{enc}.crossattention", text_heads),
            "ffn": {"fc1": _dense(r, f"{enc}.intermediate.dense"),
                    "fc2": _dense(r, f"{enc}.output.dense"),
                    "norm": _layer_norm(r, f"{enc}.output.LayerNorm")}}
    p = "text_decoder.cls.predictions"
    text["lm_head"] = {"transform": _dense(r, f"{p}.transform.dense"),
                       "norm": _layer_norm(r, f"{p}.transform.LayerNorm"), "bias": r(f"{p}.bias")}
    params["text"] = text
    # The decoder's tied copies: the same tensors as the encoder's (and the word embedding).
    tied = {f"{p}.decoder.weight": f"{e}.word_embeddings.weight"}
    for k in rest:
        if k.startswith("text_decoder.bert.") and ".attention." not in k:
            tied[k] = "text_encoder." + k[len("text_decoder.bert."):]
    for k, src in tied.items():
        if k not in rest:
            continue
        r.used.add(k)
        if src not in rest or not np.array_equal(rest[k], rest[src]):
            raise ValueError(f"BLIP: {k} is not tied to {src} (as blip_pretrain ties them); this "
                             "is not a BLIP pre-training checkpoint (fmjax's BLIP shares them).")
    r.finish(ignore=(r"text_encoder\.embeddings\.position_ids", r"text_decoder\.bert\.embeddings\.position_ids",
                     r"text_decoder\.cls\.predictions\.decoder\.bias"))
    return params


def momentum_state(state_dict: Mapping[str, Any], num_heads: Optional[int] = None,
                   text_heads: int = 12) -> Params:
    """The momentum model and queues of a BLIP pre-training state dict as the objective's
    ``extra`` (``momentum``: image, vision_proj, text (its text-mode params), text_proj;
    ``image_queue`` / ``text_queue`` (Q, D); ``queue_ptr``)."""
    sd = timm_state_dict(state_dict)
    vis = _sub(sd, "visual_encoder_m.")
    heads = _heads(_width(vis), num_heads)
    r = _Reader({k: v for k, v in sd.items() if MOMENTUM.fullmatch(k)}, "BLIP momentum")
    mom: Params = {"image": convert_timm_vit(vis, heads)}
    for k in list(r.sd):
        if k.startswith("visual_encoder_m."):
            r.used.add(k)
    mom["vision_proj"] = _dense(r, "vision_proj_m")
    mom["text_proj"] = _dense(r, "text_proj_m")
    e = "text_encoder_m.embeddings"
    text: Params = {"word_embed": {"embedding": r(f"{e}.word_embeddings.weight")},
                    "pos_embed": r(f"{e}.position_embeddings.weight"),
                    "embed_norm": _layer_norm(r, f"{e}.LayerNorm")}
    n = len({k.split(".")[3] for k in r.sd if k.startswith("text_encoder_m.encoder.layer.")})
    for i in range(n):
        enc = f"text_encoder_m.encoder.layer.{i}"
        text[f"layer_{i}"] = {
            "attn": _bert_attention(r, f"{enc}.attention", text_heads),
            "ffn": {"fc1": _dense(r, f"{enc}.intermediate.dense"),
                    "fc2": _dense(r, f"{enc}.output.dense"),
                    "norm": _layer_norm(r, f"{enc}.output.LayerNorm")}}
    mom["text"] = text
    out: Params = {"momentum": mom}
    if "image_queue" in r.sd:
        out["image_queue"] = np.ascontiguousarray(r("image_queue").T)
        out["text_queue"] = np.ascontiguousarray(r("text_queue").T)
        out["queue_ptr"] = np.asarray(r("queue_ptr"), np.int32).reshape(())
    r.finish(ignore=(r"text_encoder_m\..*crossattention\..*", r".*position_ids", r"idx_queue",
                     r"ptr_queue"))
    return out


def convert_for_model_init(state_dict: Mapping[str, Any], model_config=None) -> Params:
    """``config.model_init.format='blip'``: the params, with the head counts from
    ``config.model`` (``image.num_heads``, else timm's by width; ``text_heads``, else 12)."""
    from fmjax.models.registry import model_fields
    fields = model_fields(model_config)
    image = dict(fields.get("image") or {})
    return convert_blip(state_dict, num_heads=image.get("num_heads"),
                        text_heads=int(fields.get("text_heads", 12)))
