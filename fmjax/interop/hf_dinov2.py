"""Convert Hugging Face transformers DINOv2 weights into fmjax ``ViT`` params.

Handles ``Dinov2Model`` and ``Dinov2WithRegistersModel`` (also their
``*ForImageClassification`` / ``*Backbone`` state dicts, whose ``dinov2.`` /
``dinov2_with_registers.`` prefix is stripped). Inputs are state dicts (name ->
torch.Tensor or numpy array) or a ``.safetensors`` file read with
``hf_vit.load_safetensors`` (no pickle). Both the current key layout
(``attention.q_proj``) and the hub layout (``attention.attention.query``) are read.

Mapping: ``layer_scale{1,2}.lambda1`` -> ``ls{1,2}/gamma``; ``cls_token`` and
``position_embeddings`` (class row + square patch grid) -> ``cls_token`` /
``pos_embed``; ``register_tokens`` -> ``reg_tokens`` (fmjax puts them after the
class token and gives them no position, as DINOv2 does). ``mask_token`` is IGNORED:
it only replaces patch embeddings under ``bool_masked_pos`` (iBOT-style masked
inputs), which ``ViT`` has no input for. An image-classification ``classifier``
(on [CLS, mean patch], 2*width inputs) is dropped too. SwiGLU MLPs
(``use_swiglu_ffn=True``, the ViT-g/14 checkpoints) are not supported: fmjax's
``Mlp`` is fc1 -> GELU -> fc2.

Position-embedding interpolation at a resolution other than the checkpoint's grid
(see ``dinov2_kwargs_from_hf_config``): ``Dinov2Model`` -> torch bicubic without
antialias (``pos_interp='torch_bicubic'``); ``Dinov2WithRegistersModel`` -> bicubic
with antialias (``pos_interp='resize'``).
"""
import re
from typing import Any, Dict, Mapping

from fmjax.interop.hf_vit import (_activation, _attention, _cfg, _check_common, _int_size,
                                  _layer_norm, _linear, _patch_embed, _Reader, _to_numpy,
                                  load_safetensors)

Params = Dict[str, Any]
__all__ = ["convert_hf_dinov2", "dinov2_kwargs_from_hf_config", "load_safetensors"]

# Hub names -> current transformers names (transformers' conversion_mapping for Dinov2Model).
_RENAMES = (
    (r"attention\.attention\.query\.", "attention.q_proj."),
    (r"attention\.attention\.key\.", "attention.k_proj."),
    (r"attention\.attention\.value\.", "attention.v_proj."),
    (r"attention\.output\.dense\.", "attention.o_proj."),
)
_PREFIXES = ("dinov2_with_registers.", "dinov2.")
_IGNORED = (r"embeddings\.mask_token", r"classifier\.(weight|bias)")


def _normalize(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = _to_numpy(value)
    return out


def _check_dinov2(cfg) -> None:
    _check_common(cfg)  # activation has an fmjax equivalent; qkv_bias=True
    if _cfg(cfg, "use_swiglu_ffn", False):
        raise ValueError(
            "use_swiglu_ffn=True (DINOv2 ViT-g/14 SwiGLU MLP: gate_proj/up_proj/down_proj) "
            "is not supported: fmjax's ViT MLP is fc1 -> activation -> fc2.")


def dinov2_kwargs_from_hf_config(cfg, interpolate_offset: float = 0.0) -> Dict[str, Any]:
    """``Dinov2Config`` / ``Dinov2WithRegistersConfig`` (object or dict) -> ``ViT`` kwargs.

    ``mlp_dim = int(hidden_size * mlp_ratio)``, ``layerscale = layerscale_value`` (the
    init value; converted weights carry the trained scales), ``num_registers =
    num_register_tokens``. Position interpolation follows the installed transformers:
    without registers torch bicubic without antialias at the target size
    (``pos_interp='torch_bicubic'``); pass ``interpolate_offset=0.1`` for the original
    facebookresearch/dinov2 hub models (and older transformers), which call torch with
    ``scale_factor=(grid + 0.1) / old_grid``. With registers: antialiased bicubic
    (``pos_interp='resize'``, as transformers and the ``*_reg`` hub models).
    """
    _check_dinov2(cfg)
    width = _cfg(cfg, "hidden_size")
    registers = int(_cfg(cfg, "num_register_tokens", 0) or 0)
    kwargs = dict(
        width=width, depth=_cfg(cfg, "num_hidden_layers"),
        num_heads=_cfg(cfg, "num_attention_heads"),
        mlp_dim=int(width * _cfg(cfg, "mlp_ratio", 4)),
        patch_size=_int_size(_cfg(cfg, "patch_size")), num_classes=0, pool="cls",
        class_token=True, pos_embed="learned",
        layernorm_eps=_cfg(cfg, "layer_norm_eps", 1e-6),
        layerscale=float(_cfg(cfg, "layerscale_value", 1.0)), num_registers=registers,
        activation=_activation(cfg))
    if registers or "register" in str(_cfg(cfg, "model_type", "")):
        if interpolate_offset:
            raise ValueError("interpolate_offset applies to the non-antialiased DINOv2 "
                             "interpolation; the registers models use none.")
        kwargs.update(pos_interp="resize", pos_interp_offset=0.0)
    else:
        kwargs.update(pos_interp="torch_bicubic", pos_interp_offset=float(interpolate_offset))
    return kwargs


def _block(r: _Reader, name: str, num_heads: int) -> Params:
    """One HF Dinov2Layer -> fmjax ``Block`` params (with layerscale)."""
    return {
        "norm1": _layer_norm(r, f"{name}.norm1"),
        "attn": _attention(r, name, num_heads),
        "ls1": {"gamma": r(f"{name}.layer_scale1.lambda1")},
        "norm2": _layer_norm(r, f"{name}.norm2"),
        "mlp": {"fc1": _linear(r, f"{name}.mlp.fc1"), "fc2": _linear(r, f"{name}.mlp.fc2")},
        "ls2": {"gamma": r(f"{name}.layer_scale2.lambda1")},
    }


def convert_hf_dinov2(state_dict: Mapping[str, Any], hf_config) -> Params:
    """``Dinov2Model`` / ``Dinov2WithRegistersModel`` state dict -> ``ViT`` params.

    Use with ``ViT(**dinov2_kwargs_from_hf_config(hf_config))``; ``tokens`` then equal
    HF ``last_hidden_state`` and ``pre_logits`` its ``pooler_output``. Raises KeyError
    naming missing / unexpected keys and ValueError for unsupported configs.
    """
    _check_dinov2(hf_config)
    sd = _normalize(state_dict)
    if any(".mlp.weights_in." in k or ".mlp.gate_proj." in k for k in sd):
        raise ValueError("State dict has a SwiGLU MLP (use_swiglu_ffn=True); not supported.")
    r = _Reader(sd, "HF Dinov2")
    heads = _cfg(hf_config, "num_attention_heads")
    encoder = {f"block_{i}": _block(r, f"encoder.layer.{i}", heads)
               for i in range(_cfg(hf_config, "num_hidden_layers"))}
    encoder["norm"] = _layer_norm(r, "layernorm")
    params = {
        "patch_embed": _patch_embed(r, "embeddings.patch_embeddings.projection"),
        "cls_token": r("embeddings.cls_token"),
        "pos_embed": r("embeddings.position_embeddings"),
        "encoder": encoder,
    }
    registers = int(_cfg(hf_config, "num_register_tokens", 0) or 0)
    ignore = _IGNORED
    if registers:
        params["reg_tokens"] = r("embeddings.register_tokens")
        got = params["reg_tokens"]
        if got is not None and got.shape != (1, registers, got.shape[-1]):
            raise ValueError(f"register_tokens has shape {got.shape}; the config says "
                             f"num_register_tokens={registers}.")
    elif sd.get("embeddings.register_tokens", None) is not None \
            and sd["embeddings.register_tokens"].size == 0:
        ignore = ignore + (r"embeddings\.register_tokens",)  # zero registers
    r.finish(ignore=ignore)
    return params
