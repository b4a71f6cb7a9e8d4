"""Target machines for ahead-of-time compilation: a small table of chips and topology names.

``parse_topology('v5e-16')`` names 16 TPU v5e chips; ``devices(target)`` gives their (abstract)
jax devices on any host: libtpu's topology description for TPUs (``pip install -e '.[aot]'``,
no TPU needed), or the host's CPU devices for ``cpu-N`` (XLA's forced host device count, which
must be set before jax is imported: ``launch/compile.py`` does it).

Naming follows Google Cloud's accelerator types: ``v5e-N`` / ``v6e-N`` count chips, ``v4-N`` /
``v5p-N`` count TensorCores (two per chip, so ``v5p-128`` is 64 chips in a 4x4x4 torus).
"""
from __future__ import annotations

import dataclasses
import math
import re

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str               # accelerator-type prefix: v5e, v5p, ...
    device_kind: str        # jax's device_kind for it
    hbm_gib: float          # memory per chip
    peak_bf16_tflops: float  # dense bf16 matmul peak per chip
    hbm_gbps: float         # HBM bandwidth per chip, GB/s
    cores_per_chip: int     # how accelerator-type numbers count: chips (1) or TensorCores (2)
    dims: int               # torus dimensions of the topology name
    source: str


# Per-chip figures from Google Cloud's system-architecture pages (as of 2026).
CHIPS = {
    "v4": Chip("v4", "TPU v4", 32, 275, 1228, 2, 3,
               "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", "TPU v5 lite", 16, 197, 819, 1, 2,
                "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", "TPU v5", 95, 459, 2765, 2, 3,
                "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", "TPU v6 lite", 32, 918, 1640, 1, 2,
                "https://cloud.google.com/tpu/docs/v6e"),
}

# Chip grids of the standard slice shapes (Cloud TPU docs: "TPU types and topologies").
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str                # as given, e.g. 'v5e-16'
    platform: str            # 'tpu' | 'cpu'
    num_chips: int
    chip: Chip | None        # None for cpu-N (no HBM limit unless --hbm_gib)
    topology: str = ""       # libtpu topology name, e.g. 'v5e:4x4'
    host_bounds: tuple = (1, 1, 1)


def valid_names() -> str:
    return ("v5e-N (N chips: " + ", ".join(map(str, _GRID_2D)) + "), v6e-N (same), "
            "v4-N / v5p-N (N TensorCores = 2 x chips: " + ", ".join(str(2 * n) for n in _GRID_3D)
            + "), cpu-N (simulated host devices)")


def parse_topology(name: str) -> Target:
    """``'v5e-16'`` -> Target; unknown names and sizes raise ``ValueError`` naming the valid ones."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|cpu)-(\d+)", name.strip().lower())
    if not m:
        raise ValueError(f"--topology={name!r} is not a topology name; valid: {valid_names()}.")
    kind, n = m.group(1), int(m.group(2))
    if kind == "cpu":
        if n < 1:
            raise ValueError(f"--topology={name!r}: cpu-N needs N >= 1.")
        return Target(name, "cpu", n, None)
    chip = CHIPS[kind]
    if n % chip.cores_per_chip:
        raise ValueError(f"--topology={name!r}: {kind}-N counts TensorCores, two per chip, so N must be even.")
    chips = n // chip.cores_per_chip
    grids = _GRID_3D if chip.dims == 3 else _GRID_2D
    if chips not in grids:
        sizes = sorted(c * chip.cores_per_chip for c in grids)
        raise ValueError(f"--topology={name!r}: no standard {kind} slice of that size; valid N: {sizes}.")
    # Hosts of 4 chips (2x2), as Cloud TPU VMs have for multi-host slices; one host below that,
    # and v5e-8's single host holds its whole 2x4.
    if chips < 4:
        bounds = (1, 1, 1)
    elif chip.dims == 2 and chips == 8:
        bounds = (2, 4, 1)
    else:
        bounds = (2, 2, 1)
    return Target(name, "tpu", chips, chip, f"{kind}:{grids[chips]}", bounds)


def quiet_libtpu_env(target: Target) -> dict:
    """Environment for compiling for ``target`` on a host without TPUs: jax runs on the CPU and
    libtpu is told the TPU VM facts it would otherwise probe for (and warn about at length).
    Set before jax is imported; only in a process that compiles and never runs on a TPU."""
    accel = {"v5e": "v5litepod", "v6e": "v6e"}.get(target.chip.name, target.chip.name)
    return {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_ID": "0",
            # No TPU is opened, so several compiles may load libtpu at once (else the second
            # one fails on /tmp/libtpu_lockfile).
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
            "TPU_WORKER_HOSTNAMES": "localhost",
            "TPU_ACCELERATOR_TYPE": f"{accel}-{target.num_chips * target.chip.cores_per_chip}"}


def devices(target: Target):
    """The target's devices: abstract TPU devices from libtpu, or the first N CPU devices."""
    import jax
    if target.platform == "cpu":
        cpus = jax.devices("cpu")
        if len(cpus) < target.num_chips:
            raise ValueError(
                f"--topology={target.name} needs {target.num_chips} CPU devices but jax has {len(cpus)}; "
                f"set XLA_FLAGS=--xla_force_host_platform_device_count={target.num_chips} before jax is "
                "imported (launch/compile.py does).")
        return cpus[:target.num_chips]
    try:
        from jax.experimental import topologies
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology, chip_config_name="default",
            chips_per_host_bounds=target.host_bounds, num_slices=1)
    except Exception as e:  # noqa: BLE001 - libtpu missing, or too old for this chip
        raise ValueError(
            f"cannot describe TPU topology {target.topology} ({' '.join(str(e).split())[:200]}); "
            "AOT compilation for TPUs needs libtpu next to jax: pip install -e '.[aot]'.") from None
    devs = list(desc.devices)
    if len(devs) != target.num_chips:
        raise ValueError(f"libtpu describes {len(devs)} devices for {target.topology}, "
                         f"expected {target.num_chips}.")
    return devs


def roofline_seconds(flops: float, bytes_accessed: float, chip: Chip) -> float:
    """The roofline lower bound of a step: compute time or memory time, whichever is longer."""
    if chip is None:
        return math.nan
    return max(flops / (chip.peak_bf16_tflops * 1e12), bytes_accessed / (chip.hbm_gbps * 1e9))
