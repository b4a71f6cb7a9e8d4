"""Convert timm-layout ViT / DeiT / MAE state dicts into fmjax params.

The layout is that of timm's ``VisionTransformer`` (``timm/models/vision_transformer.py``)
and of the checkpoints released by facebookresearch/deit (``models.py``, ``models_v2.py``)
and facebookresearch/mae (``models_vit.py``, ``models_mae.py``), which build on it:
``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.{norm1, attn.qkv (fused),
attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm`` or ``fc_norm``, ``head``. A checkpoint
wrapped as ``{'model': sd}`` or ``{'state_dict': sd}``, or saved from DistributedDataParallel
(``module.`` prefix), is unwrapped. Inputs are name -> torch.Tensor or numpy array; read
files with ``torch.load(path, weights_only=True)`` (never unpickle code) or safetensors.

Mapping onto ``fmjax.models.vit.ViT`` (``vit_kwargs_from_timm`` gives its kwargs):

- the fused ``qkv`` Linear is split into fmjax's ``query`` / ``key`` / ``value``
  (rows ``[q; k; v]``, each ``(heads, head_dim)``); a model built with ``qkv_bias=False``
  (no ``qkv.bias`` in any block) gets zero biases, which is the same function;
- ``global_pool='avg'`` with ``fc_norm`` (MAE's fine-tuned models) -> ``ViT(pool='mean',
  fc_norm=True)``; ``'token'`` -> ``pool='cls'``; ``'avg'`` without ``fc_norm`` ->
  ``pool='mean'``;
- DeiT's distillation token and timm's register tokens (``reg_token``) both sit between
  the class token and the patches, so they become fmjax ``reg_tokens``
  (``ViT(num_registers=...)``); their rows of ``pos_embed`` (constant per token) are folded
  into them. A ``no_embed_class`` ``pos_embed`` (DeiT III, patches only) gets a zero row
  for the class token. Both are exact, and stay exact after a pos-embed resize (prefix rows
  are never resampled);
- DeiT's ``head_dist``: ``head_dist='distill'`` keeps DeiT's own layout for
  ``ViT(distill_token=True)`` (``vit_kwargs_from_timm(..., distill_token=True)``):
  ``dist_token``, its ``pos_embed`` row and ``head_dist`` as they are, so ``logits`` are
  DeiT's inference output ``(head(cls) + head_dist(dist)) / 2`` and training has both heads.
  Otherwise the distillation token is a register (above) and ``head_dist='error'``
  (default) refuses the head, ``'drop'`` discards it (fine-tuning), ``'keep'`` returns it as
  a top-level ``head_dist`` entry for the caller to apply to ``tokens[:, 1]``;
- layer scale (``ls{1,2}.gamma``, DeiT III's ``gamma_{1,2}``) -> ``ls1`` / ``ls2``
  (``ViT(layerscale=...)``), ``norm_pre`` (CLIP-style) -> ``pre_norm``.

Refused with a one-line error naming the keys: q/k norms (``qk_norm``), attention-pool
heads (``attn_pool``, global_pool='map'), SwiGLU MLPs, extra norms inside blocks, the old
``pre_logits`` representation layer, an attention width other than the model width (timm's
``attn_head_dim``), a state dict with both ``norm`` and ``fc_norm``, or both ``dist_token``
and ``reg_token``, non-square grids or patches, and anything else fmjax's ViT does not have.

Position embeddings for another resolution: fmjax resizes a learned ``pos_embed`` to the
input's grid (``ViT.pos_interp``): 'resize' equals timm's ``resample_abs_pos_embed``
(bicubic, antialias=True); 'torch_bicubic' equals the ``interpolate_pos_embed`` of MAE's and
DeiT's fine-tuning scripts (``F.interpolate(mode='bicubic', align_corners=False)``).

``convert_timm_mae``: facebookresearch/mae ``MaskedAutoencoderViT`` pre-training
checkpoints (``mask_token``, ``decoder_embed``, ``decoder_blocks``, ``decoder_norm``,
``decoder_pred``) -> ``fmjax.models.mae.MAE`` params. The fixed sin-cos ``pos_embed`` /
``decoder_pos_embed`` are checked against fmjax's table and not copied. The released
``mae_pretrain_vit_*.pth`` hold the encoder only; it is converted on its own (the result
has no decoder entries).

Head counts are not stored in a state dict: pass ``num_heads`` (and ``decoder_heads``);
by default timm's standard models are assumed (``TIMM_HEADS`` by width; MAE decoders 16).
"""
import re
from typing import Any, Dict, Iterable, Mapping, Optional

import numpy as np

from fmjax.interop.hf_vit import _layer_norm, _linear, _Reader, _to_numpy
from fmjax.models.layers import get_2d_sincos_pos_embed

Params = Dict[str, Any]

# Width -> heads of timm's ViT families (Ti, wee, little, S, medium, betwixt, B, L, so400m,
# H, g, G); every released ViT / DeiT / DeiT III / MAE encoder is one of them.
TIMM_HEADS = {192: 3, 256: 4, 320: 5, 384: 6, 512: 8, 640: 10, 768: 12, 1024: 16,
              1152: 16, 1280: 16, 1408: 16, 1664: 16}
MAE_DECODER_HEADS = 16  # models_mae.py: every mae_vit_*_dec512d8b
HEAD_DIST = ("error", "drop", "keep", "distill")
_MAE_KEY = re.compile(r"mask_token|decoder_.*")


def _summarize(keys: Iterable[str]) -> str:
    """Sorted key names, runs over block indices collapsed: 'blocks.*.attn.qkv.weight (x8)'."""
    groups: Dict[str, list] = {}
    for k in sorted(keys):
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", k), []).append(k)
    return "[" + ", ".join(ks[0] if len(ks) == 1 else f"{pat} (x{len(ks)})"
                           for pat, ks in groups.items()) + "]"


class _TimmReader(_Reader):
    """``_Reader`` whose error collapses block indices and says what the keys mean."""

    def finish(self, ignore=(), hint: str = ""):
        unexpected = sorted(k for k in self.sd if k not in self.used
                            and not any(re.fullmatch(p, k) for p in ignore))
        parts = [f"{what} keys {_summarize(keys)}" for what, keys in
                 (("missing", self.missing), ("unexpected", unexpected)) if keys]
        if parts:
            raise KeyError(f"Cannot convert {self.what} state dict: {'; '.join(parts)}.{hint}")


def timm_state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Unwrap ``{'model': sd}`` / ``{'state_dict': sd}`` and a ``module.`` prefix; float32 numpy."""
    sd = checkpoint
    for key in ("model", "state_dict"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not sd:
        raise ValueError("Not a state dict: expected a mapping of parameter names to tensors "
                         f"(or {{'model': state_dict}}), got {type(checkpoint).__name__}.")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: _to_numpy(v) for k, v in sd.items()}


def _depth(sd: Mapping[str, np.ndarray], prefix: str = "blocks") -> int:
    found = {int(m.group(1)) for k in sd for m in [re.match(rf"{prefix}\.(\d+)\.", k)] if m}
    return max(found) + 1 if found else 0


def _width(sd: Mapping[str, np.ndarray]) -> int:
    w = sd.get("patch_embed.proj.weight")
    if w is None:
        raise KeyError("Cannot convert timm ViT state dict: missing keys [patch_embed.proj.weight] "
                       f"(it has e.g. {_summarize(sorted(sd)[:5])}).")
    return int(w.shape[0])


def _heads(width: int, num_heads: Optional[int], what: str = "num_heads") -> int:
    if num_heads is None:
        if width not in TIMM_HEADS:
            raise ValueError(f"Width {width} is not one of timm's standard ViTs "
                             f"({sorted(TIMM_HEADS)}); pass {what}= explicitly.")
        num_heads = TIMM_HEADS[width]
    if width % int(num_heads):
        raise ValueError(f"Width {width} is not divisible by {what}={num_heads}.")
    return int(num_heads)


def _grid(rows: int, n_prefix: int, no_embed_class: Optional[bool]):
    """(square grid side, no_embed_class) of a ``pos_embed`` with ``rows`` rows."""
    def side(n):
        g = int(round(max(n, 0) ** 0.5))
        return g if n > 0 and g * g == n else None
    embed = side(rows - n_prefix)
    if no_embed_class is None:
        no_embed_class = embed is None and side(rows) is not None
    g = side(rows) if no_embed_class else embed
    if g is None:
        raise ValueError(
            f"pos_embed has {rows} rows: not {'' if no_embed_class else f'{n_prefix} prefix + '}"
            "a square grid of patches (non-square grids are not supported).")
    return g, no_embed_class


def _patch_embed(r: _Reader, has_pre_norm: bool) -> Params:
    """Conv weight (D, C, p, p) -> Dense kernel (p*p*C, D) in ``patchify`` order."""
    w = r("patch_embed.proj.weight")
    if w is None:
        return {}
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise ValueError(f"patch_embed.proj.weight has shape {w.shape}; only square conv patches "
                         "(D, C, p, p) are supported.")
    if "patch_embed.proj.bias" not in r.sd and has_pre_norm:
        b = np.zeros((w.shape[0],), np.float32)  # timm's pre_norm=True (CLIP) has no patch bias
    else:
        b = r("patch_embed.proj.bias")
    if b is None:
        return {}
    return {"proj": {"kernel": w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]), "bias": b}}


def _attention(r: _Reader, name: str, num_heads: int, qkv_bias: bool) -> Params:
    """Fused ``{name}.qkv`` / ``{name}.proj`` -> fmjax ``MultiHeadAttention`` params."""
    w = r(f"{name}.qkv.weight")
    b = r(f"{name}.qkv.bias") if qkv_bias else None
    out = _linear(r, f"{name}.proj")
    if w is None or (qkv_bias and b is None):
        return {}
    d = w.shape[1]
    if w.shape[0] != 3 * d:
        raise ValueError(f"{name}.qkv.weight has shape {w.shape}; fmjax attention needs "
                         f"3 x width rows (3 x {d}), i.e. head_dim = width / num_heads.")
    if b is None:
        b = np.zeros((3 * d,), np.float32)
    hd = d // num_heads
    proj = {n: {"kernel": w[i * d:(i + 1) * d].T.reshape(d, num_heads, hd),
                "bias": b[i * d:(i + 1) * d].reshape(num_heads, hd)}
            for i, n in enumerate(("query", "key", "value"))}
    if out:
        out["kernel"] = out["kernel"].reshape(num_heads, hd, -1)
    return dict(proj, out=out)


def _block(r: _Reader, name: str, num_heads: int, qkv_bias: bool) -> Params:
    """One timm ``Block`` -> fmjax ``Block`` params (with ``ls1`` / ``ls2`` if present)."""
    p = {
        "norm1": _layer_norm(r, f"{name}.norm1"),
        "attn": _attention(r, f"{name}.attn", num_heads, qkv_bias),
        "norm2": _layer_norm(r, f"{name}.norm2"),
        "mlp": {"fc1": _linear(r, f"{name}.mlp.fc1"), "fc2": _linear(r, f"{name}.mlp.fc2")},
    }
    for i in (1, 2):
        for key in (f"{name}.ls{i}.gamma", f"{name}.gamma_{i}"):  # timm / DeiT III models_v2
            if key in r.sd:
                p[f"ls{i}"] = {"gamma": r(key)}
    return p


def _blocks(r: _Reader, prefix: str, depth: int, num_heads: int) -> Params:
    qkv_bias = any(re.fullmatch(rf"{re.escape(prefix)}\.\d+\.attn\.qkv\.bias", k) for k in r.sd)
    return {f"block_{i}": _block(r, f"{prefix}.{i}", num_heads, qkv_bias) for i in range(depth)}


def _layerscale(sd: Mapping[str, np.ndarray]) -> bool:
    return any(re.fullmatch(r"blocks\.\d+\.(ls[12]\.gamma|gamma_[12])", k) for k in sd)


def vit_kwargs_from_timm(state_dict: Mapping[str, Any], num_heads: Optional[int] = None,
                         global_pool: Optional[str] = None, distill_token: bool = False) -> Dict[str, Any]:
    """kwargs for ``fmjax.models.vit.ViT`` read off a timm-layout state dict.

    ``global_pool``: 'token' or 'avg'; by default 'avg' when the checkpoint has ``fc_norm``
    or no class token, else 'token' (timm's default). ``num_heads``: see the module doc.
    ``distill_token=True``: a DeiT distilled checkpoint as ``ViT(distill_token=True)``, for
    params converted with ``head_dist='distill'`` (else its token is a register).
    """
    sd = timm_state_dict(state_dict)
    if distill_token and "dist_token" not in sd:
        raise ValueError("distill_token=True needs a DeiT distilled state dict (no dist_token here).")
    width = _width(sd)
    has_cls = "cls_token" in sd
    fc_norm = "fc_norm.weight" in sd
    if global_pool is None:
        global_pool = "avg" if fc_norm or not has_cls else "token"
    if global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool={global_pool!r}: fmjax's ViT pools 'token' (pool='cls') "
                         "or 'avg' (pool='mean').")
    extra = 1 if "dist_token" in sd else (sd["reg_token"].shape[1] if "reg_token" in sd else 0)
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    kw = dict(width=width, depth=_depth(sd), num_heads=_heads(width, num_heads),
              mlp_dim=int(fc1.shape[0]) if fc1 is not None else 4 * width,
              patch_size=int(sd["patch_embed.proj.weight"].shape[-1]),
              num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
              pool="cls" if global_pool == "token" else "mean", class_token=has_cls,
              pos_embed="learned", num_registers=int(extra), fc_norm=fc_norm,
              pre_norm="norm_pre.weight" in sd, layernorm_eps=1e-6, activation="gelu")
    if distill_token:
        kw.update(num_registers=0, distill_token=True)
    if _layerscale(sd):
        kw["layerscale"] = 1e-5  # any value: the init is replaced by the checkpoint's gammas
    return kw


def convert_timm_vit(state_dict: Mapping[str, Any], num_heads: Optional[int] = None, *,
                     head_dist: str = "error", no_embed_class: Optional[bool] = None,
                     abs_pos_embed: bool = True) -> Params:
    """timm ``VisionTransformer`` / DeiT / MAE-fine-tuned state dict -> ``ViT`` params.

    Build the model with ``ViT(**vit_kwargs_from_timm(state_dict))``. ``head_dist``: what
    to do with DeiT's distillation head ('error', 'drop', 'keep', or 'distill' for DeiT's own
    layout; see the module doc).
    ``no_embed_class``: whether ``pos_embed`` covers the patches only (DeiT III, timm's
    ``no_embed_class=True``); by default read off its row count. ``abs_pos_embed=False``: the
    model has no ``pos_embed`` (BEiT / SimMIM, ``fmjax.interop.beit``; ``ViT(pos_embed='none')``).
    """
    if head_dist not in HEAD_DIST:
        raise ValueError(f"head_dist={head_dist!r}; valid: {HEAD_DIST}.")
    sd = timm_state_dict(state_dict)
    width = _width(sd)
    heads = _heads(width, num_heads)
    r = _TimmReader(sd, "timm ViT")
    if "dist_token" in sd and "reg_token" in sd:
        raise ValueError("A state dict with both dist_token and reg_token: fmjax's ViT "
                         "has one kind of extra prefix token (reg_tokens).")
    if "norm.weight" in sd and "fc_norm.weight" in sd:
        raise ValueError("The state dict has both `norm` (before pooling) and `fc_norm` "
                         "(after): fmjax's ViT(fc_norm=True) has only the second.")
    has_cls = "cls_token" in sd
    distill = head_dist == "distill"
    if distill and ("dist_token" not in sd or "head_dist.weight" not in sd or not has_cls
                    or not abs_pos_embed):
        raise ValueError("head_dist='distill' needs a DeiT distilled state dict (cls_token, "
                         "dist_token, pos_embed and head_dist); convert others without it.")
    extra_key = "dist_token" if "dist_token" in sd else ("reg_token" if "reg_token" in sd else None)
    params: Params = {"patch_embed": _patch_embed(r, "norm_pre.weight" in sd)}
    cls = r("cls_token") if has_cls else None
    extra = r(extra_key) if extra_key else None
    pos = r("pos_embed") if abs_pos_embed else None
    n_cls, n_extra = int(has_cls), (0 if extra is None else extra.shape[1])
    if pos is not None:
        if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != width:
            raise ValueError(f"pos_embed has shape {pos.shape}; expected (1, rows, {width}).")
        _, no_embed = _grid(pos.shape[1], n_cls + n_extra, no_embed_class)
        if distill:  # ViT(distill_token=True) keeps DeiT's rows: class, distillation, patches
            if no_embed:
                raise ValueError("head_dist='distill': this pos_embed has no class / distillation rows.")
        elif no_embed:  # patches only: the class token gets a zero row, the extras none
            pos = np.concatenate([np.zeros((1, n_cls, width), np.float32), pos], axis=1)
        else:  # fold the extra tokens' (constant) position rows into them
            if extra is not None:
                extra = extra + pos[:, n_cls:n_cls + n_extra]
            pos = np.concatenate([pos[:, :n_cls], pos[:, n_cls + n_extra:]], axis=1)
        params["pos_embed"] = pos
    if cls is not None:
        params["cls_token"] = cls
    if extra is not None:
        params["dist_token" if distill else "reg_tokens"] = extra
    if "norm_pre.weight" in sd:
        params["pre_norm"] = _layer_norm(r, "norm_pre")
    encoder = _blocks(r, "blocks", _depth(sd), heads)
    if "fc_norm.weight" in sd:
        params["fc_norm"] = _layer_norm(r, "fc_norm")
    else:
        encoder["norm"] = _layer_norm(r, "norm")
    params["encoder"] = encoder
    if "head.weight" in sd:
        params["head"] = _linear(r, "head")
    if "head_dist.weight" in sd:
        if head_dist == "error":
            raise ValueError(
                "DeiT's distillation head `head_dist`: fmjax's ViT has one head (on the class "
                "token) while DeiT's logits are (head(cls) + head_dist(dist)) / 2; convert with "
                "head_dist='drop' (e.g. to fine-tune) or 'keep' (returned as params['head_dist'], "
                "to apply to tokens[:, 1] yourself).")
        dist = _linear(r, "head_dist")
        if head_dist in ("keep", "distill"):
            params["head_dist"] = dist
    mae = [k for k in sd if _MAE_KEY.fullmatch(k)]
    r.finish(hint=" This is an MAE pre-training checkpoint: convert it with convert_timm_mae "
                  "(format 'timm_mae'), whose encoder loads into a ViT(pos_embed='sincos')."
             if mae else " Is this a timm VisionTransformer / DeiT / MAE state dict?")
    return params


def mae_kwargs_from_timm(state_dict: Mapping[str, Any], num_heads: Optional[int] = None,
                         decoder_heads: Optional[int] = None) -> Dict[str, Any]:
    """kwargs for ``fmjax.models.mae.MAE`` read off a facebookresearch/mae state dict."""
    sd = timm_state_dict(state_dict)
    width = _width(sd)
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    kw = dict(width=width, depth=_depth(sd), num_heads=_heads(width, num_heads),
              mlp_dim=int(fc1.shape[0]) if fc1 is not None else 4 * width,
              patch_size=int(sd["patch_embed.proj.weight"].shape[-1]),
              num_channels=int(sd["patch_embed.proj.weight"].shape[1]),
              layernorm_eps=1e-6, activation="gelu")
    if "decoder_embed.weight" in sd:
        dw = int(sd["decoder_embed.weight"].shape[0])
        dfc1 = sd.get("decoder_blocks.0.mlp.fc1.weight")
        kw.update(decoder_width=dw, decoder_depth=_depth(sd, "decoder_blocks"),
                  decoder_heads=_heads(dw, decoder_heads or MAE_DECODER_HEADS, "decoder_heads"),
                  decoder_mlp_dim=int(dfc1.shape[0]) if dfc1 is not None else 4 * dw)
    return kw


def convert_timm_mae(state_dict: Mapping[str, Any], num_heads: Optional[int] = None,
                     decoder_heads: Optional[int] = None, check_pos_embed: bool = True,
                     atol: float = 1e-5) -> Params:
    """facebookresearch/mae ``MaskedAutoencoderViT`` state dict -> ``MAE`` params.

    Build the model with ``MAE(**mae_kwargs_from_timm(state_dict), norm_pix_loss=...)``
    (``norm_pix_loss`` is a training flag, not in the weights). ``pos_embed`` and
    ``decoder_pos_embed`` are checked against the analytic sin-cos table
    (``check_pos_embed``) and not copied. Without any ``decoder_*`` / ``mask_token`` key (the
    released encoder-only ``mae_pretrain_vit_*.pth``) only the encoder is returned.
    """
    sd = timm_state_dict(state_dict)
    width = _width(sd)
    heads = _heads(width, num_heads)
    r = _TimmReader(sd, "MAE (timm layout)")
    tables = {"pos_embed": (r("pos_embed"), width)}
    encoder = _blocks(r, "blocks", _depth(sd), heads)
    encoder["norm"] = _layer_norm(r, "norm")
    params: Params = {"patch_embed": _patch_embed(r, False), "cls_token": r("cls_token"),
                      "encoder": encoder}
    if any(_MAE_KEY.fullmatch(k) for k in sd):
        dw = int(sd["decoder_embed.weight"].shape[0]) if "decoder_embed.weight" in sd else width
        dec_heads = _heads(dw, decoder_heads or MAE_DECODER_HEADS, "decoder_heads")
        tables["decoder_pos_embed"] = (r("decoder_pos_embed"), dw)
        decoder = _blocks(r, "decoder_blocks", _depth(sd, "decoder_blocks"), dec_heads)
        decoder["norm"] = _layer_norm(r, "decoder_norm")
        params.update(decoder_embed=_linear(r, "decoder_embed"), mask_token=r("mask_token"),
                      decoder=decoder, decoder_pred=_linear(r, "decoder_pred"))
    r.finish(hint=" Is this a facebookresearch/mae models_mae.py state dict (a fine-tuned "
                  "models_vit.py one is format 'timm_vit')?")
    if check_pos_embed:
        grid, _ = _grid(tables["pos_embed"][0].shape[1], 1, False)
        for name, (table, dim) in tables.items():
            _check_sincos_table(table, dim, grid, name, atol)
    return params


def _check_sincos_table(table: np.ndarray, dim: int, grid: int, name: str, atol: float) -> None:
    want = get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    diff = np.abs(table.reshape(want.shape) - want).max() if table.size == want.size else None
    if diff is None or diff > atol:
        err = "shape mismatch" if diff is None else f"max abs diff {diff:.3g}"
        raise ValueError(
            f"`{name}` is not the fixed 2-D sin-cos table of models_mae.py that fmjax's MAE "
            f"computes ({err}); a learned position embedding is format 'timm_vit'. Pass "
            "check_pos_embed=False to convert anyway (the table is not copied).")


def convert_for_model_init(state_dict: Mapping[str, Any], fmt: str,
                           model_config: Optional[Mapping[str, Any]] = None) -> Params:
    """``config.model_init`` formats 'timm_vit' / 'timm_mae'. Head counts come from
    ``config.model`` (``num_heads``, ``decoder_heads``) when it names them, else the
    defaults above. A DeiT distilled checkpoint loads into ``model.distill_token=True`` with
    both heads (``head_dist='distill'``); into any other ViT its token is a register and its
    ``head_dist`` is kept, so the load table counts it as unused."""
    from fmjax.models.registry import model_fields
    kwargs = model_fields(model_config)
    if fmt == "timm_mae":
        return convert_timm_mae(state_dict, kwargs.get("num_heads"), kwargs.get("decoder_heads"))
    if fmt != "timm_vit":
        raise ValueError(f"Unknown timm format {fmt!r}; valid: 'timm_vit', 'timm_mae'.")
    distill = bool(kwargs.get("distill_token")) and "dist_token" in timm_state_dict(state_dict)
    return convert_timm_vit(state_dict, kwargs.get("num_heads"), head_dist="distill" if distill else "keep")
