"""Export plans for open_clip (``CLIP``) and diffusers (``UNet`` -> ``UNet2DModel``).

open_clip: the state dict of open_clip's ``CLIP`` (fused ``attn.in_proj_weight``, (in, out)
``visual.proj`` / ``text_projection``, optional ``logit_bias``), key shapes listed here and
checked by inverting ``hf_clip.convert_open_clip``, and the model config in the layout of
open_clip's ``model_configs/*.json`` (``embed_dim``, ``quick_gelu``, ``vision_cfg``,
``text_cfg``, ``init_logit_bias``), which ``open_clip.create_model('local-dir:DIR')`` reads
from ``open_clip_config.json`` under ``model_cfg``.

diffusers: the ``UNet2DModel`` config inverse to ``unet_kwargs_from_diffusers_config``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from fmjax.errors import ConfigError
from fmjax.interop.export_hf import Plan, channels, check_clip, check_kwargs, clip_params, square_grid

# ---------------------------------------------------------------------------------- open_clip


def _oc_act(model):
    """(quick_gelu flag, vision act_kwargs, text act_kwargs) for open_clip's GELU / QuickGELU."""
    acts = (model.activation, model.text_activation or model.activation)
    if acts[0] == "quick_gelu" or acts[1] == "quick_gelu":
        if acts != ("quick_gelu", "quick_gelu"):
            raise ConfigError(f"activation={acts[0]!r} with text_activation={acts[1]!r}: open_clip "
                              "uses QuickGELU for both towers or neither (its quick_gelu flag).")
        return True, None, None
    kw = []
    for act, name in zip(acts, ("activation", "text_activation")):
        if act not in ("gelu", "gelu_tanh"):
            raise ConfigError(f"model.{name}={act!r} has no open_clip equivalent; supported: "
                              "gelu, gelu_tanh, quick_gelu.")
        kw.append({"approximate": "tanh"} if act == "gelu_tanh" else None)
    return False, kw[0], kw[1]


def _ratio(mlp: int, width: int, option: str) -> float:
    ratio = mlp / width
    if int(width * ratio) != mlp:
        raise ConfigError(f"{option}={mlp} is not int(width * mlp_ratio) for any float mlp_ratio "
                          f"(width {width}), as open_clip computes it.")
    return ratio


def check_open_clip(model) -> None:
    check_clip(model, "open_clip")
    _oc_act(model)
    if model.width % model.num_heads:
        raise ConfigError(f"model.width={model.width} is not a multiple of num_heads={model.num_heads}.")
    _ratio(model.mlp_dim, model.width, "model.mlp_dim")
    _ratio(model.text_mlp_dim, model.text_width, "model.text_mlp_dim")


def open_clip_config(model, image_size: int) -> Dict[str, Any]:
    quick, v_act, t_act = _oc_act(model)
    vision = dict(image_size=image_size, layers=model.depth, width=model.width,
                  head_width=model.width // model.num_heads,
                  mlp_ratio=_ratio(model.mlp_dim, model.width, "model.mlp_dim"),
                  patch_size=model.patch_size)
    text = dict(context_length=model.context_length, vocab_size=model.vocab_size,
                width=model.text_width, heads=model.text_heads, layers=model.text_depth,
                mlp_ratio=_ratio(model.text_mlp_dim, model.text_width, "model.text_mlp_dim"))
    if model.text_pool == "eos":
        text.update(pool_type="eos", eos_id=int(model.eos_token_id))
    else:
        text["pool_type"] = "argmax"
    for cfg, act in ((vision, v_act), (text, t_act)):
        if model.layernorm_eps != 1e-5:
            cfg["norm_kwargs"] = {"eps": model.layernorm_eps}
        if act:
            cfg["act_kwargs"] = act
    cfg = dict(embed_dim=model.embed_dim, quick_gelu=quick, vision_cfg=vision, text_cfg=text)
    return cfg


def open_clip_shapes(model, grid: int, logit_bias: bool) -> Dict[str, tuple]:
    """Keys and shapes of open_clip's ``CLIP`` state dict for ``model``."""
    shapes = {}

    def tower(prefix, width, depth, mlp):
        for i in range(depth):
            b = f"{prefix}transformer.resblocks.{i}."
            shapes.update({b + "ln_1.weight": (width,), b + "ln_1.bias": (width,),
                           b + "attn.in_proj_weight": (3 * width, width),
                           b + "attn.in_proj_bias": (3 * width,),
                           b + "attn.out_proj.weight": (width, width),
                           b + "attn.out_proj.bias": (width,),
                           b + "ln_2.weight": (width,), b + "ln_2.bias": (width,),
                           b + "mlp.c_fc.weight": (mlp, width), b + "mlp.c_fc.bias": (mlp,),
                           b + "mlp.c_proj.weight": (width, mlp), b + "mlp.c_proj.bias": (width,)})

    w, tw = model.width, model.text_width
    shapes.update({"visual.class_embedding": (w,),
                   "visual.positional_embedding": (grid * grid + 1, w),
                   "visual.conv1.weight": (w, 3, model.patch_size, model.patch_size),
                   "visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,)})
    tower("visual.", w, model.depth, model.mlp_dim)
    shapes.update({"visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,),
                   "visual.proj": (w, model.embed_dim),
                   "token_embedding.weight": (model.vocab_size, tw),
                   "positional_embedding": (model.context_length, tw)})
    tower("", tw, model.text_depth, model.text_mlp_dim)
    shapes.update({"ln_final.weight": (tw,), "ln_final.bias": (tw,),
                   "text_projection": (tw, model.embed_dim), "logit_scale": ()})
    if logit_bias:
        shapes["logit_bias"] = ()
    return shapes


def open_clip_plan(model, params, image_size: Optional[int] = None) -> Plan:
    """``fmjax.models.clip.CLIP`` -> open_clip ``CLIP`` (state dict + model config)."""
    from fmjax.interop import hf_clip
    check_open_clip(model)
    params, notes = clip_params(model, params)
    if channels(params["image"], model.patch_size) != 3:
        raise ConfigError("open_clip's image tower takes 3-channel images; this model takes "
                          f"{channels(params['image'], model.patch_size)}.")
    grid = square_grid(params["image"]["pos_embed"].shape[1] - 1, "image/pos_embed")
    cfg = open_clip_config(model, grid * model.patch_size)
    bias = "logit_bias" in params
    if bias:
        cfg["init_logit_bias"] = float(np.asarray(params["logit_bias"]))
    got = hf_clip.clip_kwargs_from_open_clip(
        {k: np.zeros(s, np.float32) for k, s in open_clip_shapes(model, grid, bias).items()
         if "resblocks" not in k or k.endswith(("c_fc.weight", "ln_1.bias"))},
        activation=model.activation, head_dim=model.width // model.num_heads)
    check_kwargs(got, model, ("width", "depth", "mlp_dim", "patch_size", "embed_dim", "text_width",
                              "text_depth", "text_mlp_dim", "vocab_size", "context_length"),
                 "open_clip")
    if model.text_pool == "argmax":
        notes.append("text pooling: open_clip's 'argmax' (the largest token id, its EOT).")
    shapes = open_clip_shapes(model, grid, bias)
    convert = lambda sd: hf_clip.convert_open_clip(  # noqa: E731
        sd, num_heads=model.num_heads, text_heads=model.text_heads)
    return Plan(None, cfg, params, convert, {}, notes, "open_clip CLIP", shapes)


# ---------------------------------------------------------------------------------- diffusers


def check_unet(model) -> None:
    """Config-only checks of a ``UNet`` -> ``UNet2DModel`` export."""
    if model.context_dim:
        raise ConfigError(f"model.context_dim={model.context_dim} (text conditioning through "
                          "context_proj) has no diffusers UNet2DModel equivalent.")
    if model.channel_mult[0] != 1:
        raise ConfigError(f"model.channel_mult={tuple(model.channel_mult)}: diffusers' "
                          "UNet2DModel needs channel_mult[0] == 1 (conv_in and the time "
                          "sinusoid have block_out_channels[0] features).")
    if model.resnet_time_scale_shift not in ("default", "scale_shift"):
        raise ConfigError(f"model.resnet_time_scale_shift={model.resnet_time_scale_shift!r} is "
                          "not supported.")
    model.attention_levels()  # raises for an impossible layout


def unet_plan(model, params, image_size: Optional[int] = None) -> Plan:
    """``fmjax.models.unet.UNet`` -> diffusers ``UNet2DModel``."""
    import diffusers
    from fmjax.interop import diffusers_unet
    check_unet(model)
    attn = model.attention_levels()
    chans = model.level_channels()
    shift = float(model.freq_shift)
    cfg = dict(
        sample_size=model.sample_size,
        in_channels=int(params["conv_in"]["kernel"].shape[2]),
        out_channels=int(params["conv_out"]["kernel"].shape[3]),
        center_input_sample=False, time_embedding_type="positional",
        time_embedding_dim=model.time_embed_dim or 4 * model.channels,
        freq_shift=int(shift) if shift.is_integer() else shift,
        flip_sin_to_cos=bool(model.flip_sin_to_cos),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(int(c) for c in chans),
        layers_per_block=model.num_res_blocks, mid_block_scale_factor=model.mid_block_scale_factor,
        downsample_padding=model.downsample_padding, downsample_type="conv", upsample_type="conv",
        dropout=float(model.dropout), act_fn="silu",
        attention_head_dim=model.attention_head_dim, norm_num_groups=model.num_groups,
        attn_norm_num_groups=model.attn_norm_num_groups, norm_eps=model.norm_eps,
        resnet_time_scale_shift=model.resnet_time_scale_shift, add_attention=model.mid_attention,
        class_embed_type=None, num_class_embeds=model.num_classes + 1 if model.num_classes else None)
    got = diffusers_unet.unet_kwargs_from_diffusers_config(cfg)
    got["time_embed_dim"] = got["time_embed_dim"] or 4 * got["channels"]
    got["attention_resolutions"] = tuple(sorted(got["attention_resolutions"]))
    want = dict(time_embed_dim=model.time_embed_dim or 4 * model.channels,
                attention_resolutions=tuple(sorted(model.attention_resolutions)))
    for key, value in want.items():
        if got[key] != value:
            raise ConfigError(f"the UNet2DModel config would not load back as this model: "
                              f"{key}: {got[key]!r} != {value!r}")
    check_kwargs(got, model, ("channels", "channel_mult", "num_res_blocks", "sample_size",
                              "num_groups", "norm_eps", "attention_head_dim",
                              "flip_sin_to_cos", "freq_shift", "downsample_padding",
                              "resnet_time_scale_shift", "attn_norm_num_groups",
                              "mid_block_scale_factor", "num_classes"), "UNet2DModel")
    notes = []
    if model.num_classes:
        notes.append(f"num_class_embeds={model.num_classes + 1}: the last row is fmjax's null "
                     "(classifier-free guidance) class.")
    if model.freq_precision != "float32":
        notes.append("diffusers computes the timestep frequencies in float32; fmjax's "
                     f"freq_precision={model.freq_precision!r} differs in the last bits.")
    if model.learn_sigma:
        notes.append("learn_sigma: the output has 2x channels (mean | variance), as fmjax's.")
    return Plan(lambda **kw: diffusers.UNet2DModel(**kw), cfg, dict(params),
                lambda sd: diffusers_unet.convert_diffusers_unet(sd, cfg), {}, notes,
                "UNet2DModel")
