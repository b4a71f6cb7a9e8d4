"""Device mesh construction and multi-process helpers.

One mesh serves every process. Axis names are fixed: ``data`` (pure data
parallelism), ``fsdp`` (data parallelism that also shards params and optimizer
state) and ``tensor`` (model parallelism inside a layer).
"""
from __future__ import annotations

import math
import os
from typing import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")
# Multi-slice (several TPU slices over the data-centre network): how many slices each
# data-parallel axis spans. ``config.mesh.data/fsdp/tensor`` are then sizes inside one slice
# (ICI) and the mesh axis is their product: data = dcn_data x data, fsdp = dcn_fsdp x fsdp.
DCN_AXES = {"dcn_data": "data", "dcn_fsdp": "fsdp"}


def dcn_shape(mesh_config: Mapping[str, int]) -> tuple[int, ...]:
    """The across-slice factor of each mesh axis (all 1: one slice)."""
    sizes = {axis: 1 for axis in MESH_AXES}
    for key, axis in DCN_AXES.items():
        value = mesh_config.get(key, 1)
        value = 1 if value is None else int(value)
        if value < 1:
            raise ValueError(f"config.mesh.{key} must be a positive number of slices, got {value}.")
        sizes[axis] = value
    return tuple(sizes[axis] for axis in MESH_AXES)


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills a single ``-1`` axis with the remaining devices and validates the product
    (of one slice's devices when ``dcn_*`` spread the mesh over several slices)."""
    unknown = set(mesh_config) - set(MESH_AXES) - set(DCN_AXES)
    if unknown:
        raise ValueError(
            f"config.mesh has unknown axes {sorted(unknown)}; valid axes are {list(MESH_AXES) + list(DCN_AXES)}.")
    slices = math.prod(dcn_shape(mesh_config))
    if num_devices % slices:
        raise ValueError(f"config.mesh spans {slices} slices (dcn_data x dcn_fsdp) but {num_devices} devices "
                         "do not split evenly over them.")
    num_devices //= slices
    sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh may set at most one axis to -1, got {dict(sizes)}.")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"config.mesh sizes must be positive or -1, got {dict(sizes)}.")
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"config.mesh {dict(sizes)} does not divide the {num_devices} devices; "
                f"choose axis sizes whose product divides {num_devices}.")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"config.mesh {dict(sizes)} uses {math.prod(sizes.values())} devices but "
            f"{num_devices} are available; set one axis to -1 to fill the rest.")
    return sizes


def _slice_grid(shape, devices):
    try:
        return mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        return np.asarray(devices).reshape(shape)


def slice_index(device) -> int:
    """The slice a device belongs to (TPU multi-slice: ``device.slice_index``; else 0)."""
    return int(getattr(device, "slice_index", 0) or 0)


def hybrid_grid(ici_shape, dcn, devices, slice_of=slice_index) -> np.ndarray:
    """Devices laid out like ``mesh_utils.create_hybrid_device_mesh``: one ICI grid per slice
    (``slice_of(device)``, sorted), slices tiled along each axis by its ``dcn`` factor, so an
    axis's DCN part is its outer index and only data-parallel collectives cross slices."""
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(slice_of(d), []).append(d)
    need = math.prod(dcn)
    if len(groups) != need or len({len(g) for g in groups.values()}) != 1:
        raise ValueError(
            f"config.mesh spans {need} slices (dcn_data x dcn_fsdp) but the devices are in {len(groups)} "
            f"slice(s) of sizes {sorted(len(g) for g in groups.values())}; set --config.mesh.dcn_data to the "
            "number of slices (e.g. --num_slices of the pod).")
    per = [_slice_grid(ici_shape, groups[k]) for k in sorted(groups)]
    arr = np.empty(tuple(dcn) + tuple(ici_shape), dtype=object)
    for i, grid in enumerate(per):
        arr[np.unravel_index(i, dcn)] = grid
    nd = len(ici_shape)
    order = [j for i in range(nd) for j in (i, nd + i)]  # (dcn_0, ici_0, dcn_1, ici_1, ...)
    return arr.transpose(order).reshape([a * b for a, b in zip(dcn, ici_shape)])


def make_mesh(mesh_config: Mapping[str, int], devices=None, slice_of=None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh over ``devices`` (default: all); with
    ``dcn_data`` / ``dcn_fsdp`` > 1, a multi-slice mesh (``hybrid_grid``; ``slice_of`` lets
    tests assign simulated devices to slices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    dcn = dcn_shape(mesh_config)
    if math.prod(dcn) > 1:
        return Mesh(hybrid_grid(shape, dcn, devices, slice_of or slice_index), MESH_AXES)
    return Mesh(_slice_grid(shape, devices), MESH_AXES)


def batch_parallelism(mesh: Mesh) -> int:
    """How many ways the global batch is split."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def _on_cloud_tpu_vm() -> bool:
    """TPU chips on this host's PCI bus (what jax's own Cloud TPU set-up checks; read before
    any backend starts, as ``jax.distributed.initialize`` must come first)."""
    try:
        from jax._src import hardware_utils
        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    except Exception:  # noqa: BLE001 - a jax without the helper, an unreadable /sys
        return False
    return chips > 0


def maybe_initialize_distributed() -> bool:
    """Calls ``jax.distributed.initialize()`` when running as one of many processes.

    Recognised, in order: ``FMJAX_DISTRIBUTED=0`` (never) / ``=1`` (always, with jax's own
    cluster detection); the explicit coordinator variables ``JAX_COORDINATOR_ADDRESS`` +
    ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``; SLURM with more than one task; a GKE TPU
    slice (``TPU_WORKER_HOSTNAMES`` with several hosts); a Cloud TPU VM (jax's GCE detection
    reads the worker number and peers from the metadata server; one host initialises as a
    1-process job, which also starts the preemption service). Returns whether it initialised.
    """
    env = os.environ
    forced = env.get("FMJAX_DISTRIBUTED", "")
    if forced == "0":
        return False
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env.get("JAX_PROCESS_ID", "0")))
        return True
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if forced == "1" or int(env.get("SLURM_NTASKS", "1")) > 1 or len(hosts) > 1 or _on_cloud_tpu_vm():
        jax.distributed.initialize()
        return True
    return False


def batch_sharding(mesh: Mesh):
    """Sharding of a global batch: dim 0 split over the data-parallel axes."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    return NamedSharding(mesh, P(BATCH_AXES))
