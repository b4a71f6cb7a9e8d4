"""Logical-axis rules: how named param / activation axes map onto the mesh.

Models annotate params with logical names (``embed``, ``mlp``, ``heads``, ...;
conv kernels (kh, kw, ``conv_in``, ``conv_out``))
and activations with (``batch``, ``length``, ``embed``). A preset chooses which
mesh axes each logical name is split over. Axes whose size does not divide
the mesh axis are left replicated (see ``param_shardings``). The leading axis of a scanned
model's stacked params (``scan_layers=True``, ``fmjax.models.scan``) is ``layers``, replicated in
every preset: each device holds all layers of its shard, as unrolled.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmjax.parallel.mesh import BATCH_AXES

_ACTIVATIONS = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("layers", None),  # stacked params' layer axis (nn.scan over blocks)
)

RULES = {
    # Every param replicated; the batch split over data and fsdp.
    "dp": _ACTIVATIONS + (
        ("embed", None), ("mlp", None), ("heads", None), ("kv", None),
        ("vocab", None), ("classes", None), ("patch", None), ("norm", None),
        ("conv_in", None), ("conv_out", None)),
    # Params split over fsdp along their embed dimension (ZeRO-3 style).
    "fsdp": _ACTIVATIONS + (
        ("embed", "fsdp"), ("mlp", None), ("heads", None), ("kv", None),
        ("vocab", "fsdp"), ("classes", None), ("patch", None), ("norm", None),
        ("conv_in", "fsdp"), ("conv_out", None)),
    # FSDP plus Megatron-style tensor parallelism over mlp / heads.
    "fsdp_tensor": _ACTIVATIONS + (
        ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv", None),
        ("vocab", "tensor"), ("classes", None), ("patch", None), ("norm", None),
        ("conv_in", "fsdp"), ("conv_out", "tensor")),
}


def get_rules(name: str):
    if name not in RULES:
        raise ValueError(f"Unknown sharding preset {name!r}; valid presets: {sorted(RULES)}.")
    return RULES[name]


def _fit_spec(spec: P, shape, mesh: Mesh) -> P:
    """Drops mesh axes from dims they do not divide (those dims stay replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return P(*fitted)


def param_shardings(abstract_tree, mesh: Mesh, rules):
    """NamedShardings for a tree of (possibly logically boxed) abstract values."""
    logical = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(logical, rules)
    shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract_tree))
    return jax.tree.map(
        lambda spec, shape: NamedSharding(mesh, _fit_spec(spec, shape, mesh)),
        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def replicated_fraction(shardings, abstract_tree, min_size: int = 2**16) -> float:
    """Fraction of the bytes of params larger than ``min_size`` that are fully replicated."""
    total = replicated = 0
    for sh, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(nn.meta.unbox(abstract_tree))):
        size = math.prod(x.shape)
        if size < min_size:
            continue
        total += size
        if all(axes is None for axes in sh.spec):
            replicated += size
    return replicated / total if total else 0.0
