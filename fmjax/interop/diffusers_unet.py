"""Convert diffusers ``UNet2DModel`` weights into ``fmjax.models.unet.UNet`` params.

Inputs are state dicts (name -> torch.Tensor or numpy array) from ``model.state_dict()``
or a ``.safetensors`` file (``load_safetensors``; no pickle is ever loaded). Hub
checkpoints saved with the deprecated attention names (``query``, ``key``, ``value``,
``proj_attn``) are renamed as diffusers does on load. ``unet_kwargs_from_diffusers_config``
gives the matching UNet kwargs; the result of ``convert_diffusers_unet`` is a plain
(unboxed) ``params`` tree.

Supported: block types DownBlock2D / AttnDownBlock2D / UpBlock2D / AttnUpBlock2D (with
or without the ``UNetRes`` prefix), ``UNetMidBlock2D`` (with or without attention),
positional time embedding (any ``flip_sin_to_cos`` / ``freq_shift``), class embedding by
``num_class_embeds`` (class_embed_type None), ``resnet_time_scale_shift`` default /
scale_shift, conv up/downsampling with any ``downsample_padding``. Anything else raises
ValueError naming the option.
"""
import re
from typing import Any, Dict, Mapping, Sequence


from fmjax.interop.hf_vit import _cfg, _Reader, _to_numpy, load_safetensors  # noqa: F401

Params = Dict[str, Any]

_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
# Deprecated attention-block names -> current ``Attention`` names (diffusers
# ModelMixin._convert_deprecated_attention_blocks).
_RENAMES = (
    (r"(attentions\.\d+)\.query\.", r"\1.to_q."),
    (r"(attentions\.\d+)\.key\.", r"\1.to_k."),
    (r"(attentions\.\d+)\.value\.", r"\1.to_v."),
    (r"(attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
)


def _block_types(names: Sequence[str], table: Dict[str, bool], what: str):
    out = []
    for name in names:
        base = name[7:] if name.startswith("UNetRes") else name
        if base not in table:
            raise ValueError(f"{what} block type {name!r} has no fmjax UNet equivalent; "
                             f"supported: {sorted(table)}.")
        out.append(table[base])
    return out


def unet_kwargs_from_diffusers_config(cfg) -> Dict[str, Any]:
    """``UNet2DModel.config`` (object or dict) -> kwargs for ``fmjax.models.unet.UNet``.

    ``num_class_embeds = K`` gives ``num_classes = K - 1``: fmjax's table has
    ``num_classes + 1`` rows and treats the last as the null (CFG) class; labels index
    the same rows either way. ``dropout`` is copied (diffusers' default is 0.0, DDPM's
    0.1). A missing ``sample_size`` is taken as 2**(levels - 1) to place the attention
    levels. Raises ValueError for options the fmjax UNet does not implement.
    """
    def check(key, allowed, default):
        value = _cfg(cfg, key, default)
        if value not in allowed:
            raise ValueError(f"diffusers {key}={value!r} is not supported; "
                             f"supported: {list(allowed)}.")
        return value

    check("time_embedding_type", ("positional",), "positional")
    check("class_embed_type", (None,), None)
    check("center_input_sample", (False,), False)
    check("downsample_type", ("conv",), "conv")
    check("upsample_type", ("conv",), "conv")
    check("act_fn", ("silu", "swish"), "silu")
    check("mid_block_type", ("UNetMidBlock2D",), "UNetMidBlock2D")
    shift = check("resnet_time_scale_shift", ("default", "scale_shift"), "default")
    chans = [int(c) for c in _cfg(cfg, "block_out_channels")]
    if any(c % chans[0] for c in chans):
        raise ValueError(f"block_out_channels {chans} are not multiples of the first; the "
                         "fmjax UNet uses channels * channel_mult.")
    down = _block_types(_cfg(cfg, "down_block_types"), _DOWN, "Down")
    up = _block_types(_cfg(cfg, "up_block_types"), _UP, "Up")
    if len(down) != len(chans) or up != down[::-1]:
        raise ValueError(f"Attention in down blocks {down} and (reversed) up blocks {up} must "
                         "match level by level for the fmjax UNet.")
    levels = len(chans)
    size = _cfg(cfg, "sample_size") or 2 ** (levels - 1)
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ValueError(f"Only square sample_size is supported, got {size}.")
        size = size[0]
    size = int(size)
    groups = _cfg(cfg, "norm_num_groups", 32)
    if groups is None:
        raise ValueError("norm_num_groups=None is not supported; set it explicitly.")
    num_class_embeds = _cfg(cfg, "num_class_embeds")
    return dict(
        channels=chans[0], channel_mult=tuple(c // chans[0] for c in chans),
        num_res_blocks=int(_cfg(cfg, "layers_per_block", 2)),
        attention_resolutions=tuple(size // 2 ** i for i in range(levels) if down[i]),
        sample_size=size, dropout=float(_cfg(cfg, "dropout", 0.0)), num_groups=int(groups),
        norm_eps=float(_cfg(cfg, "norm_eps", 1e-5)),
        attention_head_dim=_cfg(cfg, "attention_head_dim", 8),
        time_embed_dim=_cfg(cfg, "time_embedding_dim"),
        flip_sin_to_cos=bool(_cfg(cfg, "flip_sin_to_cos", True)),
        freq_shift=float(_cfg(cfg, "freq_shift", 0)),
        downsample_padding=int(_cfg(cfg, "downsample_padding", 1)),
        resnet_time_scale_shift=shift,
        attn_norm_num_groups=_cfg(cfg, "attn_norm_num_groups"),
        mid_attention=bool(_cfg(cfg, "add_attention", True)),
        mid_block_scale_factor=float(_cfg(cfg, "mid_block_scale_factor", 1.0)),
        num_classes=int(num_class_embeds) - 1 if num_class_embeds else 0,
        out_channels=int(_cfg(cfg, "out_channels", 3)))


def _conv(r: _Reader, name: str) -> Params:
    """Conv2d weight (O, I, kh, kw) -> flax kernel (kh, kw, I, O)."""
    w, b = r(name + ".weight"), r(name + ".bias")
    return {} if w is None or b is None else {"kernel": w.transpose(2, 3, 1, 0), "bias": b}


def _linear(r: _Reader, name: str) -> Params:
    w, b = r(name + ".weight"), r(name + ".bias")
    return {} if w is None or b is None else {"kernel": w.T, "bias": b}


def _norm(r: _Reader, name: str) -> Params:
    return {"scale": r(name + ".weight"), "bias": r(name + ".bias")}


def _resnet(r: _Reader, name: str, c_in: int, c_out: int) -> Params:
    """ResnetBlock2D; a 1x1 ``conv_shortcut`` exists when in != out channels."""
    out = {"norm1": _norm(r, f"{name}.norm1"), "conv1": _conv(r, f"{name}.conv1"),
           "time_emb_proj": _linear(r, f"{name}.time_emb_proj"),
           "norm2": _norm(r, f"{name}.norm2"), "conv2": _conv(r, f"{name}.conv2")}
    if c_in != c_out:
        out["conv_shortcut"] = _conv(r, f"{name}.conv_shortcut")
    return out


def _attention(r: _Reader, name: str, head_dim, norm: bool = True) -> Params:
    """Attention (to_q/to_k/to_v (C, C), to_out.0) -> [group_norm] + MultiHeadAttention."""
    out = {}
    if norm:
        out["group_norm"] = _norm(r, f"{name}.group_norm")
    attn = {}
    for ours, theirs in (("query", "to_q"), ("key", "to_k"), ("value", "to_v")):
        p = _linear(r, f"{name}.{theirs}")
        if p:
            c = p["kernel"].shape[0]
            heads = c // head_dim if head_dim else 1
            p = {"kernel": p["kernel"].reshape(c, heads, -1), "bias": p["bias"].reshape(heads, -1)}
        attn[ours] = p
    p = _linear(r, f"{name}.to_out.0")
    if p:
        c = p["kernel"].shape[-1]
        heads = c // head_dim if head_dim else 1
        p["kernel"] = p["kernel"].reshape(heads, -1, c)
    attn["out"] = p
    out["attn"] = attn
    return out


def convert_diffusers_unet(state_dict: Mapping[str, Any], config) -> Params:
    """``UNet2DModel`` state dict + its config -> ``UNet`` params (see module docstring)."""
    kw = unet_kwargs_from_diffusers_config(config)
    sd = {}
    for key, value in state_dict.items():
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        sd[key] = _to_numpy(value)
    r = _Reader(sd, "diffusers UNet2DModel")
    levels = len(kw["channel_mult"])
    attn = [kw["sample_size"] // 2 ** i in kw["attention_resolutions"] for i in range(levels)]
    head_dim = kw["attention_head_dim"]
    params: Params = {
        "conv_in": _conv(r, "conv_in"),
        "time_embedding": {"linear_1": _linear(r, "time_embedding.linear_1"),
                           "linear_2": _linear(r, "time_embedding.linear_2")},
    }
    if kw["num_classes"]:
        params["class_embedding"] = {"embedding": r("class_embedding.weight")}
    n = kw["num_res_blocks"]
    chans = [kw["channels"] * m for m in kw["channel_mult"]]
    for i in range(levels):
        block = {}
        for j in range(n):
            c_in = chans[max(i - 1, 0)] if j == 0 else chans[i]
            block[f"resnets_{j}"] = _resnet(r, f"down_blocks.{i}.resnets.{j}", c_in, chans[i])
            if attn[i]:
                block[f"attentions_{j}"] = _attention(r, f"down_blocks.{i}.attentions.{j}",
                                                      head_dim)
        if i != levels - 1:
            block["downsample"] = _conv(r, f"down_blocks.{i}.downsamplers.0.conv")
        params[f"down_blocks_{i}"] = block
    mid = {f"resnets_{j}": _resnet(r, f"mid_block.resnets.{j}", chans[-1], chans[-1])
           for j in range(2)}
    if kw["mid_attention"]:
        mid_norm = (kw["attn_norm_num_groups"] is not None
                    or kw["resnet_time_scale_shift"] == "default")
        mid["attentions_0"] = _attention(r, "mid_block.attentions.0", head_dim, mid_norm)
    params["mid_block"] = mid
    for k in range(levels):
        i = levels - 1 - k
        block = {}
        for j in range(n + 1):  # input: [h, skip]; the last skip comes from the level below
            c_h = chans[min(i + 1, levels - 1)] if j == 0 else chans[i]
            c_skip = chans[max(i - 1, 0)] if j == n else chans[i]
            block[f"resnets_{j}"] = _resnet(r, f"up_blocks.{k}.resnets.{j}", c_h + c_skip,
                                            chans[i])
            if attn[i]:
                block[f"attentions_{j}"] = _attention(r, f"up_blocks.{k}.attentions.{j}",
                                                      head_dim)
        if i != 0:
            block["upsample"] = _conv(r, f"up_blocks.{k}.upsamplers.0.conv")
        params[f"up_blocks_{k}"] = block
    params["conv_norm_out"] = _norm(r, "conv_norm_out")
    params["conv_out"] = _conv(r, "conv_out")
    r.finish()
    return params
