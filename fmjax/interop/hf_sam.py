"""transformers ``SamModel`` state dicts -> ``fmjax.models.sam.SAM`` params (plain numpy tree).

Accepts ``SamModel.state_dict()`` and the published checkpoints in the HF layout
(``facebook/sam-vit-base`` / ``-large`` / ``-huge``: the same key names at full size; every
shape comes from the tensors, head counts from the config), with or without a ``sam.``
prefix. The random-Fourier matrix is stored twice in HF (``shared_image_embedding`` and the
tied ``prompt_encoder.shared_embedding``); either is used and the two must agree.

Layout changes: Linear (out, in) kernels are transposed; the vision ``qkv`` (3D, D) is split
into ``query`` / ``key`` / ``value`` (D, heads, head_dim); attention ``out`` kernels are
(heads, head_dim, D); the patch-embedding conv becomes a dense kernel over (p, p, C)-flattened
patches; convs (O, I, kh, kw) -> (kh, kw, I, O); transposed convs (I, O, 2, 2) -> (I, 2, 2, O);
``point_embed.{i}`` (1, D) are stacked to ``point_embed`` (4, D).

``sam_kwargs_from_hf_config(cfg)``: ``SamConfig`` (object or config.json dict) -> ``SAM``
kwargs. Parity: ``tests/interop/test_sam_parity.py``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np

from fmjax.interop.hf_vit import _Reader, _cfg, _to_numpy

Params = Dict[str, Any]


def _sub(cfg, key):
    sub = _cfg(cfg, key)
    return {} if sub is None else sub


def sam_kwargs_from_hf_config(cfg) -> Dict[str, Any]:
    """``SamConfig`` (object or dict) -> ``fmjax.models.sam.SAM`` kwargs."""
    v, pr, md = _sub(cfg, "vision_config"), _sub(cfg, "prompt_encoder_config"), _sub(cfg, "mask_decoder_config")
    image_size, patch = int(_cfg(v, "image_size", 1024)), int(_cfg(v, "patch_size", 16))
    width = int(_cfg(v, "hidden_size", 768))
    mlp_dim = _cfg(v, "mlp_dim") or int(width * float(_cfg(v, "mlp_ratio", 4.0)))
    out = int(_cfg(v, "output_channels", 256))
    for name, sub in (("vision_config", v), ("prompt_encoder_config", pr)):
        if _cfg(sub, "hidden_act", "gelu") != "gelu":
            raise ValueError(f"{name}.hidden_act={_cfg(sub, 'hidden_act')!r}: fmjax SAM uses gelu.")
    if _cfg(md, "hidden_act", "relu") != "relu":
        raise ValueError(f"mask_decoder_config.hidden_act={_cfg(md, 'hidden_act')!r}: fmjax SAM uses relu.")
    if int(_cfg(pr, "hidden_size", out)) != out or int(_cfg(md, "hidden_size", out)) != out:
        raise ValueError("The prompt encoder's and mask decoder's hidden_size must equal the vision "
                         f"output_channels={out}.")
    if 2 * int(_cfg(v, "num_pos_feats", out // 2)) != out:
        raise ValueError(f"vision_config.num_pos_feats must be output_channels / 2 = {out // 2}.")
    if int(_cfg(pr, "image_size", image_size)) != image_size or int(_cfg(pr, "patch_size", patch)) != patch:
        raise ValueError("prompt_encoder_config image_size / patch_size must match the vision config's.")
    if int(_cfg(pr, "num_point_embeddings", 4)) != 4:
        raise ValueError("prompt_encoder_config.num_point_embeddings must be 4.")
    eps_v, eps_p, eps_m = (float(_cfg(c, "layer_norm_eps", 1e-6)) for c in (v, pr, md))
    if not (eps_v == eps_p == eps_m):
        raise ValueError(f"layer_norm_eps differ between sub-configs ({eps_v}, {eps_p}, {eps_m}).")
    return dict(
        image_size=image_size, patch_size=patch, in_chans=int(_cfg(v, "num_channels", 3)),
        width=width, depth=int(_cfg(v, "num_hidden_layers", 12)),
        num_heads=int(_cfg(v, "num_attention_heads", 12)), mlp_dim=int(mlp_dim),
        window_size=int(_cfg(v, "window_size", 14)),
        global_attn_indexes=tuple(int(i) for i in _cfg(v, "global_attn_indexes", (2, 5, 8, 11))),
        use_abs_pos=bool(_cfg(v, "use_abs_pos", True)), use_rel_pos=bool(_cfg(v, "use_rel_pos", True)),
        qkv_bias=bool(_cfg(v, "qkv_bias", True)), prompt_dim=out,
        mask_in_chans=int(_cfg(pr, "mask_input_channels", 16)), pe_scale=float(width // 2),
        decoder_depth=int(_cfg(md, "num_hidden_layers", 2)),
        decoder_heads=int(_cfg(md, "num_attention_heads", 8)),
        decoder_mlp_dim=int(_cfg(md, "mlp_dim", 2048)),
        attention_downsample_rate=int(_cfg(md, "attention_downsample_rate", 2)),
        num_multimask_outputs=int(_cfg(md, "num_multimask_outputs", 3)),
        iou_head_depth=int(_cfg(md, "iou_head_depth", 3)),
        iou_head_hidden_dim=int(_cfg(md, "iou_head_hidden_dim", 256)), eps=eps_v)


def _linear(r: _Reader, name: str, bias: bool = True) -> Params:
    w = r(name + ".weight")
    out = {} if w is None else {"kernel": w.T}
    if bias:
        b = r(name + ".bias")
        if b is not None:
            out["bias"] = b
    return out


def _ln(r: _Reader, name: str) -> Params:
    return {"scale": r(name + ".weight"), "bias": r(name + ".bias")}


def _conv(r: _Reader, name: str, bias: bool = True) -> Params:
    w = r(name + ".weight")
    out = {} if w is None else {"kernel": w.transpose(2, 3, 1, 0)}
    if bias:
        out["bias"] = r(name + ".bias")
    return out


def _conv_t(r: _Reader, name: str) -> Params:
    w = r(name + ".weight")
    return {"kernel": None if w is None else w.transpose(0, 2, 3, 1), "bias": r(name + ".bias")}


def _heads(p: Params, num_heads: int) -> Params:
    """A Linear (kernel (D, I), bias (I,)) -> DenseND (D, heads, I / heads)."""
    if "kernel" not in p:
        return p
    d, i = p["kernel"].shape
    out = {"kernel": p["kernel"].reshape(d, num_heads, i // num_heads)}
    if "bias" in p:
        out["bias"] = p["bias"].reshape(num_heads, i // num_heads)
    return out


def _out(p: Params, num_heads: int) -> Params:
    if "kernel" not in p:
        return p
    i, d = p["kernel"].shape
    return dict(p, kernel=p["kernel"].reshape(num_heads, i // num_heads, d))


def _dec_attention(r: _Reader, name: str, num_heads: int) -> Params:
    return {"query": _heads(_linear(r, name + ".q_proj"), num_heads),
            "key": _heads(_linear(r, name + ".k_proj"), num_heads),
            "value": _heads(_linear(r, name + ".v_proj"), num_heads),
            "out": _out(_linear(r, name + ".out_proj"), num_heads)}


def _vision_attention(r: _Reader, name: str, num_heads: int) -> Params:
    w, b = r(name + ".qkv.weight"), r(name + ".qkv.bias")
    out: Params = {}
    if w is not None:
        d = w.shape[1]
        for j, part in enumerate(("query", "key", "value")):
            p = {"kernel": w[j * d:(j + 1) * d].T}
            if b is not None:
                p["bias"] = b[j * d:(j + 1) * d]
            out[part] = _heads(p, num_heads)
    out["out"] = _out(_linear(r, name + ".proj"), num_heads)
    for k in ("rel_pos_h", "rel_pos_w"):
        if f"{name}.{k}" in r.sd:
            out[k] = r(f"{name}.{k}")
    return out


def _feed_forward(r: _Reader, name: str, num_layers: int) -> Params:
    out = {"proj_in": _linear(r, name + ".proj_in"), "proj_out": _linear(r, name + ".proj_out")}
    for j in range(num_layers - 2):
        out[f"layers_{j}"] = _linear(r, f"{name}.layers.{j}")
    return out


def _count(sd, pattern: str) -> int:
    import re
    return len({m.group(1) for k in sd for m in [re.match(pattern, k)] if m})


def convert_hf_sam(state_dict: Mapping[str, Any], cfg) -> Params:
    """A ``SamModel`` state dict (+ its ``SamConfig`` or config.json dict) -> ``SAM`` params.
    Missing or unexpected keys raise a KeyError naming them."""
    sd = {}
    for k, v in state_dict.items():
        sd[k[len("sam."):] if k.startswith("sam.") else k] = _to_numpy(v)
    kw = sam_kwargs_from_hf_config(cfg)
    vh, dh = kw["num_heads"], kw["decoder_heads"]
    r = _Reader(sd, "SamModel")

    # Image encoder.
    ve = "vision_encoder"
    enc: Params = {}
    w = r(f"{ve}.patch_embed.projection.weight")
    if w is not None:
        enc["patch_embed"] = {"proj": {"kernel": w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]),
                                       "bias": r(f"{ve}.patch_embed.projection.bias")}}
    if kw["use_abs_pos"]:
        enc["pos_embed"] = r(f"{ve}.pos_embed")
    depth = _count(sd, rf"{ve}\.layers\.(\d+)\.")
    if depth != kw["depth"]:
        raise ValueError(f"the state dict has {depth} vision layers, the config {kw['depth']}.")
    for i in range(depth):
        n = f"{ve}.layers.{i}"
        enc[f"block_{i}"] = {"norm1": _ln(r, n + ".layer_norm1"),
                             "attn": _vision_attention(r, n + ".attn", vh),
                             "norm2": _ln(r, n + ".layer_norm2"),
                             "mlp": {"fc1": _linear(r, n + ".mlp.lin1"), "fc2": _linear(r, n + ".mlp.lin2")}}
    enc["neck"] = {"conv1": _conv(r, f"{ve}.neck.conv1", bias=False), "norm1": _ln(r, f"{ve}.neck.layer_norm1"),
                   "conv2": _conv(r, f"{ve}.neck.conv2", bias=False), "norm2": _ln(r, f"{ve}.neck.layer_norm2")}

    # Prompt encoder (the tied Fourier matrix may be stored under either name, or both).
    names = [k for k in ("shared_image_embedding.positional_embedding",
                         "prompt_encoder.shared_embedding.positional_embedding") if k in sd]
    if not names:
        r.missing.append("shared_image_embedding.positional_embedding")
        gauss = None
    else:
        gauss = r(names[0])
        for other in names[1:]:
            if not np.array_equal(r(other), gauss):
                raise ValueError(f"{names[0]} and {other} differ (they are tied in SamModel).")
    pe = "prompt_encoder"
    n_points = _count(sd, rf"{pe}\.point_embed\.(\d+)\.weight")
    points = [r(f"{pe}.point_embed.{j}.weight") for j in range(n_points)]
    md = f"{pe}.mask_embed"
    prompt = {
        "pe_layer": {"gaussian": gauss},
        "point_embed": np.concatenate(points, axis=0) if points and all(p is not None for p in points) else None,
        "not_a_point_embed": r(f"{pe}.not_a_point_embed.weight"),
        "no_mask_embed": r(f"{pe}.no_mask_embed.weight"),
        "mask_downscaling": {"conv1": _conv(r, md + ".conv1"), "norm1": _ln(r, md + ".layer_norm1"),
                             "conv2": _conv(r, md + ".conv2"), "norm2": _ln(r, md + ".layer_norm2"),
                             "conv3": _conv(r, md + ".conv3")},
    }

    # Mask decoder.
    m = "mask_decoder"
    t = f"{m}.transformer"
    trans: Params = {}
    for i in range(_count(sd, rf"{t}\.layers\.(\d+)\.")):
        n = f"{t}.layers.{i}"
        trans[f"layers_{i}"] = {
            "self_attn": _dec_attention(r, n + ".self_attn", dh), "norm1": _ln(r, n + ".layer_norm1"),
            "cross_attn_token_to_image": _dec_attention(r, n + ".cross_attn_token_to_image", dh),
            "norm2": _ln(r, n + ".layer_norm2"),
            "mlp": {"fc1": _linear(r, n + ".mlp.lin1"), "fc2": _linear(r, n + ".mlp.lin2")},
            "norm3": _ln(r, n + ".layer_norm3"), "norm4": _ln(r, n + ".layer_norm4"),
            "cross_attn_image_to_token": _dec_attention(r, n + ".cross_attn_image_to_token", dh)}
    trans["final_attn_token_to_image"] = _dec_attention(r, t + ".final_attn_token_to_image", dh)
    trans["norm_final_attn"] = _ln(r, t + ".layer_norm_final_attn")
    decoder: Params = {
        "iou_token": r(f"{m}.iou_token.weight"), "mask_tokens": r(f"{m}.mask_tokens.weight"),
        "transformer": trans,
        "upscale_conv1": _conv_t(r, f"{m}.upscale_conv1"), "upscale_norm": _ln(r, f"{m}.upscale_layer_norm"),
        "upscale_conv2": _conv_t(r, f"{m}.upscale_conv2"),
        "iou_prediction_head": _feed_forward(r, f"{m}.iou_prediction_head", kw["iou_head_depth"]),
    }
    for i in range(kw["num_multimask_outputs"] + 1):
        decoder[f"output_hypernetworks_mlps_{i}"] = _feed_forward(r, f"{m}.output_hypernetworks_mlps.{i}", 3)
    r.finish()
    return {"image_encoder": enc, "prompt_encoder": prompt, "mask_decoder": decoder}
