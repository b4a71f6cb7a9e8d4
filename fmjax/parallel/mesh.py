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


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills a single ``-1`` axis with the remaining devices and validates the product."""
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(
            f"config.mesh has unknown axes {sorted(unknown)}; valid axes are {list(MESH_AXES)}.")
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


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def batch_parallelism(mesh: Mesh) -> int:
    """How many ways the global batch is split."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def maybe_initialize_distributed() -> bool:
    """Calls ``jax.distributed.initialize()`` when running as one of many processes.

    Recognised: a TPU pod (``TPU_WORKER_HOSTNAMES`` with several hosts), SLURM with
    more than one task, or the explicit coordinator variables
    ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``.
    Returns whether it initialised.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env.get("JAX_PROCESS_ID", "0")))
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        jax.distributed.initialize()
        return True
    return False


def batch_sharding(mesh: Mesh):
    """Sharding of a global batch: dim 0 split over the data-parallel axes."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    return NamedSharding(mesh, P(BATCH_AXES))
