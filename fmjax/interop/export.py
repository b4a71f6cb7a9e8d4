"""Export fmjax params to the PyTorch ecosystem's layouts: safetensors plus a config.

``export(model, params, fmt, out)`` writes a new directory ``out``:

- ``fmt='hf'`` (``ViT``, ``MAE``, ``CLIP``): ``config.json`` + ``model.safetensors``, as
  transformers' ``save_pretrained`` writes them (``AutoModel.from_pretrained(out)`` or the
  class named in ``config.json``'s ``architectures``); see ``export_hf`` for the classes.
- ``fmt='open_clip'`` (``CLIP``): ``open_clip_model.safetensors`` (open_clip's ``CLIP`` state
  dict) + ``open_clip_config.json`` (``{"model_cfg": <model_configs/*.json layout>,
  "preprocess_cfg": ...}``, what ``open_clip.create_model('local-dir:out')`` reads).
- ``fmt='diffusers'`` (``UNet``): ``config.json`` + ``diffusion_pytorch_model.safetensors``
  (``diffusers.UNet2DModel.from_pretrained(out)``).

Plus ``fmjax_export.json``: the source (``metadata``), the reference class and the notes.

The weights are mapped by inverting the import converters (``fmjax.interop.invert``), so an
export re-imports to the same params bit for bit. A scanned model's stacked params
(``scan_layers=True``) are unstacked first (``fmjax.models.scan.unstack_layers``). An fmjax
option without a reference equivalent is a ``ConfigError`` naming it, raised before anything
is written. ``out`` must
not exist or be an empty directory (never overwritten); it is written under a temporary name
and renamed when complete, so a failure leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, Optional

import numpy as np

from fmjax.errors import ConfigError

# Imports nothing heavy at the top (no jax, torch): launch/export.py checks its flags with
# ``check_format`` / ``check_out`` before jax is imported.
FORMATS = ("hf", "open_clip", "diffusers")
# registry model name -> formats it exports to
MODEL_FORMATS = {"vit": ("hf",), "mae": ("hf",), "clip": ("hf", "open_clip"),
                 "unet": ("diffusers",)}
DTYPES = ("float32", "bfloat16", "float16")


def _table(kind: str):
    """{(model name, format): plan function ('plan') or config-only check ('check')}."""
    from fmjax.interop import export_hf as hf
    from fmjax.interop import export_other as other
    if kind == "plan":
        return {("vit", "hf"): hf.vit_plan, ("mae", "hf"): hf.mae_plan,
                ("clip", "hf"): hf.clip_plan, ("clip", "open_clip"): other.open_clip_plan,
                ("unet", "diffusers"): other.unet_plan}
    return {("vit", "hf"): hf.check_vit, ("mae", "hf"): hf.check_mae,
            ("clip", "hf"): lambda m: hf.check_clip(m, "hf"),
            ("clip", "open_clip"): other.check_open_clip, ("unet", "diffusers"): other.check_unet}


def model_name(model) -> str:
    """The registry name of an fmjax model instance ('vit', 'mae', 'clip', 'unet', 'dit')."""
    from fmjax.models.registry import MODELS
    for name, cls in MODELS.items():
        if type(model) is cls:
            return name
    return type(model).__name__


def _supported() -> str:
    return "; ".join(f"{m} -> {', '.join(f)}" for m, f in MODEL_FORMATS.items())


def check_format(name: str, fmt: str, where: str = "") -> None:
    """``ConfigError`` unless a ``name`` model exports to ``fmt``."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format={fmt!r}; valid: {', '.join(FORMATS)}.")
    valid = MODEL_FORMATS.get(name, ())
    if fmt not in valid:
        what = f"{where} holds a {name!r} model" if where else f"a {name!r} model"
        fix = f"valid for it: {', '.join(valid)}" if valid else "it has no export"
        raise ConfigError(f"--format={fmt} does not fit: {what}; {fix} (exports: {_supported()}).")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"unknown --dtype={dtype!r}; valid: {', '.join(DTYPES)}.")


_PACKAGES = {"hf": ("torch", "transformers", "safetensors"),
             "open_clip": ("torch", "safetensors"),
             "diffusers": ("torch", "diffusers", "safetensors")}


def check_packages(fmt: str) -> None:
    """``ConfigError`` naming the PyTorch-side packages ``fmt`` needs that are not installed."""
    import importlib.util
    missing = [m for m in _PACKAGES.get(fmt, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"--format={fmt} needs {', '.join(missing)}: pip install "
                          f"{' '.join(missing)} (or pip install -e '.[dev]').")


def check_model(model, fmt: str, where: str = "") -> None:
    """Every check that needs only the model's config (no params): the format fits, its
    packages are installed and no option lacks a reference equivalent."""
    name = model_name(model)
    check_format(name, fmt, where)
    check_packages(fmt)
    _table("check")[(name, fmt)](model)


def check_out(out: str) -> str:
    """Absolute ``out``; ``ConfigError`` if it exists and is not an empty directory."""
    out = os.path.abspath(os.path.expanduser(str(out)))
    if os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ConfigError(f"--out={out} already exists and is not an empty directory; an export "
                          "never overwrites: give a new path.")
    return out


def plan(model, params, fmt: str, image_size: Optional[int] = None):
    """The ``export_hf.Plan`` for ``model`` in ``fmt`` (see ``export_hf``)."""
    from fmjax.interop.invert import to_numpy_tree
    from fmjax.models.scan import unstack_layers
    check_model(model, fmt)
    params = unstack_layers(to_numpy_tree(params))  # a scanned model's params, unrolled
    return _table("plan")[(model_name(model), fmt)](model, params, image_size)


def _torch_model(p):
    import torch
    with torch.device("meta"):
        return p.model_class(**p.config) if isinstance(p.config, dict) else p.model_class(p.config)


def reference_state_dict(p) -> Dict[str, np.ndarray]:
    """The plan's reference state dict (float32 numpy), by inverting its importer."""
    from fmjax.interop.invert import invert
    shapes = p.ref_shapes
    if shapes is None:
        shapes = {k: tuple(v.shape) for k, v in _torch_model(p).state_dict().items()}
    try:
        return invert(p.convert, shapes, p.params, p.fill, p.what)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"cannot export to {p.what}: {e}") from None


def _tensors(sd, dtype: str):
    import torch
    t = getattr(torch, dtype)
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(t) for k, v in sd.items()}


def _write(p, sd, fmt: str, path: str, dtype: str, preprocess: Optional[dict]) -> None:
    if fmt == "open_clip":
        from safetensors.torch import save_file
        save_file(_tensors(sd, dtype), os.path.join(path, "open_clip_model.safetensors"),
                  metadata={"format": "pt"})
        pre = dict(size=p.config["vision_cfg"]["image_size"], mode="RGB",
                   interpolation="bicubic", resize_mode="shortest", fill_color=0)
        pre.update({k: list(v) for k, v in (preprocess or {}).items() if k in ("mean", "std")})
        with open(os.path.join(path, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": p.config, "preprocess_cfg": pre}, f, indent=2)
        return
    model = _torch_model(p)
    model.load_state_dict(_tensors(sd, dtype), strict=True, assign=True)
    try:  # no "Writing model shards" progress bar
        from transformers.utils import logging as hf_logging
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    except ImportError:  # diffusers without transformers
        hf_logging, bars = None, False
    try:
        model.save_pretrained(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def export(model, params, fmt: str, out: str, image_size: Optional[int] = None,
           dtype: str = "float32", metadata: Optional[Dict[str, Any]] = None,
           preprocess: Optional[dict] = None) -> Dict[str, Any]:
    """Writes ``params`` of ``model`` (an fmjax module instance) to the new directory ``out``.

    ``image_size``: the training resolution, needed where the params do not fix it (MAE,
    sin-cos ViTs). ``dtype``: stored precision ('float32', 'bfloat16', 'float16').
    ``metadata``: provenance for ``fmjax_export.json``; ``preprocess``: {'mean', 'std'} of the
    input normalisation, recorded there (and in open_clip's ``preprocess_cfg``).
    Returns {'out', 'files', 'reference', 'notes'}.
    """
    check_dtype(dtype)
    out = check_out(out)
    p = plan(model, params, fmt, image_size)
    sd = reference_state_dict(p)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it private
        _write(p, sd, fmt, tmp, dtype, preprocess)
        info = dict(metadata or {}, format=fmt, reference=p.what, dtype=dtype, notes=p.notes)
        if preprocess:
            info["preprocess"] = {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in preprocess.items()}
        with open(os.path.join(tmp, "fmjax_export.json"), "w") as f:
            json.dump(info, f, indent=2, default=str)
        check_out(out)  # still free?
        if os.path.isdir(out):
            os.rmdir(out)
        for name in os.listdir(tmp):  # some writers create their files private
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(out=out, files=sorted(os.listdir(out)), reference=p.what, notes=p.notes)
