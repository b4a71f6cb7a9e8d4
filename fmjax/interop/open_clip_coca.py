"""Convert open_clip ``CoCa`` weights (``coca_ViT-B-32``, ``coca_ViT-L-14`` and their shapes)
into ``fmjax.models.coca.CoCa`` params.

Input: a state dict (name -> torch.Tensor / numpy array) or a ``.safetensors`` path (no pickle
is loaded). The towers map as open_clip's CLIP does (``fmjax.interop.hf_clip.convert_open_clip``:
fused ``in_proj``, no conv bias); CoCa adds

  visual.attn_pool.query / ln_q / attn.{q,k,v}_proj_weight, in_proj_bias, out_proj
      -> attn_pool/query, attn_pool/norm_q, attn_pool/attn/{query,key,value,out}
  visual.attn_pool.ln_k  -> image/encoder/norm   (fmjax's ViT final norm is the pooler's ln_k)
  visual.ln_post         -> ln_post              (on the pooled queries)
  visual.proj            -> image_proj/kernel
  text.cls_emb           -> text/cls_embed
  text.ln_final          -> text/encoder/norm
  text_decoder.resblocks.{i} -> decoder/block_{i};  text_decoder.cross_attn.{i} -> decoder/cross_{i}
      (``ln_1`` -> norm1, ``ln_1_kv`` -> norm_kv, ``ln_2`` -> norm2, ``mlp.c_fc/c_proj`` -> fc1/fc2)
  text_decoder.ln_final / text_projection -> decoder/norm, decoder/head/kernel

With open_clip's ``attentional_pool='parallel'`` / ``'cascade'`` (the paper's separate
contrastive pooler; ``CoCa.pooler_type``) the vision side maps instead

  visual.ln_post -> image/encoder/norm (before both poolers)
  visual.attn_pool.ln_k -> attn_pool/norm_k
  visual.attn_pool_contrastive.* -> attn_pool_contrastive/* (query, norm_q, norm_k, attn)

``coca_kwargs_from_open_clip`` reads the shapes back into ``CoCa`` kwargs (heads from
``head_dim`` 64 as open_clip's configs, the pooler's heads given; ``pooler_type`` given for a
state dict with ``attn_pool_contrastive``: its shapes do not tell parallel from cascade).
"""
from typing import Any, Dict, Optional

import numpy as np

from fmjax.interop.hf_clip import (Params, StateDict, _heads, _layer_norm, _linear, _load,
                                   _oc_block, _oc_depth, _out, _patch_embed)
from fmjax.interop.hf_vit import _Reader


def _attention(r: _Reader, name: str, num_heads: int) -> Params:
    """open_clip ``Attention`` with fused (``in_proj_weight``) or separate q/k/v weights."""
    b = r(f"{name}.in_proj_bias")
    if f"{name}.in_proj_weight" in r.sd:
        fused = r(f"{name}.in_proj_weight")
        d = fused.shape[0] // 3
        ws = [fused[i * d:(i + 1) * d] for i in range(3)]
    else:
        ws = [r(f"{name}.{k}_proj_weight") for k in ("q", "k", "v")]
    d = ws[0].shape[0]
    attn = {ours: _heads(w.T, b[i * d:(i + 1) * d], num_heads)
            for i, (ours, w) in enumerate(zip(("query", "key", "value"), ws))}
    p = _linear(r, f"{name}.out_proj")
    attn["out"] = _out(p["kernel"], p["bias"], num_heads)
    return attn


def _depth(sd, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def _pooler_type(sd, pooler_type: Optional[str]) -> str:
    """'tok' for open_clip's default CoCa; the given 'parallel' / 'cascade' for a state dict
    with a separate contrastive pooler (ValueError when it is missing or contradicts the keys)."""
    separate = "visual.attn_pool_contrastive.query" in sd
    if not separate:
        if pooler_type not in (None, "tok"):
            raise ValueError(f"pooler_type={pooler_type!r}, but the state dict has no "
                             "visual.attn_pool_contrastive (open_clip's default 'tok' CoCa).")
        return "tok"
    if pooler_type not in ("parallel", "cascade"):
        raise ValueError("the state dict has a separate contrastive pooler (visual.attn_pool_contrastive): "
                         "give pooler_type='parallel' or 'cascade' (open_clip's attentional_pool).")
    return pooler_type


def coca_kwargs_from_open_clip(state_dict: StateDict, activation: str = "gelu",
                               head_dim: int = 64, pooler_heads: int = 8,
                               legacy_cls_mask: bool = True,
                               pooler_type: Optional[str] = None) -> Dict[str, Any]:
    """``CoCa`` kwargs from an open_clip CoCa state dict's shapes. ``activation``: 'gelu'
    (open_clip's CoCa configs; 'quick_gelu' only with ``quick_gelu=True``). ``legacy_cls_mask``
    True: open_clip's default text mask (``correct_cls_mask=False``). ``pooler_type``: see
    ``_pooler_type``."""
    sd = _load(state_dict)
    conv, tok = sd["visual.conv1.weight"], sd["text.token_embedding.weight"]
    width, text_width = conv.shape[0], tok.shape[1]
    query = sd["visual.attn_pool.query"]
    return dict(
        width=width, depth=_oc_depth(sd, "visual."), num_heads=width // head_dim,
        mlp_dim=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        patch_size=conv.shape[-1], embed_dim=sd["visual.proj"].shape[1],
        text_width=text_width, text_depth=_oc_depth(sd, "text."), text_heads=text_width // head_dim,
        text_mlp_dim=sd["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        vocab_size=tok.shape[0], context_length=sd["text.positional_embedding"].shape[0] - 1,
        activation=activation, layernorm_eps=1e-5, loss="softmax", patch_bias=False,
        num_queries=query.shape[0], pooler_heads=pooler_heads, pooler_type=_pooler_type(sd, pooler_type),
        decoder_depth=_depth(sd, "text_decoder.resblocks."),
        decoder_heads=sd["text_decoder.ln_final.weight"].shape[0] // head_dim,
        decoder_mlp_dim=sd["text_decoder.resblocks.0.mlp.c_fc.weight"].shape[0],
        pad_id=0, legacy_cls_mask=legacy_cls_mask)


def convert_open_clip_coca(state_dict: StateDict, num_heads: Optional[int] = None,
                           text_heads: Optional[int] = None, decoder_heads: Optional[int] = None,
                           pooler_heads: int = 8, head_dim: int = 64,
                           pooler_type: Optional[str] = None) -> Params:
    """open_clip ``CoCa`` state dict -> ``CoCa`` params (the module docstring's table).
    Heads default to width / ``head_dim``; ``pooler_heads`` is open_clip's
    ``attn_pooler_heads`` (8 in its CoCa configs); ``pooler_type`` as
    ``coca_kwargs_from_open_clip``'s. Unknown keys fail, named."""
    sd = _load(state_dict)
    one_pooler = _pooler_type(sd, pooler_type) == "tok"
    r = _Reader(sd, "open_clip CoCa")
    conv, tok = r("visual.conv1.weight"), r("text.token_embedding.weight")
    if conv is None or tok is None:
        r.finish()
    num_heads = num_heads or conv.shape[0] // head_dim
    text_heads = text_heads or tok.shape[1] // head_dim
    dec_width = sd["text_decoder.ln_final.weight"].shape[0]
    decoder_heads = decoder_heads or dec_width // head_dim

    def blocks(prefix, heads):
        return {f"block_{i}": _oc_block(r, f"{prefix}{i}", heads)
                for i in range(_depth(sd, prefix))}

    def cross(i):
        name = f"text_decoder.cross_attn.{i}"
        return {"norm1": _layer_norm(r, f"{name}.ln_1"), "norm_kv": _layer_norm(r, f"{name}.ln_1_kv"),
                "attn": _attention(r, f"{name}.attn", decoder_heads),
                "norm2": _layer_norm(r, f"{name}.ln_2"),
                "mlp": {"fc1": _linear(r, f"{name}.mlp.c_fc"), "fc2": _linear(r, f"{name}.mlp.c_proj")}}

    def pooler(name, norm_k):
        out = {"query": r(f"{name}.query"), "norm_q": _layer_norm(r, f"{name}.ln_q"),
               "attn": _attention(r, f"{name}.attn", pooler_heads)}
        if norm_k:
            out["norm_k"] = _layer_norm(r, f"{name}.ln_k")
        return out

    cls, pos = r("visual.class_embedding"), r("visual.positional_embedding")
    image_encoder = blocks("visual.transformer.resblocks.", num_heads)
    image_encoder["norm"] = _layer_norm(r, "visual.attn_pool.ln_k" if one_pooler else "visual.ln_post")
    text_encoder = blocks("text.transformer.resblocks.", text_heads)
    text_encoder["norm"] = _layer_norm(r, "text.ln_final")
    decoder = blocks("text_decoder.resblocks.", decoder_heads)
    decoder.update({f"cross_{i}": cross(i) for i in range(_depth(sd, "text_decoder.cross_attn."))})
    decoder["norm"] = _layer_norm(r, "text_decoder.ln_final")
    decoder["head"] = {"kernel": r("text_decoder.text_projection")}
    params = {
        "image": {
            "patch_embed": _patch_embed(conv),
            "cls_token": None if cls is None else cls.reshape(1, 1, -1),
            "pos_embed": None if pos is None else pos[None],
            "pre_norm": _layer_norm(r, "visual.ln_pre"),
            "encoder": image_encoder,
        },
        "image_proj": {"kernel": r("visual.proj")},
        "text": {
            "token_embed": {"embedding": tok},
            "pos_embed": r("text.positional_embedding"),
            "cls_embed": r("text.cls_emb"),
            "encoder": text_encoder,
            "proj": {"kernel": r("text.text_projection")},
        },
        "decoder": decoder,
        "logit_scale": np.asarray(r("logit_scale")).reshape(()),
    }
    if one_pooler:
        params["attn_pool"] = pooler("visual.attn_pool", norm_k=False)
        params["ln_post"] = _layer_norm(r, "visual.ln_post")
    else:
        params["attn_pool"] = pooler("visual.attn_pool", norm_k=True)
        params["attn_pool_contrastive"] = pooler("visual.attn_pool_contrastive", norm_k=True)
    r.finish(ignore=(r".*attn_mask",))
    return params


def convert_for_model_init(state_dict: StateDict, model_config=None) -> Params:
    """``config.model_init.format='open_clip_coca'``: the head counts from ``config.model``
    (its ``variant`` preset and fields), else width / 64 and 8 pooler heads."""
    from fmjax.models.registry import model_fields
    kwargs = model_fields(model_config)
    return convert_open_clip_coca(state_dict, num_heads=kwargs.get("num_heads"),
                                  text_heads=kwargs.get("text_heads"),
                                  decoder_heads=kwargs.get("decoder_heads"),
                                  pooler_heads=kwargs.get("pooler_heads", 8),
                                  pooler_type=kwargs.get("pooler_type", "tok"))
