"""Export plans for Hugging Face transformers: ViT, DINOv2, ViT-MAE and CLIP.

Each ``*_plan`` builds the transformers config of an fmjax model (the inverse of the
``*_kwargs_from_*`` functions, checked by running them on it), the params as the importer
would return them for that model, the importer to invert (``fmjax.interop.invert``) and the
reference buffers the importer ignores (``fill``). An fmjax option the reference layout cannot
express raises ``ConfigError`` naming it; ``notes`` say what differs outside the exported
weights (pooling, position interpolation at other resolutions).

- ``ViT`` without layer scale or registers -> ``ViTModel`` (identity pooler with
  ``pooler_act='linear'``, so ``pooler_output`` is the final-norm class token, fmjax's
  ``pre_logits``) or, with a head, ``ViTForImageClassification``.
- ``ViT`` with layer scale -> ``Dinov2Model``; with registers -> ``Dinov2WithRegistersModel``
  (layer scale 1 when the fmjax model has none). ``mask_token`` is written as zeros.
- ``MAE`` -> ``ViTMAEForPreTraining``; the fixed sin-cos tables are written from
  ``layers.get_2d_sincos_pos_embed`` (the table both sides use).
- ``CLIP`` -> ``CLIPModel``; the patch-embedding bias (the reference conv has none) is folded
  into the patch rows of the position embedding, an exact rewrite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from fmjax.errors import ConfigError
from fmjax.models.layers import get_2d_sincos_pos_embed

ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}


@dataclass
class Plan:
    """What ``export.write`` needs: the reference model class, its config, the params in the
    importer's layout, the importer (state dict -> params), filled buffers and notes."""
    model_class: Callable
    config: Any
    params: Dict[str, Any]
    convert: Callable
    fill: Dict[str, np.ndarray] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    what: str = ""
    ref_shapes: Optional[Dict[str, tuple]] = None  # None: from model_class(config) on 'meta'


def hf_act(act: str, option: str) -> str:
    if act not in ACT_TO_HF:
        raise ConfigError(f"{option}={act!r} has no transformers equivalent that fmjax's importers "
                          f"read; supported: {sorted(ACT_TO_HF)}.")
    return ACT_TO_HF[act]


def square_grid(tokens: int, what: str) -> int:
    grid = int(round(math.sqrt(tokens)))
    if grid * grid != tokens:
        raise ConfigError(f"{what} has {tokens} patch positions, not a square grid.")
    return grid


def channels(params, patch: int) -> int:
    """Input channels from the PatchEmbed kernel (p*p*C, D)."""
    return params["patch_embed"]["proj"]["kernel"].shape[0] // (patch * patch)


def check_kwargs(got: Dict[str, Any], model, keys, what: str) -> None:
    """The importer's kwargs for the exported config match the model (an export self-check)."""
    norm = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
    bad = {k: (got[k], getattr(model, k)) for k in keys if norm(got[k]) != norm(getattr(model, k))}
    if bad:
        raise ConfigError(f"the {what} config would not load back as this model: "
                          + ", ".join(f"{k}: {a!r} != {b!r}" for k, (a, b) in bad.items()))


def check_vit_options(model, what: str, prefix: str = "") -> None:
    """Options of a ViT (or CLIP's image tower) that no reference layout here can express."""
    if model.stem != "patch":
        raise ConfigError(f"{prefix}stem={model.stem!r} (a convolutional stem) has no {what} "
                          "equivalent: the reference embeds patches with one conv; train with "
                          f"{prefix}stem='patch' to export.")
    if getattr(model, "rel_pos_bias", "none") != "none" or getattr(model, "pos_embed", "learned") == "none":
        raise ConfigError(f"{prefix}rel_pos_bias={getattr(model, 'rel_pos_bias', 'none')!r} / pos_embed="
                          f"{getattr(model, 'pos_embed', '')!r} (BEiT-style positions) has no {what} "
                          "equivalent here; export with format 'fmjax' or train with the ViT's "
                          "absolute position embedding.")


def check_vit(model) -> None:
    """Config-only checks of a ``ViT`` export (run before a checkpoint is restored)."""
    check_vit_options(model, "transformers ViT / DINOv2", "model.")
    if not model.class_token:
        raise ConfigError("model.class_token=False has no transformers ViT / DINOv2 equivalent "
                          "(they always prepend a class token).")
    if model.pre_norm:
        raise ConfigError("model.pre_norm=True (a LayerNorm after the embedding) has no "
                          "transformers ViT / DINOv2 equivalent.")
    if model.num_classes and model.pool != "cls":
        raise ConfigError(f"model.pool={model.pool!r} with a classification head has no "
                          "transformers equivalent: ViTForImageClassification classifies the "
                          "class token (pool='cls').")
    if model.num_classes and (model.layerscale is not None or model.num_registers):
        raise ConfigError("a classification head on a ViT with layer scale or registers has no "
                          "transformers equivalent (Dinov2ForImageClassification classifies "
                          "[class token, mean patch token]).")
    if (model.layerscale is not None or model.num_registers) and model.mlp_dim % model.width:
        raise ConfigError(f"model.mlp_dim={model.mlp_dim} is not a multiple of width="
                          f"{model.width}: transformers' DINOv2 has an integer mlp_ratio.")
    hf_act(model.activation, "model.activation")


def _pos_embed(model, params, image_size: Optional[int]):
    """(params with a learned ``pos_embed``, grid, notes): a sin-cos model gets its table."""
    notes = []
    if model.pos_embed == "sincos":
        if not image_size:
            raise ConfigError("a ViT with pos_embed='sincos' needs the image size to write its "
                              "position table (config.data.image_size).")
        grid = int(image_size) // model.patch_size
        table = get_2d_sincos_pos_embed(model.width, grid, cls_token=True)[None]
        params = dict(params, pos_embed=table)
        notes.append("pos_embed='sincos': the fixed table for the training size is stored as "
                     "learned position embeddings (other sizes interpolate it instead of "
                     "recomputing it).")
    else:
        grid = square_grid(params["pos_embed"].shape[1] - 1, "pos_embed")
    return params, grid, notes


def vit_plan(model, params, image_size: Optional[int] = None) -> Plan:
    """``fmjax.models.vit.ViT`` -> ViTModel / ViTForImageClassification / Dinov2(WithRegisters)Model."""
    import transformers
    from fmjax.interop import hf_dinov2, hf_vit
    check_vit(model)
    params, grid, notes = _pos_embed(model, dict(params), image_size)
    common = dict(hidden_size=model.width, num_hidden_layers=model.depth,
                  num_attention_heads=model.num_heads, patch_size=model.patch_size,
                  image_size=grid * model.patch_size,
                  num_channels=channels(params, model.patch_size),
                  layer_norm_eps=model.layernorm_eps, hidden_act=hf_act(model.activation, "activation"),
                  qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if model.pool == "mean":
        common["fmjax_pool"] = "mean"
        notes.append("pool='mean': fmjax's features are the mean of the patch tokens "
                     "(last_hidden_state[:, 1 + registers:].mean(1)), not pooler_output "
                     "(the class token); config.json records fmjax_pool='mean'.")
    if model.layerscale is None and not model.num_registers:
        if model.pos_interp != "torch_bicubic" or model.pos_interp_offset:
            notes.append("at other resolutions transformers' ViT (interpolate_pos_encoding=True) "
                         "resizes position embeddings with torch bicubic to the target size, not "
                         f"fmjax's pos_interp={model.pos_interp!r}, offset "
                         f"{model.pos_interp_offset}.")
        fill = {}
        if model.num_classes:
            cls = transformers.ViTForImageClassification
            cfg = transformers.ViTConfig(intermediate_size=model.mlp_dim, num_labels=model.num_classes,
                                         architectures=["ViTForImageClassification"], **common)
        else:
            cls = transformers.ViTModel
            cfg = transformers.ViTConfig(intermediate_size=model.mlp_dim, pooler_act="linear",
                                         architectures=["ViTModel"], **common)
            fill = {"pooler.dense.weight": np.eye(model.width, dtype=np.float32),
                    "pooler.dense.bias": np.zeros(model.width, np.float32)}
        check_kwargs(hf_vit.vit_kwargs_from_hf_config(cfg), model,
                     ("width", "depth", "num_heads", "mlp_dim", "patch_size", "num_classes",
                      "layernorm_eps", "activation"), "ViT")
        return Plan(cls, cfg, params, lambda sd: hf_vit.convert_hf_vit(sd, cfg), fill, notes,
                    cls.__name__)

    ratio = model.mlp_dim // model.width
    layerscale = 1.0 if model.layerscale is None else float(model.layerscale)
    dino = dict(common, mlp_ratio=ratio, layerscale_value=layerscale, use_swiglu_ffn=False,
                drop_path_rate=0.0)
    if model.num_registers:
        cls = transformers.Dinov2WithRegistersModel
        cfg = transformers.Dinov2WithRegistersConfig(
            num_register_tokens=model.num_registers, architectures=[cls.__name__], **dino)
        hf_interp = ("resize", 0.0)
    else:
        cls = transformers.Dinov2Model
        cfg = transformers.Dinov2Config(architectures=[cls.__name__], **dino)
        hf_interp = ("torch_bicubic", 0.0)
    if (model.pos_interp, float(model.pos_interp_offset)) != hf_interp:
        notes.append(f"at other resolutions {cls.__name__} resizes position embeddings like "
                     f"pos_interp={hf_interp[0]!r}, offset 0, not fmjax's pos_interp="
                     f"{model.pos_interp!r}, offset {model.pos_interp_offset}.")
    if model.layerscale is None:  # the reference always scales: by exactly 1
        enc = dict(params["encoder"])
        for i in range(model.depth):
            ones = np.ones(model.width, np.float32)
            enc[f"block_{i}"] = dict(enc[f"block_{i}"], ls1={"gamma": ones}, ls2={"gamma": ones})
        params["encoder"] = enc
        notes.append("registers without layer scale: the layer scales are written as 1.")
    got = hf_dinov2.dinov2_kwargs_from_hf_config(cfg)
    keys = ["width", "depth", "num_heads", "mlp_dim", "patch_size", "layernorm_eps",
            "num_registers", "activation"] + (["layerscale"] if model.layerscale is not None else [])
    check_kwargs(got, model, keys, cls.__name__)
    fill = {"embeddings.mask_token": np.zeros((1, model.width), np.float32)}
    return Plan(cls, cfg, params, lambda sd: hf_dinov2.convert_hf_dinov2(sd, cfg), fill, notes,
                cls.__name__)


def check_mae(model) -> None:
    hf_act(model.activation, "model.activation")


def mae_plan(model, params, image_size: Optional[int] = None) -> Plan:
    """``fmjax.models.mae.MAE`` -> ``ViTMAEForPreTraining``."""
    import transformers
    from fmjax.interop import hf_vit
    check_mae(model)
    if not image_size:
        raise ConfigError("exporting an MAE needs the image size (config.data.image_size): the "
                          "reference stores its sin-cos tables for one grid.")
    grid = int(image_size) // model.patch_size
    cfg = transformers.ViTMAEConfig(
        hidden_size=model.width, num_hidden_layers=model.depth, num_attention_heads=model.num_heads,
        intermediate_size=model.mlp_dim, hidden_act=hf_act(model.activation, "activation"),
        layer_norm_eps=model.layernorm_eps, image_size=grid * model.patch_size,
        patch_size=model.patch_size, num_channels=model.num_channels, qkv_bias=True,
        decoder_num_attention_heads=model.decoder_heads, decoder_hidden_size=model.decoder_width,
        decoder_num_hidden_layers=model.decoder_depth,
        decoder_intermediate_size=model.decoder_mlp_dim or 4 * model.decoder_width,
        mask_ratio=model.mask_ratio, norm_pix_loss=bool(model.norm_pix_loss),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        architectures=["ViTMAEForPreTraining"])
    got = hf_vit.mae_kwargs_from_hf_config(cfg)
    got["decoder_mlp_dim"] = got["decoder_mlp_dim"] if model.decoder_mlp_dim else None
    check_kwargs(got, model, ("width", "depth", "num_heads", "mlp_dim", "patch_size",
                              "decoder_width", "decoder_depth", "decoder_heads", "decoder_mlp_dim",
                              "mask_ratio", "norm_pix_loss", "num_channels", "layernorm_eps",
                              "activation"), "ViTMAE")
    fill = {"vit.embeddings.position_embeddings":
            get_2d_sincos_pos_embed(model.width, grid, cls_token=True)[None],
            "decoder.decoder_pos_embed":
            get_2d_sincos_pos_embed(model.decoder_width, grid, cls_token=True)[None]}
    notes = ["the fixed sin-cos position tables are written from the analytic formula "
             f"(grid {grid}x{grid})."]
    return Plan(transformers.ViTMAEForPreTraining, cfg, dict(params),
                lambda sd: hf_vit.convert_hf_vit_mae(sd, cfg, check_pos_embed=False), fill, notes,
                "ViTMAEForPreTraining")


def check_clip(model, fmt: str = "hf") -> None:
    """Config-only checks of a ``CLIP`` export to ``fmt`` ('hf' or 'open_clip')."""
    towers = [k for k in ("image", "text") if getattr(model, k, None) is not None]
    if towers:
        raise ConfigError(f"a CLIP built from tower sub-configs (model.{' / model.'.join(towers)}) "
                          "has no transformers / open_clip layout here; export needs the flat-key "
                          "CLIP (a ViT image tower from model.width ... patch_size).")
    check_vit_options(model, "transformers / open_clip CLIP", "model.")
    if fmt == "hf":
        if model.loss == "sigmoid" or model.logit_bias_init is not None:
            raise ConfigError("a CLIP with a logit bias (loss='sigmoid' / logit_bias_init) has no "
                              "transformers CLIPModel equivalent; export it with "
                              "--format=open_clip (init_logit_bias).")
        if model.text_pool == "eos" and model.eos_token_id == 2:
            raise ConfigError("text_pool='eos' with eos_token_id=2 cannot be written for "
                              "transformers: its CLIP treats eos_token_id == 2 as the legacy "
                              "argmax pooling.")
        hf_act(model.activation, "model.activation")
        hf_act(model.text_activation or model.activation, "model.text_activation")


def clip_params(model, params) -> tuple:
    """CLIP params with the patch-embedding bias folded into the patch position rows (the
    reference conv has no bias); ``patch_bias=False`` models ignore their stored bias."""
    params = dict(params)
    image = dict(params["image"])
    proj = dict(image["patch_embed"]["proj"])
    bias = np.asarray(proj["bias"], np.float32)
    notes = []
    if model.patch_bias and np.any(bias != 0):
        pos = np.array(image["pos_embed"], np.float32)
        pos[:, 1:] += bias
        image["pos_embed"] = pos
        notes.append("the patch-embedding bias is folded into the patch rows of the position "
                     "embedding (the reference conv has no bias).")
    proj["bias"] = np.zeros_like(bias)
    image["patch_embed"] = dict(image["patch_embed"], proj=proj)
    params["image"] = image
    return params, notes


def clip_plan(model, params, image_size: Optional[int] = None) -> Plan:
    """``fmjax.models.clip.CLIP`` -> ``CLIPModel``."""
    import transformers
    from fmjax.interop import hf_clip
    check_clip(model, "hf")
    params, notes = clip_params(model, params)
    grid = square_grid(params["image"]["pos_embed"].shape[1] - 1, "image/pos_embed")
    eps = model.layernorm_eps
    legacy = model.text_pool == "argmax"
    ids = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1) if legacy else \
        dict(bos_token_id=None, eos_token_id=int(model.eos_token_id), pad_token_id=None)
    vision = dict(hidden_size=model.width, intermediate_size=model.mlp_dim,
                  num_hidden_layers=model.depth, num_attention_heads=model.num_heads,
                  num_channels=channels(params["image"], model.patch_size),
                  image_size=grid * model.patch_size, patch_size=model.patch_size,
                  hidden_act=hf_act(model.activation, "activation"), layer_norm_eps=eps,
                  attention_dropout=0.0)
    text = dict(vocab_size=model.vocab_size, hidden_size=model.text_width,
                intermediate_size=model.text_mlp_dim, num_hidden_layers=model.text_depth,
                num_attention_heads=model.text_heads, max_position_embeddings=model.context_length,
                hidden_act=hf_act(model.text_activation or model.activation, "text_activation"),
                layer_norm_eps=eps, attention_dropout=0.0, **ids)
    scale = float(np.asarray(params["logit_scale"]))
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                  projection_dim=model.embed_dim, logit_scale_init_value=scale,
                                  architectures=["CLIPModel"])
    got = hf_clip.clip_kwargs_from_hf_config(cfg)
    got["text_activation"] = got["text_activation"] if model.text_activation else None
    keys = ["width", "depth", "num_heads", "mlp_dim", "patch_size", "embed_dim", "text_width",
            "text_depth", "text_heads", "text_mlp_dim", "vocab_size", "context_length",
            "text_pool", "activation", "text_activation", "layernorm_eps", "loss"]
    check_kwargs(got, model, keys + ([] if legacy else ["eos_token_id"]), "CLIPModel")
    if legacy:
        notes.append("text_pool='argmax' is written as transformers' legacy eos_token_id=2 "
                     "(pooling at the largest token id, as OpenAI's configs do).")
    return Plan(transformers.CLIPModel, cfg, params, lambda sd: hf_clip.convert_hf_clip(sd, cfg),
                {}, notes, "CLIPModel")
