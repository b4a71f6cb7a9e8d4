"""transformers ``ResNetModel`` / ``ResNetForImageClassification`` state dicts ->
``fmjax.models.resnet.ResNet`` variables (plain numpy trees).

``embedder.embedder`` -> ``stem``; ``encoder.stages.{i}.layers.{j}`` -> ``stage_{i}_block_{j}``
with ``layer.{0,1,2}`` -> ``conv1`` / ``conv2`` / ``conv3`` (basic blocks: two) and
``shortcut`` -> ``shortcut``; each ``convolution`` (O, I, kh, kw) -> ``conv/kernel`` (kh, kw, I,
O) and each ``normalization`` -> ``bn`` (``weight`` / ``bias`` -> ``scale`` / ``bias``;
``running_mean`` / ``running_var`` -> the ``batch_stats`` ``mean`` / ``var``;
``num_batches_tracked`` is dropped: flax's momentum is fixed); ``classifier.1`` -> ``head``.
The transformers layout is torchvision's ResNet v1.5 (the stride on the 3x3 conv;
``downsample_in_bottleneck=True`` moves it to the first 1x1, as fmjax's option does).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

from fmjax.interop.hf_vit import _Reader, _cfg, _to_numpy

Params = Dict[str, Any]


def resnet_kwargs_from_hf_config(cfg) -> Dict[str, Any]:
    """``ResNetConfig`` (object or dict) -> ``ResNet`` kwargs; one-line errors for what fmjax's
    ResNet lacks."""
    act = _cfg(cfg, "hidden_act", "relu")
    if act != "relu":
        raise ValueError(f"hidden_act={act!r} has no fmjax ResNet equivalent (relu only).")
    if _cfg(cfg, "downsample_in_first_stage", False):
        raise ValueError("downsample_in_first_stage=True (a stride-2 first stage) has no fmjax ResNet "
                         "equivalent (stage 0 has stride 1, as torchvision's ResNet).")
    layer = _cfg(cfg, "layer_type", "bottleneck")
    if layer not in ("basic", "bottleneck"):
        raise ValueError(f"layer_type={layer!r}; fmjax's ResNet has 'basic' and 'bottleneck' blocks.")
    archs = _cfg(cfg, "architectures") or []
    labels = _cfg(cfg, "num_labels", 0) or 0
    return dict(depths=tuple(int(d) for d in _cfg(cfg, "depths")),
                dims=tuple(int(d) for d in _cfg(cfg, "hidden_sizes")), block=layer,
                stem_width=int(_cfg(cfg, "embedding_size", 64)), stem="imagenet",
                downsample_in_bottleneck=bool(_cfg(cfg, "downsample_in_bottleneck", False)),
                num_classes=labels if any("ImageClassification" in a for a in archs) else 0)


def _conv_bn(r: _Reader, name: str) -> Tuple[Params, Params]:
    w = r(name + ".convolution.weight")
    params = {"conv": {"kernel": None if w is None else w.transpose(2, 3, 1, 0)},
              "bn": {"scale": r(name + ".normalization.weight"), "bias": r(name + ".normalization.bias")}}
    stats = {"bn": {"mean": r(name + ".normalization.running_mean"),
                    "var": r(name + ".normalization.running_var")}}
    return params, stats


def convert_hf_resnet_variables(state_dict: Mapping[str, Any], hf_config) -> Dict[str, Params]:
    """``{'params': ..., 'batch_stats': ...}`` for ``ResNet(**resnet_kwargs_from_hf_config(cfg))``."""
    sd = {(k[len("resnet."):] if k.startswith("resnet.") else k): _to_numpy(v)
          for k, v in state_dict.items()}
    r = _Reader(sd, "HF ResNet")
    params: Params = {}
    stats: Params = {}
    params["stem"], stats["stem"] = _conv_bn(r, "embedder.embedder")
    layer = _cfg(hf_config, "layer_type", "bottleneck")
    convs = ("conv1", "conv2", "conv3") if layer == "bottleneck" else ("conv1", "conv2")
    for i, depth in enumerate(_cfg(hf_config, "depths")):
        for j in range(int(depth)):
            src, dst = f"encoder.stages.{i}.layers.{j}", f"stage_{i}_block_{j}"
            p, s = {}, {}
            for n, conv in enumerate(convs):
                p[conv], s[conv] = _conv_bn(r, f"{src}.layer.{n}")
            if f"{src}.shortcut.convolution.weight" in sd:
                p["shortcut"], s["shortcut"] = _conv_bn(r, f"{src}.shortcut")
            params[dst], stats[dst] = p, s
    if "classifier.1.weight" in sd:
        params["head"] = {"kernel": r("classifier.1.weight").T, "bias": r("classifier.1.bias")}
    r.finish(ignore=(r".*num_batches_tracked",))
    return {"params": params, "batch_stats": stats}


def convert_hf_resnet(state_dict: Mapping[str, Any], hf_config) -> Params:
    """The ``params`` alone (``config.model_init`` format ``hf_resnet``; the running statistics
    are ``convert_hf_resnet_variables``' ``batch_stats``)."""
    return convert_hf_resnet_variables(state_dict, hf_config)["params"]
