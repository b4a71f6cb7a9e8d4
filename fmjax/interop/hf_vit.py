"""Convert Hugging Face transformers ViT / ViT-MAE weights into fmjax params.

Inputs are state dicts (name -> torch.Tensor or numpy array) from
``model.state_dict()`` or a ``.safetensors`` file (``load_safetensors``; no
pickle is ever loaded). Both the current transformers layout
(``layers.{i}.attention.q_proj``) and the older hub layout
(``encoder.layer.{i}.attention.attention.query``) are accepted, with or
without the ``vit.`` prefix. The result is a plain (unboxed) ``params`` tree
for ``fmjax.models.vit.ViT`` / ``fmjax.models.mae.MAE``.

fmjax's MAE uses FIXED sin-cos position embeddings computed on the fly, so the
HF ``position_embeddings`` / ``decoder_pos_embed`` buffers are not copied;
``convert_hf_vit_mae`` checks that they equal the analytic table instead.
"""
import re
from typing import Any, Dict, Mapping, Optional

import numpy as np

from fmjax.models.layers import get_2d_sincos_pos_embed

Params = Dict[str, Any]

# Old hub names -> current transformers names (same rules as transformers'
# conversion_mapping for ViTModel / ViTMAEForPreTraining).
_RENAMES = (
    (r"encoder\.layer\.", "layers."),
    (r"attention\.attention\.query\.", "attention.q_proj."),
    (r"attention\.attention\.key\.", "attention.k_proj."),
    (r"attention\.attention\.value\.", "attention.v_proj."),
    (r"attention\.output\.dense\.", "attention.o_proj."),
    (r"intermediate\.dense\.", "mlp.fc1."),
    (r"(?<!attention\.)output\.dense\.", "mlp.fc2."),
)


def _to_numpy(value) -> np.ndarray:
    """torch.Tensor (any device/dtype, incl. bfloat16) or array-like -> float32 numpy, a COPY:
    a CPU float32 tensor's ``.numpy()`` shares its memory, so later in-place updates of the
    source (an optimizer step, BatchNorm's running statistics) would reach converted params."""
    if hasattr(value, "detach"):  # torch tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.array(value, dtype=np.float32)


def load_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Load a ``.safetensors`` file into numpy arrays (safetensors' numpy loader)."""
    try:
        from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover - safetensors is a core dependency
        raise ImportError("Loading HF weights needs `pip install safetensors`.") from e
    return dict(load_file(path))


def _normalize(state_dict: Mapping[str, Any], prefix: str) -> Dict[str, np.ndarray]:
    """Rename keys to the current transformers layout and strip ``prefix`` if present."""
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        if prefix and new.startswith(prefix):
            new = new[len(prefix):]
        out[new] = _to_numpy(value)
    return out


class _Reader:
    """Pops tensors by name and reports missing / unexpected keys by name."""

    def __init__(self, sd: Dict[str, np.ndarray], what: str):
        self.sd, self.what, self.used, self.missing = sd, what, set(), []

    def __call__(self, key: str) -> Optional[np.ndarray]:
        if key not in self.sd:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.sd[key]

    def finish(self, ignore=()):
        unexpected = sorted(k for k in self.sd if k not in self.used
                            and not any(re.fullmatch(p, k) for p in ignore))
        if self.missing or unexpected:
            raise KeyError(
                f"Cannot convert {self.what} state dict: missing keys {sorted(self.missing)}; "
                f"unexpected keys {unexpected}. Is this the right model class and config?")


def _linear(r: _Reader, name: str) -> Dict[str, np.ndarray]:
    w, b = r(name + ".weight"), r(name + ".bias")
    return {} if w is None or b is None else {"kernel": w.T, "bias": b}


def _layer_norm(r: _Reader, name: str) -> Dict[str, np.ndarray]:
    return {"scale": r(name + ".weight"), "bias": r(name + ".bias")}


def _attention(r: _Reader, name: str, num_heads: int) -> Params:
    """HF ``{name}.attention.{q,k,v,o}_proj`` -> fmjax ``MultiHeadAttention`` params."""
    def qkv(proj):
        p = _linear(r, f"{name}.attention.{proj}")
        if not p:
            return {}
        d = p["kernel"].shape[0]
        return {"kernel": p["kernel"].reshape(d, num_heads, -1),
                "bias": p["bias"].reshape(num_heads, -1)}

    out = _linear(r, f"{name}.attention.o_proj")
    if out:
        out["kernel"] = out["kernel"].reshape(num_heads, -1, out["kernel"].shape[-1])
    return {"query": qkv("q_proj"), "key": qkv("k_proj"), "value": qkv("v_proj"), "out": out}


def _block(r: _Reader, name: str, num_heads: int) -> Params:
    """One HF ViT layer -> fmjax ``Block`` params."""
    return {
        "norm1": _layer_norm(r, f"{name}.layernorm_before"),
        "attn": _attention(r, name, num_heads),
        "norm2": _layer_norm(r, f"{name}.layernorm_after"),
        "mlp": {"fc1": _linear(r, f"{name}.mlp.fc1"), "fc2": _linear(r, f"{name}.mlp.fc2")},
    }


def _patch_embed(r: _Reader, name: str) -> Params:
    """Conv weight (D, C, p, p) -> Dense kernel (p*p*C, D) in ``patchify`` order."""
    w, b = r(name + ".weight"), r(name + ".bias")
    if w is None or b is None:
        return {}
    return {"proj": {"kernel": w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]), "bias": b}}


def _cfg(cfg, key, default=None):
    return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


def _int_size(value) -> int:
    if isinstance(value, (list, tuple)):
        if value[0] != value[1]:
            raise ValueError(f"Only square sizes are supported, got {value}.")
        return int(value[0])
    return int(value)


def _check_common(cfg):
    act = _cfg(cfg, "hidden_act", "gelu")
    if act not in ("gelu", "quick_gelu", "gelu_pytorch_tanh", "gelu_new"):
        raise ValueError(f"hidden_act={act!r} has no fmjax equivalent.")
    if not _cfg(cfg, "qkv_bias", True):
        raise ValueError("qkv_bias=False is not supported by the converter.")


def _activation(cfg) -> str:
    act = _cfg(cfg, "hidden_act", "gelu")
    return {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(act, act)


def vit_kwargs_from_hf_config(cfg) -> Dict[str, Any]:
    """``ViTConfig`` (object or dict) -> kwargs for ``fmjax.models.vit.ViT``.

    ``num_classes`` comes from ``num_labels`` only when the config names an
    image-classification architecture; pass ``num_classes=`` yourself otherwise.
    """
    _check_common(cfg)
    archs = _cfg(cfg, "architectures") or []
    labels = _cfg(cfg, "num_labels", 0) or 0
    classify = any("ImageClassification" in a for a in archs)
    return dict(
        width=_cfg(cfg, "hidden_size"), depth=_cfg(cfg, "num_hidden_layers"),
        num_heads=_cfg(cfg, "num_attention_heads"), mlp_dim=_cfg(cfg, "intermediate_size"),
        patch_size=_int_size(_cfg(cfg, "patch_size")), num_classes=labels if classify else 0,
        pool="cls", class_token=True, pos_embed="learned",
        layernorm_eps=_cfg(cfg, "layer_norm_eps", 1e-12), activation=_activation(cfg))


def mae_kwargs_from_hf_config(cfg) -> Dict[str, Any]:
    """``ViTMAEConfig`` (object or dict) -> kwargs for ``fmjax.models.mae.MAE``."""
    _check_common(cfg)
    return dict(
        width=_cfg(cfg, "hidden_size"), depth=_cfg(cfg, "num_hidden_layers"),
        num_heads=_cfg(cfg, "num_attention_heads"), mlp_dim=_cfg(cfg, "intermediate_size"),
        patch_size=_int_size(_cfg(cfg, "patch_size")),
        decoder_width=_cfg(cfg, "decoder_hidden_size"),
        decoder_depth=_cfg(cfg, "decoder_num_hidden_layers"),
        decoder_heads=_cfg(cfg, "decoder_num_attention_heads"),
        decoder_mlp_dim=_cfg(cfg, "decoder_intermediate_size"),
        mask_ratio=_cfg(cfg, "mask_ratio", 0.75),
        norm_pix_loss=bool(_cfg(cfg, "norm_pix_loss", False)),
        num_channels=_cfg(cfg, "num_channels", 3),
        layernorm_eps=_cfg(cfg, "layer_norm_eps", 1e-12), activation=_activation(cfg))


def _encoder(r: _Reader, cfg, prefix: str = "") -> Params:
    heads = _cfg(cfg, "num_attention_heads")
    enc = {f"block_{i}": _block(r, f"{prefix}layers.{i}", heads)
           for i in range(_cfg(cfg, "num_hidden_layers"))}
    enc["norm"] = _layer_norm(r, f"{prefix}layernorm")
    return enc


def convert_hf_vit(state_dict: Mapping[str, Any], hf_config) -> Params:
    """``ViTModel`` / ``ViTForImageClassification`` state dict -> ``ViT`` params.

    The pooler (``pooler.dense``, unused by fmjax) and the masked-image-modeling
    ``embeddings.mask_token`` are ignored; ``classifier`` becomes ``head``.
    """
    sd = _normalize(state_dict, "vit.")
    r = _Reader(sd, "HF ViT")
    params = {
        "patch_embed": _patch_embed(r, "embeddings.patch_embeddings.projection"),
        "cls_token": r("embeddings.cls_token"),
        "pos_embed": r("embeddings.position_embeddings"),
        "encoder": _encoder(r, hf_config),
    }
    if "classifier.weight" in sd:
        params["head"] = _linear(r, "classifier")
    r.finish(ignore=(r"pooler\.dense\.(weight|bias)", r"embeddings\.mask_token"))
    return params


def deit_kwargs_from_hf_config(cfg) -> Dict[str, Any]:
    """``DeiTConfig`` -> kwargs for ``ViT(distill_token=True)`` (DeiT's class + distillation
    tokens; ``num_classes`` from ``num_labels`` for the image-classification architectures)."""
    kw = vit_kwargs_from_hf_config(cfg)
    kw["distill_token"] = True
    return kw


def convert_hf_deit(state_dict: Mapping[str, Any], hf_config) -> Params:
    """``DeiTModel`` / ``DeiTForImageClassificationWithTeacher`` state dict -> ``ViT(distill_token=
    True)`` params: ``embeddings.distillation_token`` -> ``dist_token``, ``cls_classifier`` ->
    ``head``, ``distillation_classifier`` -> ``head_dist``; the pooler is ignored.
    (``DeiTForImageClassification``'s single ``classifier`` on the class token maps to ``head``
    and has no distillation head: build that model with ``num_classes=0`` and read
    ``dist_pre_logits``, or convert the with-teacher model.)"""
    sd = _normalize(state_dict, "deit.")
    r = _Reader(sd, "HF DeiT")
    params = {
        "patch_embed": _patch_embed(r, "embeddings.patch_embeddings.projection"),
        "cls_token": r("embeddings.cls_token"),
        "dist_token": r("embeddings.distillation_token"),
        "pos_embed": r("embeddings.position_embeddings"),
        "encoder": _encoder(r, hf_config),
    }
    if "cls_classifier.weight" in sd:
        params["head"] = _linear(r, "cls_classifier")
        params["head_dist"] = _linear(r, "distillation_classifier")
    elif "classifier.weight" in sd:
        params["head"] = _linear(r, "classifier")
    r.finish(ignore=(r"pooler\.dense\.(weight|bias)", r"embeddings\.mask_token"))
    return params


def _check_sincos(buffer: Optional[np.ndarray], dim: int, grid: int, name: str,
                  atol: float) -> None:
    if buffer is None:
        return
    ref = get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    got = buffer.reshape(ref.shape) if buffer.size == ref.size else None
    if got is None or np.abs(got - ref).max() > atol:
        err = "shape mismatch" if got is None else f"max abs diff {np.abs(got - ref).max():.3g}"
        raise ValueError(
            f"HF `{name}` is not the fixed 2-D sin-cos table fmjax uses ({err}). "
            "Pretrained MAE checkpoints store it; a freshly constructed transformers model "
            "may leave it zero. Fill it with the sin-cos table or pass check_pos_embed=False.")


def convert_hf_vit_mae(state_dict: Mapping[str, Any], hf_config,
                       check_pos_embed: bool = True, atol: float = 1e-5) -> Params:
    """``ViTMAEForPreTraining`` state dict -> ``MAE`` params.

    The fixed sin-cos position buffers are checked against the analytic table
    (``check_pos_embed``) but not copied: fmjax computes them on the fly.
    """
    sd = _normalize(state_dict, "vit.")
    r = _Reader(sd, "HF ViTMAE")
    patch = _int_size(_cfg(hf_config, "patch_size"))
    grid = _int_size(_cfg(hf_config, "image_size")) // patch
    enc_pos = r("embeddings.position_embeddings")
    dec_pos = r("decoder.decoder_pos_embed")
    if check_pos_embed:
        _check_sincos(enc_pos, _cfg(hf_config, "hidden_size"), grid,
                      "vit.embeddings.position_embeddings", atol)
        _check_sincos(dec_pos, _cfg(hf_config, "decoder_hidden_size"), grid,
                      "decoder.decoder_pos_embed", atol)
    dec_heads = _cfg(hf_config, "decoder_num_attention_heads")
    decoder = {f"block_{i}": _block(r, f"decoder.decoder_layers.{i}", dec_heads)
               for i in range(_cfg(hf_config, "decoder_num_hidden_layers"))}
    decoder["norm"] = _layer_norm(r, "decoder.decoder_norm")
    params = {
        "patch_embed": _patch_embed(r, "embeddings.patch_embeddings.projection"),
        "cls_token": r("embeddings.cls_token"),
        "encoder": _encoder(r, hf_config),
        "decoder_embed": _linear(r, "decoder.decoder_embed"),
        "mask_token": r("decoder.mask_token"),
        "decoder": decoder,
        "decoder_pred": _linear(r, "decoder.decoder_pred"),
    }
    r.finish()
    return params
