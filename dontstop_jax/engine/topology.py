"""Cloud TPU slices as compile-only devices: what `dontstop plan` compiles for on a machine without TPUs.

Accelerator types are named as Cloud TPU names them: for v4 and v5p the number counts TensorCores (2 per chip,
one megacore device), for v5litepod and v6e it counts chips. Needs libtpu (`pip install -e ".[tpu]"`), which
only describes the topology here; nothing runs on it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax

from dontstop_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures: bf16 FLOP/s, HBM bytes, HBM bytes/s, ICI bytes/s (all links together)."""

    kind: str
    peak_flops: float
    hbm_bytes: int
    hbm_bandwidth: float
    ici_bandwidth: float


# Sources: cloud.google.com/tpu/docs/v4, v5e, v5p, v6e (system architecture pages; ICI given there in Gbps,
# here in bytes/s); v4's ICI from Jouppi et al. 2023 (6 links x 50 GB/s).
CHIPS = {
    "v4": Chip("v4", 275e12, 32 << 30, 1200e9, 300e9),
    "v5litepod": Chip("v5e", 197e12, 16 << 30, 819e9, 200e9),
    "v5p": Chip("v5p", 459e12, 95 << 30, 2765e9, 600e9),
    "v6e": Chip("v6e", 918e12, 32 << 30, 1640e9, 448e9),
}
_TOPOLOGY_PREFIX = {"v4": "v4", "v5litepod": "v5e", "v5p": "v5p", "v6e": "v6e"}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2}
# chips -> physical shape: 3D tori for v4/v5p (4 chips per host), 2D for v5e/v6e.
_SHAPES_3D: dict[int, tuple[int, ...]] = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
}
_SHAPES_2D: dict[int, tuple[int, ...]] = {
    1: (1, 1),
    4: (2, 2),
    8: (2, 4),
    16: (4, 4),
    32: (4, 8),
    64: (8, 8),
    128: (8, 16),
    256: (16, 16),
}


def supported() -> list[str]:
    names = []
    for family, shapes in [("v4", _SHAPES_3D), ("v5p", _SHAPES_3D), ("v5litepod", _SHAPES_2D), ("v6e", _SHAPES_2D)]:
        names += [f"{family}-{chips * _CORES_PER_CHIP.get(family, 1)}" for chips in shapes]
    return names


def parse(name: str) -> tuple[Chip, str, tuple[int, int, int]]:
    """`v5litepod-16` -> (chip, get_topology_desc topology name, chips per host bounds)."""
    match = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", name)
    if match is None or name not in supported():
        raise UserError(f"unknown TPU topology {name!r}; supported: {', '.join(supported())}")
    family, count = match.group(1), int(match.group(2))
    chips = count // _CORES_PER_CHIP.get(family, 1)
    shape = (_SHAPES_3D if family in _CORES_PER_CHIP else _SHAPES_2D)[chips]
    # v5e/v6e: one 8-chip host up to 8 chips, else 4-chip hosts; v4/v5p: 4-chip hosts.
    per_host = (2, 4, 1) if chips == 8 and len(shape) == 2 else (min(shape[0], 2), min(shape[1], 2), 1)
    return CHIPS[family], f"{_TOPOLOGY_PREFIX[family]}:{'x'.join(map(str, shape))}", per_host


def devices(name: str, slices: int = 1) -> tuple[Chip, list[jax.Device]]:
    """Compile-only devices of `slices` slices of accelerator type `name`, each naming its host and slice."""
    chip, topology, per_host = parse(name)
    if slices < 1:
        raise UserError(f"--slices must be >= 1, got {slices}")
    if importlib.util.find_spec("libtpu") is None:
        raise UserError('planning for TPUs needs libtpu: pip install -e ".[tpu]"')
    # No TPU here: tell libtpu so, or it prints a page of warnings looking for its own hosts.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topology,
        num_slices=slices,
        chip_config_name="megacore" if chip.kind == "v4" else "default",
        chips_per_host_bounds=per_host,
    )
    return chip, list(desc.devices)
