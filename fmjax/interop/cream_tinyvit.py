"""microsoft/Cream TinyViT state dicts (``TinyViT/models/tiny_vit.py``; the published
checkpoints ``tiny_vit_{5m,11m,21m}_*.pth`` hold it under ``'model'``) ->
``fmjax.models.tinyvit.TinyViT`` variables (plain numpy trees).

``Conv2d_BN`` ``c.weight`` (O, I/groups, kh, kw) -> ``conv/kernel`` (kh, kw, I/groups, O);
``bn.weight`` / ``bias`` -> ``bn/scale`` / ``bias`` (params), ``bn.running_mean`` /
``running_var`` -> ``bn/mean`` / ``var`` (``batch_stats``; ``num_batches_tracked`` is not
kept: flax's BatchNorm has a fixed momentum). ``attn.qkv`` (3 C, C) holds, per head, q, k
and v (``view(B, N, heads, -1).split([d, d, d])``): it becomes ``attn/query`` / ``key`` /
``value`` kernels (C, heads, d) and biases (heads, d); ``attn.proj`` -> ``attn/out`` (heads, d,
C); ``attn.attention_biases`` (heads, ws^2) is kept as is (its ``attention_bias_idxs`` buffer,
a function of the window, is recomputed); ``attn.norm`` / ``mlp.norm`` -> ``norm1`` /
``norm2``; ``layers.0.blocks.{j}`` -> ``stage_0_block_{j}`` (MBConv), ``layers.{i}.blocks.{j}``
-> ``stage_{i}_block_{j}``, ``layers.{i}.downsample`` -> ``stage_{i}_merge``,
``patch_embed.seq.0`` / ``.2`` -> ``patch_embed/conv1`` / ``conv2``, ``norm_head`` ->
``head_norm``.

The architecture is read off the state dict (``tinyvit_kwargs_from_cream``: widths, depths,
heads and windows from the ``attention_biases`` shapes, the ratios and the local conv size),
so no config is needed. ``config.model_init`` (format ``cream_tinyvit``) loads the params;
``convert_cream_tinyvit_variables`` also gives the running statistics (``batch_stats``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

from fmjax.interop.hf_swin import _linear, _ln
from fmjax.interop.hf_vit import _Reader
from fmjax.interop.timm_vit import _depth, timm_state_dict

Params = Dict[str, Any]
IGNORED = (r".*\.attention_bias_idxs", r".*\.num_batches_tracked")


def tinyvit_kwargs_from_cream(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``TinyViT`` kwargs of a Cream state dict (its shapes). The convolutional first
    stage has no attention: its ``num_heads`` / ``window_sizes`` entries are 1 (unused)."""
    sd = timm_state_dict(state_dict)
    if "patch_embed.seq.2.c.weight" not in sd:
        raise KeyError("no patch_embed.seq.2.c.weight: not a Cream TinyViT state dict.")
    n = _depth(sd, "layers")
    depths = tuple(_depth(sd, rf"layers\.{i}\.blocks") for i in range(n))
    dims = (sd["patch_embed.seq.2.c.weight"].shape[0],) + tuple(
        sd[f"layers.{i}.downsample.conv1.c.weight"].shape[0] for i in range(n - 1))
    heads, windows = [1], [1]
    for i in range(1, n):
        table = sd[f"layers.{i}.blocks.0.attn.attention_biases"]
        heads.append(int(table.shape[0]))
        windows.append(math.isqrt(int(table.shape[1])))
    expand = sd["layers.0.blocks.0.conv1.c.weight"].shape[0] / dims[0]
    kw = dict(embed_dims=dims, depths=depths, num_heads=tuple(heads), window_sizes=tuple(windows),
              mbconv_expand_ratio=float(expand),
              num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0)
    if n > 1:
        kw["mlp_ratio"] = sd["layers.1.blocks.0.mlp.fc1.weight"].shape[0] / dims[1]
        kw["local_conv_size"] = int(sd["layers.1.blocks.0.local_conv.c.weight"].shape[-1])
    return kw


def _conv_bn(r, name, stats):
    stats[name] = {"bn": {"mean": r(f"{name}.bn.running_mean"), "var": r(f"{name}.bn.running_var")}}
    w = r(f"{name}.c.weight")
    return {"conv": {"kernel": None if w is None else w.transpose(2, 3, 1, 0)},
            "bn": {"scale": r(f"{name}.bn.weight"), "bias": r(f"{name}.bn.bias")}}


def _attention(r, name, heads):
    w, b = r(f"{name}.qkv.weight"), r(f"{name}.qkv.bias")
    p = {"attention_biases": r(f"{name}.attention_biases")}
    if w is not None and b is not None:
        c = w.shape[1]
        w, b = w.reshape(heads, 3, -1, c), b.reshape(heads, 3, -1)
        for i, proj in enumerate(("query", "key", "value")):
            p[proj] = {"kernel": w[:, i].transpose(2, 0, 1), "bias": b[:, i]}
    out = _linear(r, f"{name}.proj")
    if out["kernel"] is not None:
        out["kernel"] = out["kernel"].reshape(heads, -1, out["kernel"].shape[-1])
    p["out"] = out
    return p


def convert_cream_tinyvit_variables(state_dict: Mapping[str, Any],
                                    model_config: Optional[Mapping[str, Any]] = None) -> Dict[str, Params]:
    """``{'params': ..., 'batch_stats': ...}`` of a Cream TinyViT state dict (``model_config``
    is not needed: the shapes give the architecture)."""
    sd = timm_state_dict(state_dict)
    kw = tinyvit_kwargs_from_cream(sd)
    r = _Reader(sd, "Cream TinyViT")
    stats: Params = {}
    params: Params = {}

    def conv_bns(prefix, names, dst):
        group_stats = {}
        params[dst] = {n: _conv_bn(r, f"{prefix}.{src}", group_stats) for n, src in names.items()}
        stats[dst] = {n: group_stats[f"{prefix}.{src}"] for n, src in names.items()}

    conv_bns("patch_embed.seq", {"conv1": "0", "conv2": "2"}, "patch_embed")
    mbconv = {f"conv{k}": f"conv{k}" for k in (1, 2, 3)}
    for i, depth in enumerate(kw["depths"]):
        for j in range(depth):
            b, dst = f"layers.{i}.blocks.{j}", f"stage_{i}_block_{j}"
            if i == 0:
                conv_bns(b, mbconv, dst)
                continue
            block_stats = {}
            params[dst] = {"norm1": _ln(r, f"{b}.attn.norm"),
                           "attn": _attention(r, f"{b}.attn", kw["num_heads"][i]),
                           "local_conv": _conv_bn(r, f"{b}.local_conv", block_stats),
                           "norm2": _ln(r, f"{b}.mlp.norm"),
                           "mlp": {"fc1": _linear(r, f"{b}.mlp.fc1"), "fc2": _linear(r, f"{b}.mlp.fc2")}}
            stats[dst] = {"local_conv": block_stats[f"{b}.local_conv"]}
        if i < len(kw["depths"]) - 1:
            conv_bns(f"layers.{i}.downsample", mbconv, f"stage_{i}_merge")
    params["head_norm"] = _ln(r, "norm_head")
    if "head.weight" in sd:
        params["head"] = _linear(r, "head")
    r.finish(ignore=IGNORED)
    return {"params": params, "batch_stats": stats}


def convert_cream_tinyvit(state_dict: Mapping[str, Any], model_config: Optional[Mapping[str, Any]] = None) -> Params:
    """The ``params`` of a Cream TinyViT state dict (``config.model_init`` format
    ``cream_tinyvit``); the running statistics are ``convert_cream_tinyvit_variables``'s."""
    return convert_cream_tinyvit_variables(state_dict, model_config)["params"]
