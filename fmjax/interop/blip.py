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
    """A BLIP state dict -> ``fmjax.models.blip.BLIP`` params (module docstring).

    A pre-training checkpoint (``text_encoder`` and ``text_decoder``) gives every param. The
    fine-tuned halves give what they have: a retrieval / ITM model (``text_encoder`` only, as
    ``blip_retrieval`` / ``blip_itm``) no ``dec_attn`` / ``lm_head`` / ``temp``; a captioner
    (``text_decoder`` only, ``blip_decoder``) its decoder, whose embeddings, cross-attention
    and feed-forward fill the shared params, and no ``attn`` / projections / ``itm_head``. Load
    those with ``config.model_init`` (the missing params keep their init)."""
    sd = timm_state_dict(state_dict)
    vis = _sub(sd, "visual_encoder.")
    if not vis:
        raise ValueError("Not a BLIP state dict: no visual_encoder.* keys.")
    heads = _heads(_width(vis), num_heads)
    params: Params = {"image": convert_timm_vit(vis, heads)}
    rest = {k: v for k, v in sd.items() if not k.startswith("visual_encoder.")
            and not MOMENTUM.fullmatch(k)}
    has_enc = any(k.startswith("text_encoder.") for k in rest)
    has_dec = any(k.startswith("text_decoder.") for k in rest)
    if not (has_enc or has_dec):
        raise ValueError("Not a BLIP state dict: no text_encoder.* or text_decoder.* keys.")
    r = _Reader(rest, "BLIP")
    for name in ("vision_proj", "text_proj", "itm_head"):
        if f"{name}.weight" in rest or has_enc:
            params[name] = _dense(r, name)
    if "temp" in rest:
        params["temp"] = np.asarray(r("temp"), np.float32).reshape(())
    shared = "text_encoder" if has_enc else "text_decoder.bert"
    e = f"{shared}.embeddings"
    text: Params = {"word_embed": {"embedding": r(f"{e}.word_embeddings.weight")},
                    "pos_embed": r(f"{e}.position_embeddings.weight"),
                    "embed_norm": _layer_norm(r, f"{e}.LayerNorm")}
    depth = text_layers(sd) if has_enc else len({
        k.split(".")[4] for k in rest if k.startswith("text_decoder.bert.encoder.layer.")})
    for i in range(depth):
        base, dec = f"{shared}.encoder.layer.{i}", f"text_decoder.bert.encoder.layer.{i}"
        layer: Params = {}
        if has_enc:
            layer["attn"] = _bert_attention(r, f"{base}.attention", text_heads)
        if has_dec:
            layer["dec_attn"] = _bert_attention(r, f"{dec}.attention", text_heads)
        layer["cross"] = _bert_attention(r, f"{base}.crossattention", text_heads)
        layer["ffn"] = {"fc1": _dense(r, f"{base}.intermediate.dense"),
                        "fc2": _dense(r, f"{base}.output.dense"),
                        "norm": _layer_norm(r, f"{base}.output.LayerNorm")}
        text[f"layer_{i}"] = layer
    p = "text_decoder.cls.predictions"
    if has_dec:
        text["lm_head"] = {"transform": _dense(r, f"{p}.transform.dense"),
                           "norm": _layer_norm(r, f"{p}.transform.LayerNorm"),
                           "bias": r(f"{p}.bias")}
    params["text"] = text
    # Tied copies: the LM decoder is the word embedding; with both halves, the decoder's
    # embeddings, cross-attention and feed-forward are the encoder's (tie_encoder_decoder_weights).
    tied = {f"{p}.decoder.weight": f"{e}.word_embeddings.weight"}
    if has_enc:
        for k in rest:
            if k.startswith("text_decoder.bert.") and ".attention." not in k:
                tied[k] = "text_encoder." + k[len("text_decoder.bert."):]
    for k, src in tied.items():
        if k not in rest:
            continue
        r.used.add(k)
        if src not in rest or not np.array_equal(rest[k], rest[src]):
            raise ValueError(f"BLIP: {k} is not tied to {src} (as BLIP ties them); fmjax's BLIP "
                             "shares them, so this checkpoint does not fit it.")
    r.finish(ignore=(r"text_(encoder|decoder\.bert)\.embeddings\.position_ids",
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
