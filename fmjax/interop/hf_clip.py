"""Convert Hugging Face ``CLIPModel`` and open_clip / OpenAI CLIP weights into fmjax params.

Inputs are state dicts (name -> torch.Tensor or numpy array) or a path to a
``.safetensors`` file (read with ``hf_vit.load_safetensors``; no pickle is
ever loaded). The result is a plain (unboxed) ``params`` tree for
``fmjax.models.clip.CLIP``.

Neither source has a patch-embedding bias (the conv is ``bias=False``), so
``image/patch_embed/proj/bias`` is set to zeros, and the kwargs functions give
``patch_bias=False`` (the bias stays zero in training too; tests/reference/test_owl_trajectory.py
caught a converted model training one).
"""
import math
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from fmjax.interop.hf_vit import (_Reader, _cfg, _int_size, _layer_norm, _linear, _to_numpy,
                                  load_safetensors)

Params = Dict[str, Any]
StateDict = Union[str, Mapping[str, Any]]
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh"}


def _load(state_dict: StateDict) -> Dict[str, np.ndarray]:
    if isinstance(state_dict, str):
        state_dict = load_safetensors(state_dict)
    return {k: _to_numpy(v) for k, v in state_dict.items()}


def _heads(kernel: np.ndarray, bias: np.ndarray, num_heads: int) -> Params:
    """(D, H*K) kernel and (H*K,) bias -> DenseND (D, H, K) / (H, K)."""
    return {"kernel": kernel.reshape(kernel.shape[0], num_heads, -1),
            "bias": bias.reshape(num_heads, -1)}


def _out(kernel: np.ndarray, bias: np.ndarray, num_heads: int) -> Params:
    """(H*K, D) kernel -> DenseND (H, K, D)."""
    return {"kernel": kernel.reshape(num_heads, -1, kernel.shape[-1]), "bias": bias}


def _patch_embed(w: Optional[np.ndarray]) -> Params:
    """Conv weight (D, C, p, p), no bias -> ``PatchEmbed`` Dense (p*p*C, D) + zero bias."""
    if w is None:
        return {}
    return {"proj": {"kernel": w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]),
                     "bias": np.zeros((w.shape[0],), np.float32)}}


# ------------------------------------------------------------------ Hugging Face


def _hf_block(r: _Reader, name: str, num_heads: int) -> Params:
    """One HF ``CLIPEncoderLayer`` -> fmjax ``layers.Block`` params."""
    attn = {}
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        p = _linear(r, f"{name}.self_attn.{theirs}")
        attn[ours] = _heads(p["kernel"], p["bias"], num_heads) if p else {}
    p = _linear(r, f"{name}.self_attn.out_proj")
    attn["out"] = _out(p["kernel"], p["bias"], num_heads) if p else {}
    return {
        "norm1": _layer_norm(r, f"{name}.layer_norm1"),
        "attn": attn,
        "norm2": _layer_norm(r, f"{name}.layer_norm2"),
        "mlp": {"fc1": _linear(r, f"{name}.mlp.fc1"), "fc2": _linear(r, f"{name}.mlp.fc2")},
    }


def _hf_encoder(r: _Reader, prefix: str, cfg, final_norm: str) -> Params:
    heads = _cfg(cfg, "num_attention_heads")
    enc = {f"block_{i}": _hf_block(r, f"{prefix}.encoder.layers.{i}", heads)
           for i in range(_cfg(cfg, "num_hidden_layers"))}
    enc["norm"] = _layer_norm(r, f"{prefix}.{final_norm}")
    return enc


def _activation(cfg) -> str:
    act = _cfg(cfg, "hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} has no fmjax equivalent; "
                         f"supported: {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[act]


def clip_kwargs_from_hf_config(cfg) -> Dict[str, Any]:
    """``CLIPConfig`` (object or dict) -> kwargs for ``fmjax.models.clip.CLIP``.

    The text pooling follows HF: ``eos_token_id == 2`` (legacy configs) pools at
    the argmax token id, any other id at its first occurrence.
    """
    v, t = _cfg(cfg, "vision_config"), _cfg(cfg, "text_config")
    eps_v, eps_t = _cfg(v, "layer_norm_eps", 1e-5), _cfg(t, "layer_norm_eps", 1e-5)
    if eps_v != eps_t:
        raise ValueError(f"Vision and text layer_norm_eps differ ({eps_v} vs {eps_t}); "
                         "fmjax's CLIP uses one layernorm_eps for both towers.")
    eos = _cfg(t, "eos_token_id", 2)
    return dict(
        width=_cfg(v, "hidden_size"), depth=_cfg(v, "num_hidden_layers"),
        num_heads=_cfg(v, "num_attention_heads"), mlp_dim=_cfg(v, "intermediate_size"),
        patch_size=_int_size(_cfg(v, "patch_size")), embed_dim=_cfg(cfg, "projection_dim"),
        text_width=_cfg(t, "hidden_size"), text_depth=_cfg(t, "num_hidden_layers"),
        text_heads=_cfg(t, "num_attention_heads"), text_mlp_dim=_cfg(t, "intermediate_size"),
        vocab_size=_cfg(t, "vocab_size"), context_length=_cfg(t, "max_position_embeddings"),
        text_pool="argmax" if eos == 2 else "eos", eos_token_id=eos,
        activation=_activation(v), text_activation=_activation(t), layernorm_eps=eps_v,
        loss="softmax", logit_scale_init=_cfg(cfg, "logit_scale_init_value", math.log(1 / .07)),
        patch_bias=False)


def convert_hf_clip(state_dict: StateDict, hf_config) -> Params:
    """transformers ``CLIPModel`` state dict (or .safetensors path) -> ``CLIP`` params.

    ``position_ids`` buffers, when saved, are ignored.
    """
    sd = _load(state_dict)
    r = _Reader(sd, "HF CLIP")
    v, t = _cfg(hf_config, "vision_config"), _cfg(hf_config, "text_config")
    cls, pos = r("vision_model.embeddings.class_embedding"), \
        r("vision_model.embeddings.position_embedding.weight")
    scale, proj_i, proj_t = r("logit_scale"), r("visual_projection.weight"), \
        r("text_projection.weight")
    params = {
        "image": {
            "patch_embed": _patch_embed(r("vision_model.embeddings.patch_embedding.weight")),
            "cls_token": None if cls is None else cls.reshape(1, 1, -1),
            "pos_embed": None if pos is None else pos[None],
            "pre_norm": _layer_norm(r, "vision_model.pre_layrnorm"),
            "encoder": _hf_encoder(r, "vision_model", v, "post_layernorm"),
        },
        "image_proj": {"kernel": None if proj_i is None else proj_i.T},
        "text": {
            "token_embed": {"embedding": r("text_model.embeddings.token_embedding.weight")},
            "pos_embed": r("text_model.embeddings.position_embedding.weight"),
            "encoder": _hf_encoder(r, "text_model", t, "final_layer_norm"),
            "proj": {"kernel": None if proj_t is None else proj_t.T},
        },
        "logit_scale": scale,
    }
    r.finish(ignore=(r".*position_ids",))
    return params


# ------------------------------------------------------------------ open_clip / OpenAI


def _oc_block(r: _Reader, name: str, num_heads: int) -> Params:
    """One open_clip ``ResidualAttentionBlock`` (fused in_proj) -> ``layers.Block`` params."""
    w, b = r(f"{name}.attn.in_proj_weight"), r(f"{name}.attn.in_proj_bias")
    attn = {}
    if w is not None and b is not None:
        for i, ours in enumerate(("query", "key", "value")):
            d = w.shape[0] // 3
            attn[ours] = _heads(w[i * d:(i + 1) * d].T, b[i * d:(i + 1) * d], num_heads)
    p = _linear(r, f"{name}.attn.out_proj")
    attn["out"] = _out(p["kernel"], p["bias"], num_heads) if p else {}
    return {
        "norm1": _layer_norm(r, f"{name}.ln_1"),
        "attn": attn,
        "norm2": _layer_norm(r, f"{name}.ln_2"),
        "mlp": {"fc1": _linear(r, f"{name}.mlp.c_fc"), "fc2": _linear(r, f"{name}.mlp.c_proj")},
    }


def _oc_depth(sd: Mapping[str, Any], prefix: str) -> int:
    start = f"{prefix}transformer.resblocks."
    ids = {int(k[len(start):].split(".")[0]) for k in sd if k.startswith(start)}
    return max(ids) + 1 if ids else 0


def clip_kwargs_from_open_clip(state_dict: StateDict, activation: str,
                               head_dim: int = 64) -> Dict[str, Any]:
    """Infer ``CLIP`` kwargs from an open_clip / OpenAI state dict's shapes.

    ``activation`` cannot be inferred: 'quick_gelu' for OpenAI-trained weights,
    'gelu' for most open_clip (LAION, DataComp) ones. Heads = width / ``head_dim``
    (64 in every OpenAI and open_clip ViT config). Text pooling is open_clip's
    default 'argmax' (the EOT id is the largest in its vocabulary).
    """
    sd = _load(state_dict)
    conv, tok = sd["visual.conv1.weight"], sd["token_embedding.weight"]
    width, text_width = conv.shape[0], tok.shape[1]
    return dict(
        width=width, depth=_oc_depth(sd, "visual."), num_heads=width // head_dim,
        mlp_dim=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        patch_size=conv.shape[-1], embed_dim=sd["text_projection"].shape[1],
        text_width=text_width, text_depth=_oc_depth(sd, ""), text_heads=text_width // head_dim,
        text_mlp_dim=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        vocab_size=tok.shape[0], context_length=sd["positional_embedding"].shape[0],
        text_pool="argmax", activation=activation, layernorm_eps=1e-5,
        loss="sigmoid" if "logit_bias" in sd else "softmax", patch_bias=False)


def convert_open_clip(state_dict: StateDict, num_heads: Optional[int] = None,
                      text_heads: Optional[int] = None, head_dim: int = 64) -> Params:
    """open_clip ``CLIP`` (or OpenAI ``clip``) state dict -> ``CLIP`` params.

    Handles the fused ``attn.in_proj_weight`` (3D, D) / ``in_proj_bias``, the
    (in, out) ``visual.proj`` and ``text_projection`` and an optional
    ``logit_bias``. Heads default to width / ``head_dim``. Models with custom
    text towers (HF text encoders), attention pooling or layer scale are not
    supported and fail naming the unexpected keys.
    """
    sd = _load(state_dict)
    r = _Reader(sd, "open_clip CLIP")
    conv, tok = r("visual.conv1.weight"), r("token_embedding.weight")
    if conv is None or tok is None:
        r.finish()
    num_heads = num_heads or conv.shape[0] // head_dim
    text_heads = text_heads or tok.shape[1] // head_dim

    def encoder(prefix, heads, final_norm):
        enc = {f"block_{i}": _oc_block(r, f"{prefix}transformer.resblocks.{i}", heads)
               for i in range(_oc_depth(sd, prefix))}
        enc["norm"] = _layer_norm(r, final_norm)
        return enc

    cls, pos = r("visual.class_embedding"), r("visual.positional_embedding")
    params = {
        "image": {
            "patch_embed": _patch_embed(conv),
            "cls_token": None if cls is None else cls.reshape(1, 1, -1),
            "pos_embed": None if pos is None else pos[None],
            "pre_norm": _layer_norm(r, "visual.ln_pre"),
            "encoder": encoder("visual.", num_heads, "visual.ln_post"),
        },
        "image_proj": {"kernel": r("visual.proj")},
        "text": {
            "token_embed": {"embedding": tok},
            "pos_embed": r("positional_embedding"),
            "encoder": encoder("", text_heads, "ln_final"),
            "proj": {"kernel": r("text_projection")},
        },
        "logit_scale": r("logit_scale"),
    }
    if "logit_bias" in sd:
        params["logit_bias"] = r("logit_bias")
    r.finish(ignore=(r"attn_mask", r".*\.attn_mask"))
    return params
