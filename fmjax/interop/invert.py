"""Invert an import converter by probing it: fmjax params -> a reference state dict.

The converters of ``fmjax/interop`` (reference state dict -> fmjax params) only rename,
transpose, reshape and slice. ``invert`` runs one on a *probe* state dict whose every element
holds its own global index, so each fmjax param element tells which reference element it came
from; exporting is then a scatter of the fmjax values back into the reference tensors. The
export is thus the exact inverse of the importer that the parity tests check, with no second
hand-written mapping to keep in sync.

The converters cast to float32 (exact integers only up to 2**24), so the index is sent in two
passes, ``index % 2**22 + 1`` and ``index // 2**22 + 1``; 0 marks an element the converter made
up (CLIP's zero patch-embedding bias). Checks: the converter's tree has the params' structure
and shapes; every made-up element is 0 in the params (else it has no place in the reference
layout); every reference element is written exactly once, or is in ``fill`` (buffers the
caller computes: MAE's fixed sin-cos tables, an identity pooler, ...), never both.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

import numpy as np

_BASE = 2 ** 22


def _leaves(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
    """Nested dicts -> {path tuple: leaf}."""
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_leaves(v, prefix + (str(k),)))
        return out
    return {prefix: tree}


def _name(path: Sequence[str]) -> str:
    return "/".join(path)


def to_numpy_tree(params) -> Dict[str, Any]:
    """Boxed / sharded / device params -> nested dicts of float32 numpy arrays."""
    import flax.linen as nn
    import jax
    params = nn.meta.unbox(params)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)


def invert(convert: Callable[[Dict[str, np.ndarray]], Any], ref_shapes: Mapping[str, tuple],
           params, fill: Mapping[str, np.ndarray] = None, what: str = "reference"
           ) -> Dict[str, np.ndarray]:
    """The reference state dict (float32 numpy, keys and shapes of ``ref_shapes``) that
    ``convert`` maps to ``params``.

    Args:
      convert: state dict -> fmjax params tree (an importer with its config bound).
      ref_shapes: the reference model's state-dict keys -> shapes.
      params: the fmjax params (nested dicts of arrays).
      fill: reference keys the converter ignores, with their values (computed buffers).
      what: names the reference model in error messages.
    Raises ValueError naming the offending param or key.
    """
    fill = dict(fill or {})
    keys = list(ref_shapes)
    sizes = [int(np.prod(ref_shapes[k], dtype=np.int64)) for k in keys]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])

    def probe(part):
        sd = {}
        for k, off, n in zip(keys, offsets, sizes):
            idx = np.arange(off, off + n, dtype=np.int64)
            val = idx % _BASE if part == 0 else idx // _BASE
            sd[k] = (val + 1).astype(np.float32).reshape(ref_shapes[k])
        return _leaves(convert(sd))

    lo, hi = probe(0), probe(1)
    ours = _leaves(params)
    if set(lo) != set(ours):
        extra, missing = sorted(map(_name, set(ours) - set(lo))), sorted(map(_name, set(lo) - set(ours)))
        raise ValueError(f"the fmjax params do not have the layout of a {what}: params with no "
                         f"counterpart {extra}; missing params {missing}.")
    flat = np.zeros(total, np.float32)
    covered = np.zeros(total, bool)
    shared = False  # some reference element feeds two params: check they agree
    for path in sorted(ours):
        value = np.asarray(ours[path], np.float32)
        a, b = np.asarray(lo.pop(path)), np.asarray(hi.pop(path))  # frees the probe as it goes
        if a.shape != value.shape:
            raise ValueError(f"param {_name(path)} has shape {value.shape}; a {what} gives "
                             f"{a.shape}.")
        a, v = a.reshape(-1).astype(np.int64), value.reshape(-1)
        sourced = a > 0
        if np.any(v[~sourced] != 0):
            raise ValueError(f"param {_name(path)} has no counterpart in the {what} layout "
                             "and is not zero, so the export would change the model.")
        src = (b.reshape(-1)[sourced].astype(np.int64) - 1) * _BASE + (a[sourced] - 1)
        v = v[sourced]
        shared = shared or bool(covered[src].any())
        flat[src] = v
        covered[src] = True
        if np.any(flat[src] != v):  # one element read twice within this param
            shared = True
    if shared:  # rare: probe again and check every param against the merged tensors
        lo, hi = probe(0), probe(1)
        for path, value in ours.items():
            a = np.asarray(lo.pop(path)).reshape(-1).astype(np.int64)
            b = np.asarray(hi.pop(path)).reshape(-1).astype(np.int64)
            sourced = a > 0
            src = (b[sourced] - 1) * _BASE + (a[sourced] - 1)
            if np.any(flat[src] != np.asarray(value, np.float32).reshape(-1)[sourced]):
                raise ValueError(f"param {_name(path)} disagrees with another param mapped to "
                                 f"the same {what} weights.")
    out, uncovered = {}, []
    for k, off, n in zip(keys, offsets, sizes):
        c = covered[off:off + n]
        if k in fill:
            if np.any(c):
                raise ValueError(f"{what} key {k} is both converted and filled.")
            value = np.asarray(fill.pop(k), np.float32)
            if value.shape != tuple(ref_shapes[k]):
                raise ValueError(f"fill value for {k} has shape {value.shape}, expected "
                                 f"{tuple(ref_shapes[k])}.")
            out[k] = value
        elif n and not np.all(c):
            uncovered.append(k)
        else:
            out[k] = flat[off:off + n].reshape(ref_shapes[k])
    if uncovered or fill:
        raise ValueError(f"{what} keys not produced by any fmjax param: {uncovered}; "
                         f"filled keys the {what} does not have: {sorted(fill)}.")
    return out
