"""Scan over layers, remat policies, and the two param layouts of a stack of blocks.

**Remat** (``remat`` on the transformer models): ``False`` / ``'none'`` (off), ``True`` /
``'full'`` (recompute every block's activations in the backward pass; ``True`` is what it always
was), ``'dots_saveable'`` (keep every matmul output, recompute the rest),
``'dots_with_no_batch_dims_saveable'`` (keep the matmuls with no batch dims, i.e. the weight
projections; recompute attention logits and the rest) and ``'offload'`` (as the last, but the
kept values go to host memory, ``'pinned_host'``; it needs a backend with that memory kind
(TPU, GPU, and jax's CPU backend, where it is correct but saves nothing) and is a one-line
ValueError elsewhere). See ``jax.checkpoint_policies``.

**Scan** (``scan_layers=True``): the ``depth`` identical blocks become one ``nn.scan`` over a
single block (``stack_module``): XLA compiles one layer instead of ``depth``, and every param of
the block gets a leading layer axis (logical name ``'layers'``, replicated by
``fmjax.parallel.rules``). The unrolled layout names the blocks ``{prefix}_{i}`` (``block_0``
... in ``Encoder``, ``blocks_0`` ... in DiT); the scanned layout stores them as one subtree
``{prefix}_stack`` with the same leaf names, e.g. ``encoder/block_stack/attn/query/kernel`` of
shape (depth, embed, heads, kv). Per-layer rngs ('params', 'dropout') are split along the scan,
so a scanned model's fresh init and dropout masks differ from the unrolled model's (the same
params give the same outputs).

**Canonical layout.** Checkpoint converters (``fmjax.interop``), ``config.model_init`` and
``fmjax.models.vit.ViT.attention_maps`` use the unrolled layout; ``stack_layers`` /
``unstack_layers`` convert whole param trees either way, ``unstack_flat`` flat
``{'a/b/c': array}`` dicts. A workdir stores the layout it was trained with (its fingerprint
includes ``scan_layers``: a resume with the other value is refused in one line; ``remat`` is
left out of it, so a resume may change the policy). ``fmjax.interop.export`` unstacks.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload")
STACK_SUFFIX = "_stack"
# Encoder's block_{i}, DiT's blocks_{i}, ConvNeXt's stage_{s}_block_{i} (one stack per stage);
# each entry is a regex the whole prefix must match.
LAYER_PREFIXES = ("block", "blocks", r"stage_\d+_block")
LAYERS_AXIS = "layers"                 # logical name of the stacked params' leading axis


def _has_pinned_host() -> bool:
    try:
        return any(m.kind == "pinned_host" for m in jax.devices()[0].addressable_memories())
    except Exception:  # a backend without memory kinds
        return False


def remat_policy(remat) -> Tuple[bool, Optional[Callable]]:
    """``(enabled, jax checkpoint policy or None)`` of a ``remat`` setting (see the module
    docstring). One-line ValueError for an unknown name."""
    if remat is None or remat is False or remat == "none":
        return False, None
    if remat is True or remat == "full":
        return True, None
    if remat == "dots_saveable":
        return True, jax.checkpoint_policies.dots_saveable
    if remat == "dots_with_no_batch_dims_saveable":
        return True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if remat == "offload":
        if not _has_pinned_host():
            raise ValueError(f"remat='offload' needs host offloading ('pinned_host' memory), which "
                             f"the {jax.default_backend()} backend lacks; use "
                             "'dots_with_no_batch_dims_saveable'.")
        return True, jax.checkpoint_policies.offload_dot_with_no_batch_dims(
            "device", "pinned_host")
    raise ValueError(f"Unknown remat {remat!r}; valid: False, True, "
                     f"{', '.join(repr(p) for p in REMAT_POLICIES)}.")


def remat_module(cls, remat, static_argnums: Sequence[int] = ()):
    """``cls`` wrapped in ``nn.remat`` with the policy of ``remat`` (``cls`` itself when off).
    ``static_argnums`` count ``self`` as 0, as ``nn.remat``'s do."""
    enabled, policy = remat_policy(remat)
    if not enabled:
        return cls
    if policy is None:  # remat=True: exactly the wrapper fmjax always used
        return nn.remat(cls, static_argnums=tuple(static_argnums))
    return nn.remat(cls, static_argnums=tuple(static_argnums), policy=policy)


def stack_module(cls, length: int, remat, in_axes, static_argnums: Sequence[int] = ()):
    """``nn.scan`` of ``cls`` over ``length`` layers, rematerialised by ``remat`` inside the scan.

    ``cls.__call__(carry, *xs) -> (carry, None)``; ``in_axes`` has one entry per ``xs``
    (``0``: sliced per layer, ``nn.broadcast``: the same for every layer). Params (and any other
    variable a layer creates) get a leading axis of size ``length`` named ``'layers'``; the
    'params' and 'dropout' rngs are split per layer.
    """
    enabled, policy = remat_policy(remat)
    if enabled:  # inside a scan XLA cannot CSE across iterations: prevent_cse only costs
        cls = nn.remat(cls, static_argnums=tuple(static_argnums), policy=policy,
                       prevent_cse=False)
    return nn.scan(cls, variable_axes={True: 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=in_axes, length=length,
                   metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})


def scan_body(cls):
    """``cls`` as an ``nn.scan`` body for ``stack_module``: ``(x, drop_path_rate, flag) -> (x,
    None)``, calling ``cls._forward(x, flag, drop_path_rate)`` (``flag``: the block's own
    ``deterministic`` / ``train`` argument, broadcast; ``drop_path_rate``: the layer's slice of
    the stage's rates, None for the field's). Same params and variables as ``cls``."""
    class Body(cls):
        @nn.compact
        def __call__(self, x, drop_path_rate=None, flag=None):
            return self._forward(x, flag, drop_path_rate), None
    Body.__name__ = Body.__qualname__ = cls.__name__ + "ScanBody"
    return Body


# -- Layouts -----------------------------------------------------------------------------------
_LAYER_KEY = re.compile(r"^(.+)_(\d+)$")


def _is_prefix(name: str, prefixes) -> bool:
    return any(re.fullmatch(p, name) for p in prefixes)


def _stacked_prefix(key: str, prefixes) -> Optional[str]:
    if isinstance(key, str) and key.endswith(STACK_SUFFIX) and _is_prefix(key[:-len(STACK_SUFFIX)], prefixes):
        return key[:-len(STACK_SUFFIX)]
    return None


def _plain_tree(tree):
    return nn.meta.unbox(tree)


def _stack(values):
    if all(isinstance(v, np.ndarray) or np.isscalar(v) for v in values):
        return np.stack(values)
    return jnp.stack(values)


def stack_layers(tree, prefixes: Sequence[str] = LAYER_PREFIXES):
    """The scanned layout of an unrolled param tree: in every dict, the keys ``{prefix}_0`` ...
    ``{prefix}_{n-1}`` (``prefix`` in ``prefixes``) become one ``{prefix}_stack`` whose leaves
    are the layers' leaves stacked on a new leading axis. Boxed leaves are unboxed; the output is
    plain dicts of arrays (numpy in, numpy out). ValueError (one line) when the layers differ
    in structure or shape, or the indices are not 0..n-1."""
    tree = _plain_tree(tree)
    if not isinstance(tree, Mapping):
        return tree
    groups = {}
    for key in tree:
        m = _LAYER_KEY.match(key) if isinstance(key, str) else None
        if m and _is_prefix(m.group(1), prefixes):
            groups.setdefault(m.group(1), {})[int(m.group(2))] = key
    out = {}
    for key, value in tree.items():
        m = _LAYER_KEY.match(key) if isinstance(key, str) else None
        if m and _is_prefix(m.group(1), prefixes):
            prefix = m.group(1)
            if prefix + STACK_SUFFIX in out:
                continue
            idx = groups[prefix]
            if sorted(idx) != list(range(len(idx))):
                raise ValueError(f"stack_layers: {prefix}_* indices are {sorted(idx)}, not 0..{len(idx) - 1}.")
            if prefix + STACK_SUFFIX in tree:
                raise ValueError(f"stack_layers: the tree has both {prefix}_0 and {prefix}{STACK_SUFFIX}.")
            layers = [stack_layers(tree[idx[i]], prefixes) for i in range(len(idx))]
            ref = jax.tree_util.tree_structure(layers[0])
            for i, layer in enumerate(layers):
                shapes = jax.tree.map(np.shape, layer)
                if jax.tree_util.tree_structure(layer) != ref or shapes != jax.tree.map(np.shape, layers[0]):
                    raise ValueError(f"stack_layers: {prefix}_{i} differs in structure or shapes "
                                     f"from {prefix}_0; only identical layers stack.")
            out[prefix + STACK_SUFFIX] = jax.tree.map(lambda *xs: _stack(xs), *layers)
        else:
            out[key] = stack_layers(value, prefixes)
    return out


def unstack_layers(tree, prefixes: Sequence[str] = LAYER_PREFIXES):
    """The unrolled (canonical) layout of a param tree: every ``{prefix}_stack`` subtree becomes
    ``{prefix}_0`` ... ``{prefix}_{n-1}``, slicing each leaf's leading axis. The inverse of
    ``stack_layers``; an unrolled tree comes back unchanged (as plain dicts)."""
    tree = _plain_tree(tree)
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, value in tree.items():
        prefix = _stacked_prefix(key, prefixes)
        if prefix is None:
            out[key] = unstack_layers(value, prefixes)
            continue
        value = unstack_layers(value, prefixes)
        lengths = {np.shape(x)[0] for x in jax.tree.leaves(value)}
        if len(lengths) != 1:
            raise ValueError(f"unstack_layers: the leaves of {key} have different leading "
                             f"(layer) sizes {sorted(lengths)}.")
        for i in range(lengths.pop()):
            name = f"{prefix}_{i}"
            if name in tree:
                raise ValueError(f"unstack_layers: the tree has both {key} and {name}.")
            out[name] = jax.tree.map(lambda x, i=i: x[i], value)
    return out


def is_stacked(tree, prefixes: Sequence[str] = LAYER_PREFIXES) -> bool:
    """Whether ``tree`` has a ``{prefix}_stack`` subtree anywhere."""
    tree = _plain_tree(tree)
    if not isinstance(tree, Mapping):
        return False
    return any(_stacked_prefix(k, prefixes) is not None or is_stacked(v, prefixes)
               for k, v in tree.items())


def split_stacked_path(path: str, prefixes: Sequence[str] = LAYER_PREFIXES):
    """``'enc/block_stack/attn/kernel'`` -> ``('enc/block_', '/attn/kernel')`` (the unrolled
    path of layer i is ``head + str(i) + tail``); None for a path outside a stack. Only the
    first stacked component counts (stacks do not nest in fmjax's models)."""
    parts = path.split("/")
    for j, part in enumerate(parts):
        prefix = _stacked_prefix(part, prefixes)
        if prefix is not None:
            head = "/".join(parts[:j] + [prefix + "_"])
            tail = "/".join([""] + parts[j + 1:])
            return head, tail
    return None


def unstack_flat(flat: Mapping[str, Any], prefixes: Sequence[str] = LAYER_PREFIXES) -> dict:
    """A flat ``{'a/b_stack/c': (L, ...) array}`` dict in the unrolled layout
    (``{'a/b_0/c': ..., ...}``); other keys unchanged."""
    out = {}
    for path, value in flat.items():
        split = split_stacked_path(path, prefixes)
        if split is None:
            out[path] = value
            continue
        head, tail = split
        for i in range(np.shape(value)[0]):
            out[f"{head}{i}{tail}"] = value[i]
    return out
