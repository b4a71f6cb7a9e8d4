"""transformers ``ConvNextModel`` / ``ConvNextV2Model`` (and ``...ForImageClassification``)
state dicts -> ``fmjax.models.convnext.ConvNeXt`` params (plain numpy tree).

Convolutions (O, I/groups, kh, kw) become flax (kh, kw, I/groups, O); Linear (O, I) kernels
are transposed; ``layer_scale_parameter`` -> ``gamma``; V2's ``grn.weight`` / ``grn.bias``
(1, 1, 1, C) -> ``grn/gamma`` / ``grn/beta`` (C,); ``classifier`` -> ``head``. The final
``layernorm`` (eps ``config.layer_norm_eps``) is ``head_norm``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

from fmjax.interop.hf_vit import _Reader, _cfg, _to_numpy

Params = Dict[str, Any]


def convnext_kwargs_from_hf_config(cfg) -> Dict[str, Any]:
    """``ConvNextConfig`` / ``ConvNextV2Config`` (object or dict) -> ``ConvNeXt`` kwargs."""
    act = _cfg(cfg, "hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act={act!r} has no fmjax ConvNeXt equivalent (gelu only).")
    archs = _cfg(cfg, "architectures") or []
    v2 = _cfg(cfg, "model_type", "") == "convnextv2" or any("V2" in a for a in archs)
    labels = _cfg(cfg, "num_labels", 0) or 0
    return dict(depths=tuple(_cfg(cfg, "depths")), dims=tuple(_cfg(cfg, "hidden_sizes")),
                num_classes=labels if any("ImageClassification" in a for a in archs) else 0,
                patch_size=int(_cfg(cfg, "patch_size", 4)), grn=v2,
                layer_scale_init=0.0 if v2 else float(_cfg(cfg, "layer_scale_init_value", 1e-6)),
                head_norm_eps=float(_cfg(cfg, "layer_norm_eps", 1e-12)))


def _conv(r, name):
    w, b = r(name + ".weight"), r(name + ".bias")
    return {"kernel": w.transpose(2, 3, 1, 0), "bias": b}


def _linear(r, name):
    return {"kernel": r(name + ".weight").T, "bias": r(name + ".bias")}


def _ln(r, name):
    return {"scale": r(name + ".weight"), "bias": r(name + ".bias")}


def convert_hf_convnext(state_dict: Mapping[str, Any], hf_config) -> Params:
    sd = {}
    for k, v in state_dict.items():
        for prefix in ("convnextv2.", "convnext."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        sd[k] = _to_numpy(v)
    r = _Reader(sd, "HF ConvNeXt")
    depths = list(_cfg(hf_config, "depths"))
    params: Params = {"stem": _conv(r, "embeddings.patch_embeddings"),
                      "stem_norm": _ln(r, "embeddings.layernorm")}
    for i, depth in enumerate(depths):
        s = f"encoder.stages.{i}"
        if i > 0:
            params[f"downsample_{i}_norm"] = _ln(r, f"{s}.downsampling_layer.0")
            params[f"downsample_{i}_conv"] = _conv(r, f"{s}.downsampling_layer.1")
        for j in range(depth):
            b = f"{s}.layers.{j}"
            block = {"dwconv": _conv(r, f"{b}.dwconv"), "norm": _ln(r, f"{b}.layernorm"),
                     "fc1": _linear(r, f"{b}.pwconv1"), "fc2": _linear(r, f"{b}.pwconv2")}
            if f"{b}.layer_scale_parameter" in sd:  # V1 with layer scale
                block["gamma"] = r(f"{b}.layer_scale_parameter")
            if f"{b}.grn.weight" in sd:  # V2
                block["grn"] = {"gamma": r(f"{b}.grn.weight").reshape(-1),
                                "beta": r(f"{b}.grn.bias").reshape(-1)}
            params[f"stage_{i}_block_{j}"] = block
    params["head_norm"] = _ln(r, "layernorm")
    if "classifier.weight" in sd:
        params["head"] = _linear(r, "classifier")
    r.finish()
    return params
