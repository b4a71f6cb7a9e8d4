"""transformers ``SwinModel`` / ``SwinForImageClassification`` (and ``Swinv2Model`` /
``Swinv2ForImageClassification``) state dicts -> ``fmjax.models.swin.Swin`` params (plain numpy
tree).

Both key layouts load: the current one (``attention.q_proj`` / ``k_proj`` / ``v_proj`` /
``o_proj``, ``attention.relative_position_bias.relative_position_bias_table``, ``mlp.fc1`` /
``fc2``) and the one the published hub checkpoints (``microsoft/swin-*``) were saved in
(``attention.self.query`` / ``key`` / ``value``, ``attention.output.dense``,
``attention.self.relative_position_bias_table``, ``intermediate.dense``, ``output.dense``; its
``relative_position_index`` buffers are recomputed, so they are skipped). Linear (O, I)
kernels become (I, heads, head_dim) for q / k / v and (heads, head_dim, O) for the output;
``layernorm_before`` / ``after`` -> ``norm1`` / ``norm2``; ``downsample`` -> ``stage_{i}_merge``;
``layernorm`` -> ``norm``; ``classifier`` -> ``head``. Swin v2 (``model_type='swinv2'``, the older
names, no key bias): ``attention.self.logit_scale`` (heads, 1, 1) -> ``attn/logit_scale``
(heads,), ``continuous_position_bias_mlp.0`` / ``.2`` -> ``attn/cpb_in`` / ``attn/cpb_out``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

from fmjax.interop.hf_vit import _cfg, _Reader, _to_numpy

Params = Dict[str, Any]


def swin_kwargs_from_hf_config(cfg) -> Dict[str, Any]:
    """``SwinConfig`` (object or dict) -> ``Swin`` kwargs."""
    act = _cfg(cfg, "hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act={act!r} has no fmjax Swin equivalent (gelu only).")
    if not _cfg(cfg, "qkv_bias", True):
        raise ValueError("qkv_bias=False has no fmjax Swin equivalent (its attention has biases).")
    archs = _cfg(cfg, "architectures") or []
    labels = _cfg(cfg, "num_labels", 0) or 0
    size = _cfg(cfg, "image_size", 224)
    depths = tuple(_cfg(cfg, "depths"))
    v2 = {}
    if _is_v2(cfg):
        v2 = dict(version=2, pretrained_window_sizes=tuple(
            int(w) for w in (_cfg(cfg, "pretrained_window_sizes") or (0,) * len(depths))[:len(depths)]))
    return dict(**v2,embed_dim=int(_cfg(cfg, "embed_dim")), depths=tuple(_cfg(cfg, "depths")),
                num_heads=tuple(_cfg(cfg, "num_heads")), window_size=int(_cfg(cfg, "window_size")),
                patch_size=int(_cfg(cfg, "patch_size")), mlp_ratio=float(_cfg(cfg, "mlp_ratio", 4.0)),
                num_classes=labels if any("ImageClassification" in a for a in archs) else 0,
                absolute_pos_embed=bool(_cfg(cfg, "use_absolute_embeddings", False)),
                image_size=int(size[0] if isinstance(size, (list, tuple)) else size),
                layernorm_eps=float(_cfg(cfg, "layer_norm_eps", 1e-5)))


def _is_v2(cfg) -> bool:
    return _cfg(cfg, "model_type", "") == "swinv2" or any("Swinv2" in a for a in (_cfg(cfg, "architectures") or []))


def _t(x):
    return None if x is None else x.T   # a missing key is reported by the reader's finish()


def _linear(r, name):
    return {"kernel": _t(r(name + ".weight")), "bias": r(name + ".bias")}


def _ln(r, name):
    return {"scale": r(name + ".weight"), "bias": r(name + ".bias")}


def _heads_in(r, name, heads, bias=True):
    w, b = r(name + ".weight"), (r(name + ".bias") if bias else None)
    if w is None or (bias and b is None):
        return {}
    out, d = w.shape
    kb = {} if b is None else {"bias": b.reshape(heads, out // heads)}
    return {"kernel": w.T.reshape(d, heads, out // heads), **kb}


def _heads_out(r, name, heads):
    w, b = r(name + ".weight"), r(name + ".bias")
    if w is None:
        return {}
    out, d = w.shape
    return {"kernel": w.T.reshape(heads, d // heads, out), "bias": b}


def convert_hf_swin(state_dict: Mapping[str, Any], hf_config) -> Params:
    sd = {}
    for k, v in state_dict.items():
        if k.endswith(("relative_position_index", "relative_coords_table")):
            continue   # buffers, recomputed from the window size
        for prefix in ("swinv2.", "swin."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        sd[k] = _to_numpy(v)
    v2 = _is_v2(hf_config)
    r = _Reader(sd, "HF Swin")
    old = any(".attention.self.query." in k for k in sd)
    depths, heads = list(_cfg(hf_config, "depths")), list(_cfg(hf_config, "num_heads"))
    w = r("embeddings.patch_embeddings.projection.weight")
    params: Params = {"patch_embed": {"kernel": None if w is None else w.transpose(2, 3, 1, 0),
                                      "bias": r("embeddings.patch_embeddings.projection.bias")},
                      "patch_norm": _ln(r, "embeddings.norm")}
    if _cfg(hf_config, "use_absolute_embeddings", False):
        pos = r("embeddings.position_embeddings")   # (1, g * g, C)
        if pos is not None:
            g = int(round(pos.shape[1] ** 0.5))
            params["pos_embed"] = pos.reshape(1, g, g, pos.shape[-1])
    for i, (depth, nh) in enumerate(zip(depths, heads)):
        for j in range(depth):
            b = f"encoder.layers.{i}.blocks.{j}"
            a = f"{b}.attention"
            if old:
                q, k, v, o = (f"{a}.self.query", f"{a}.self.key", f"{a}.self.value", f"{a}.output.dense")
                table, fc1, fc2 = f"{a}.self.relative_position_bias_table", f"{b}.intermediate.dense", f"{b}.output.dense"
            else:
                q, k, v, o = (f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{a}.o_proj")
                table = f"{a}.relative_position_bias.relative_position_bias_table"
                fc1, fc2 = f"{b}.mlp.fc1", f"{b}.mlp.fc2"
            attn = {"query": _heads_in(r, q, nh), "key": _heads_in(r, k, nh, bias=not v2),
                    "value": _heads_in(r, v, nh), "out": _heads_out(r, o, nh)}
            if v2:
                scale = r(f"{a}.self.logit_scale")
                attn["logit_scale"] = None if scale is None else scale.reshape(-1)
                attn["cpb_in"] = _linear(r, f"{a}.self.continuous_position_bias_mlp.0")
                attn["cpb_out"] = {"kernel": _t(r(f"{a}.self.continuous_position_bias_mlp.2.weight"))}
            else:
                attn["relative_position_bias_table"] = r(table)
            params[f"stage_{i}_block_{j}"] = {
                "norm1": _ln(r, f"{b}.layernorm_before"), "norm2": _ln(r, f"{b}.layernorm_after"),
                "attn": attn, "mlp": {"fc1": _linear(r, fc1), "fc2": _linear(r, fc2)}}
        if i < len(depths) - 1:
            d = f"encoder.layers.{i}.downsample"
            params[f"stage_{i}_merge"] = {"norm": _ln(r, f"{d}.norm"),
                                          "reduction": {"kernel": _t(r(f"{d}.reduction.weight"))}}
    params["norm"] = _ln(r, "layernorm")
    if "classifier.weight" in sd:
        params["head"] = _linear(r, "classifier")
    r.finish()
    return params
