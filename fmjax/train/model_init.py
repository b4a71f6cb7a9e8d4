"""``config.model_init``: initialise part of a fresh run's params from a pretrained checkpoint.

Sources (exactly one):

- ``workdir=DIR`` (optionally ``step=N``; default the latest readable step): an fmjax workdir.
  Its checkpoint is the tree ``{'params': ..., 'extra': ...}``, so an EMA teacher is
  ``extra/teacher`` (DINO) and diffusion's EMA weights ``extra/ema``.
- ``torch=FILE`` with ``format=NAME``: a PyTorch state dict (``.safetensors``, or
  ``.bin`` / ``.pt`` / ``.pth`` read with ``torch.load(weights_only=True)``) converted by
  ``fmjax.interop`` (``FORMATS``). The converter's output is the subtree ``params``.
  ``hf_config``: the HF ``config.json`` (default: ``config.json`` next to FILE; not used by
  ``open_clip`` and the timm formats, whose head counts come from ``config.model``).

Options: ``mapping`` ``{checkpoint subtree: param subtree}`` ('/'-joined paths; default
``{'params': ''}``, i.e. the whole params; also a string ``'src:dst,src2:dst2'`` from the
command line); ``dont_load``: regexes (``re.fullmatch`` on '/'-joined target param paths)
whose params keep their fresh init. A learned ``pos_embed`` stored for another grid is
resized with ``fmjax.models.vit.resize_pos_embed`` (``config.model.pos_interp``). Any other
shape mismatch is a one-line ``ConfigError`` naming the path and both shapes (list the
param in ``dont_load`` to re-initialise it, e.g. a classifier ``head/.*``).

Layouts: sources and targets may be unrolled (``encoder/block_{i}/...``) or scanned
(``scan_layers=True``: ``encoder/block_stack/...`` with a leading layer axis;
``fmjax.models.scan``). Both sides are read in the unrolled (canonical) layout: a scanned
source is unstacked, and a scanned target's stacked params are planned per layer, so
``mapping``, ``dont_load`` (e.g. ``'encoder/block_1/.*'``) and the table use ``block_{i}``
paths either way; a stacked param takes its loaded layers and keeps the fresh init of the rest.

``more``: further sources, ``{label: dict(workdir=... or torch=..., mapping=..., ...)}`` (the
same keys but ``more``), applied in order after the main one, each with its own table; e.g.
Flamingo's frozen vision tower from a CLIP workdir and its frozen LM from a GPT workdir
(``--config.model_init.more.vision.workdir=DIR``). A source without workdir / torch is skipped.

Applied once, on a fresh start only (a resume restores its own checkpoint), after
``objective.init`` and before the optimizer state is built; loaded arrays are placed with
the params' shardings. A table of loaded / re-initialised / missing counts per top-level
subtree is printed.
"""
from __future__ import annotations

import json
import math
import os
import re

import jax
import numpy as np

from fmjax.errors import ConfigError
from fmjax.interop.formats import FORMATS, needs_hf_config  # the format table
from fmjax.models import scan as scan_lib

KEYS = ("workdir", "step", "torch", "format", "hf_config", "mapping", "dont_load", "more")


def _get(mi, key, default=None):
    v = mi.get(key, default) if hasattr(mi, "get") else default
    return default if v is None else v


def _one_set(mi) -> bool:
    return bool(mi) and bool(_get(mi, "workdir") or _get(mi, "torch"))


def sources(config) -> list:
    """``[(config key, source)]``: the main ``config.model_init`` and each of ``more``, those
    that name a workdir or a torch file."""
    mi = config.get("model_init")
    if not mi:
        return []
    out = [("config.model_init", mi)] if _one_set(mi) else []
    more = _get(mi, "more", {}) or {}
    for label in (more.keys() if hasattr(more, "keys") else []):
        if _one_set(more[label]):
            out.append((f"config.model_init.more.{label}", more[label]))
    return out


def is_set(config) -> bool:
    return bool(sources(config))


def mapping(mi) -> dict[str, str]:
    m = _get(mi, "mapping")
    if not m:
        return {"params": ""}
    if isinstance(m, str) and m.strip().startswith("{"):  # a dict literal from the command line
        import ast
        try:
            m = ast.literal_eval(m)
        except (ValueError, SyntaxError):
            raise ConfigError(f"config.model_init.mapping={m!r} is not a dict literal; e.g. "
                              "\"{'params/backbone': 'backbone'}\" or 'params/backbone:backbone'.") from None
    if isinstance(m, str):
        out = {}
        for part in m.split(","):
            src, sep, dst = part.partition(":")
            if not sep:
                raise ConfigError(f"config.model_init.mapping={m!r}: write 'src:dst,src2:dst2' "
                                  "(e.g. 'params/backbone:backbone').")
            out[src.strip().strip("/")] = dst.strip().strip("/")
        return out
    return {str(k).strip("/"): str(v).strip("/") for k, v in dict(m).items()}


def dont_load(mi) -> list[str]:
    d = _get(mi, "dont_load", ())
    return [d] if isinstance(d, str) else [str(x) for x in d]


def check(config) -> None:
    """One-line ConfigErrors for a bad ``config.model_init``; reads no array."""
    mi = config.get("model_init")
    if not mi:
        return
    more = _get(mi, "more", {}) or {}
    if not hasattr(more, "keys") or not all(hasattr(more[k], "keys") for k in more.keys()):
        raise ConfigError(f"config.model_init.more={more!r}; it must map labels to sources, e.g. "
                          "dict(vision=dict(workdir=DIR, mapping={'params/image': 'vision'})).")
    _check_one(mi, "config.model_init", KEYS)
    for label in more.keys():
        _check_one(more[label], f"config.model_init.more.{label}", tuple(k for k in KEYS if k != "more"))


def _check_one(mi, where: str, keys) -> None:
    unknown = sorted(set(mi.keys()) - set(keys)) if hasattr(mi, "keys") else []
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; valid: {list(keys)}.")
    workdir, path = _get(mi, "workdir"), _get(mi, "torch")
    if not workdir and not path:
        return
    if workdir and path:
        raise ConfigError(f"{where} sets both workdir and torch; pick one source.")
    for pattern in dont_load(mi):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{where}.dont_load: bad regex {pattern!r} ({e}).") from None
    mapping(mi)
    if workdir:
        from fmjax.train import workdir as workdir_lib
        wd = workdir_lib.resolve(workdir)
        if not os.path.exists(os.path.join(wd, "config.json")):
            raise ConfigError(f"{where}.workdir={workdir}: no {wd}/config.json; name a "
                              "directory written by launch/train.py.")
        if not os.path.isdir(os.path.join(wd, "checkpoints")):
            raise ConfigError(f"{where}.workdir={workdir}: no checkpoints in {wd}/checkpoints.")
        return
    if not os.path.isfile(path):
        raise ConfigError(f"{where}.torch={path}: no such file.")
    fmt = _get(mi, "format")
    if fmt not in FORMATS:
        raise ConfigError(f"{where}.format={fmt!r}; valid: {list(FORMATS)}.")
    if needs_hf_config(fmt) and not os.path.isfile(_hf_config_path(mi)):
        raise ConfigError(f"{where}: format {fmt!r} needs the checkpoint's config.json; "
                          f"{_hf_config_path(mi)} not found (set config.model_init.hf_config=PATH).")


def _hf_config_path(mi) -> str:
    return _get(mi, "hf_config") or os.path.join(os.path.dirname(os.path.abspath(_get(mi, "torch"))),
                                                  "config.json")


# -- Reading a source into a flat {path: numpy array}. -----------------------------------------
def flatten(tree, prefix: str = "") -> dict[str, object]:
    out = {}
    for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in kp]
        out["/".join(([prefix] if prefix else []) + names)] = v
    return out


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def read_torch_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return dict(load_file(path))
    import torch
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    return sd


def _convert(mi, model=None) -> dict:
    fmt, path = _get(mi, "format"), _get(mi, "torch")
    sd = read_torch_state_dict(path)
    cfg = None
    if needs_hf_config(fmt):
        with open(_hf_config_path(mi)) as f:
            cfg = json.load(f)
    from fmjax.interop import formats
    try:
        return formats.convert(fmt, sd, hf_config=cfg, model_config=model)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"config.model_init: {path} is not a {fmt} checkpoint: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def read_source(mi, model=None, read_workdir=None) -> tuple[dict[str, np.ndarray], str]:
    """``({'params/...' or 'extra/...': array}, description)`` of the configured source.

    A workdir source is read by ``read_workdir(workdir, step) -> (flat arrays, step)``
    (``fmjax.train.restore.read_workdir``, passed in: restoring a workdir may itself apply a
    model_init, for an adapter's base, so this module does not import ``restore``)."""
    if _get(mi, "workdir"):
        if read_workdir is None:
            raise ValueError("model_init.read_source: a workdir source needs read_workdir "
                             "(fmjax.train.restore.read_workdir).")
        flat, step = read_workdir(_get(mi, "workdir"), _get(mi, "step"))
        return flat, f"workdir {_get(mi, 'workdir')} step {step}"
    params = _convert(mi, model)
    flat = {k: np.asarray(v) for k, v in flatten({"params": params}).items() if v is not None}
    return flat, f"{_get(mi, 'format')} checkpoint {_get(mi, 'torch')}"


# -- Planning: which target param gets which source array. -------------------------------------
def _square_prefix(n_src: int, n_tgt: int):
    for p in range(0, 9):
        a, b = n_src - p, n_tgt - p
        if a > 0 and b > 0 and math.isqrt(a) ** 2 == a and math.isqrt(b) ** 2 == b:
            return p, math.isqrt(a), math.isqrt(b)
    return None


def resize_pos(value: np.ndarray, shape, method: str = "resize", offset: float = 0.0):
    """A (1, prefix + g*g, D) learned pos embed resized to ``shape`` with the ViT's helper,
    or None if the two are not square grids of the same width and prefix."""
    from fmjax.models.vit import resize_pos_embed
    if value.ndim != 3 or len(shape) != 3 or value.shape[0] != 1 or shape[0] != 1 \
            or value.shape[2] != shape[2]:
        return None
    found = _square_prefix(value.shape[1], shape[1])
    if found is None:
        return None
    p, g_src, g_tgt = found
    return np.asarray(resize_pos_embed(jax.numpy.asarray(value), (g_src, g_src), (g_tgt, g_tgt), p,
                                       method, offset))


def plan(target_shapes: dict[str, tuple], source: dict[str, np.ndarray], mi, pos_interp="resize",
         pos_offset: float = 0.0):
    """``(loads {target path: array}, status {target path: 'loaded'|'resized'|'reinit'|'missing'},
    unused source count)``. Raises ConfigError for a shape mismatch not in ``dont_load``."""
    maps = mapping(mi)
    patterns = [re.compile(p) for p in dont_load(mi)]
    for src in maps:
        if not any(k == src or k.startswith(src + "/") or not src for k in source):
            roots = sorted({"/".join(k.split("/")[:2]) for k in source})
            raise ConfigError(f"config.model_init.mapping: the checkpoint has no subtree {src!r}; "
                              f"it has {roots[:12]}.")
    loads, status, used = {}, {}, set()
    for path, shape in target_shapes.items():
        if any(p.fullmatch(path) for p in patterns):
            status[path] = "reinit"
            continue
        src_path = None
        for src, dst in sorted(maps.items(), key=lambda kv: -len(kv[1])):  # longest target prefix
            if dst == "" or path == dst or path.startswith(dst + "/"):
                rest = path[len(dst):].lstrip("/") if dst else path
                src_path = "/".join(x for x in (src, rest) if x)
                break
        if src_path is None or src_path not in source:
            status[path] = "missing"
            continue
        value = source[src_path]
        used.add(src_path)
        if tuple(value.shape) != tuple(shape):
            resized = resize_pos(value, shape, pos_interp, pos_offset) \
                if path.split("/")[-1] == "pos_embed" else None
            if resized is None:
                raise ConfigError(
                    f"config.model_init: {src_path} has shape {tuple(value.shape)} but param {path} "
                    f"has shape {tuple(shape)}; add {path!r} (e.g. a head: 'head/.*') to "
                    "config.model_init.dont_load to keep its fresh init.")
            loads[path], status[path] = resized, "resized"
        else:
            loads[path], status[path] = value, "loaded"
    mapped = [k for k in source if any(not s or k == s or k.startswith(s + "/") for s in maps)]
    if not loads:
        raise ConfigError(f"config.model_init loaded no param from the checkpoint (mapping {maps}): "
                          f"it has e.g. {sorted(source)[:3]}, the model e.g. {sorted(target_shapes)[:3]}.")
    return loads, status, len(set(mapped) - used)


def unrolled_shapes(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """``{path: shape}`` of a param tree in the unrolled layout: a stacked param
    ``.../block_stack/...`` of shape (L, ...) becomes L params ``.../block_{i}/...``."""
    out = {}
    for path, shape in shapes.items():
        split = scan_lib.split_stacked_path(path)
        if split is None:
            out[path] = tuple(shape)
        else:
            for i in range(shape[0]):
                out[f"{split[0]}{i}{split[1]}"] = tuple(shape[1:])
    return out


def table(status: dict[str, str], unused: int, what: str) -> str:
    rows = {}
    for path, s in status.items():
        top = path.split("/")[0]
        rows.setdefault(top, {"loaded": 0, "resized": 0, "reinit": 0, "missing": 0})[s] += 1
    total = {k: sum(r[k] for r in rows.values()) for k in ("loaded", "resized", "reinit", "missing")}
    lines = [f"== model_init from {what}: {total['loaded'] + total['resized']} loaded "
             f"({total['resized']} pos-embed resized), {total['reinit']} re-initialised (dont_load), "
             f"{total['missing']} missing (fresh init), {unused} checkpoint arrays unused",
             f"   {'subtree':<24} {'loaded':>7} {'resized':>8} {'re-init':>8} {'missing':>8}"]
    for top, r in rows.items():
        lines.append(f"   {top:<24} {r['loaded']:>7} {r['resized']:>8} {r['reinit']:>8} {r['missing']:>8}")
    return "\n".join(lines)


def apply(config, params, param_shardings, log=print, read_workdir=None):
    """``params`` (sharded jax arrays, as initialised) with the configured checkpoints' arrays
    put in (the main source, then ``more``), each placed with its param's sharding. Returns
    ``(params, status)`` (the status of the last source)."""
    status = {}
    for _, mi in sources(config):
        params, status = _apply_one(config, mi, params, param_shardings, log, read_workdir)
    return params, status


def _apply_one(config, mi, params, param_shardings, log=print, read_workdir=None):
    source, what = read_source(mi, config.get("model"), read_workdir)
    source = scan_lib.unstack_flat(source)  # a scanned source in the canonical layout
    flat = flatten(params)
    shapes = unrolled_shapes({k: tuple(v.shape) for k, v in flat.items()})
    model = config.get("model") or {}
    loads, status, unused = plan(shapes, source, mi, model.get("pos_interp", "resize"),
                                 float(model.get("pos_interp_offset", 0.0)))
    shard_flat = flatten(param_shardings)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = list(flat)
    new = []
    for key, leaf in zip(keys, leaves):
        split = scan_lib.split_stacked_path(key)
        value = None
        if split is None:
            if key in loads:
                value = np.asarray(loads[key], dtype=leaf.dtype)
        else:  # a stacked param: its loaded layers, the fresh init elsewhere
            head, tail = split
            layers = [loads.get(f"{head}{i}{tail}") for i in range(leaf.shape[0])]
            if any(v is not None for v in layers):
                value = (np.empty(leaf.shape, leaf.dtype) if all(v is not None for v in layers)
                         else np.array(_to_host(leaf), dtype=leaf.dtype))
                for i, v in enumerate(layers):
                    if v is not None:
                        value[i] = np.asarray(v, dtype=leaf.dtype)
        if value is not None:
            sh = shard_flat[key]
            leaf = jax.make_array_from_callback(value.shape, sh, lambda idx, v=value: v[idx])
        new.append(leaf)
    log(table(status, unused, what))
    return jax.tree_util.tree_unflatten(treedef, new), status
