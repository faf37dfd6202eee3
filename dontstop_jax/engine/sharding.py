"""The one place where shardings are decided: a (data, fsdp, tensor) mesh and logical-axis rules.

Model code names parameter and activation axes logically ("embed", "heads", "batch", ...); the config's
rule list maps each logical name to a mesh axis (or None = replicated). A dimension whose size the mesh
axis does not divide is replicated instead of failing (e.g. a 4-head model on tensor=8), so any mesh runs;
but a large parameter that this leaves whole on every device is refused (`check_replicated`) unless the
config opts out (`mesh.allow_replicated`): it would silently cost memory the mesh was chosen to save.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dontstop_jax.distributed import process_major
from dontstop_jax.errors import UserError
from dontstop_jax.fields import BATCH_AXES

MESH_AXES = ("data", "fsdp", "tensor")
# BATCH_AXES (the axes that split the batch) and DEFAULT_RULES, the (logical axis, mesh axes) layout rules, are
# the default of the config field mesh.rules, declared in fields.py: data, not code (override them in the config).

Rules = Sequence[tuple[str, Any]]
# Parameters at least this large (bytes) must not end up replicated because a mesh axis could not divide them.
REPLICATED_LIMIT_BYTES = 1 << 20


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fill the single -1 in `shape` from the device count; fail with the fix if it cannot fit."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise UserError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise UserError(f"mesh shape {shape} may hold at most one -1 and otherwise positive sizes")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise UserError(
                f"mesh shape {shape} cannot fit {num_devices} devices: {known} does not divide it; "
                f"choose sizes whose product divides {num_devices}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise UserError(
            f"mesh shape {shape} needs {math.prod(shape)} devices but {num_devices} are available; "
            "use -1 for one axis to fill it from the device count"
        )
    return shape


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1),
    devices: Sequence[jax.Device] | None = None,
    dcn_shape: Sequence[int] | None = None,
) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes: shardings are set by jit and logical constraints.

    With several processes each must hold a contiguous block of batch rows, the block its loader reads
    (`data` across processes, `fsdp`/`tensor` within one): mesh_utils' physical layout is kept when it
    does, else devices go in process-major order. The hosts are those the devices name (`process_index`), not
    the running processes: a TPU topology compiled for on one CPU machine spans many. `dcn_shape` builds a hybrid
    multi-slice mesh: `shape` within a slice (or process, where devices name no slice), `dcn_shape` across them; the
    mesh is their elementwise product.
    """
    devices = list(devices if devices is not None else jax.devices())
    hosts = len({d.process_index for d in devices})
    if dcn_shape is None:
        shape = resolve_mesh_shape(shape, len(devices))
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        if not rows_follow_processes(grid, hosts):
            grid = process_major(devices, shape)
    else:
        grid = _hybrid_grid(shape, dcn_shape, devices)
    if not rows_follow_processes(grid, hosts):
        raise UserError(
            f"mesh {dict(zip(MESH_AXES, grid.shape))} does not give each of the {hosts} "
            "processes a contiguous block of batch rows; make data x fsdp a multiple of the process "
            "count and tensor no larger than the devices of one process"
        )
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _hybrid_grid(shape: Sequence[int], dcn_shape: Sequence[int], devices: list[jax.Device]) -> np.ndarray:
    by_process = len({getattr(d, "slice_index", 0) for d in devices}) == 1  # CPU/GPU: processes are the granules
    granules = len({d.process_index if by_process else d.slice_index for d in devices})
    try:
        dcn = resolve_mesh_shape(dcn_shape, granules)
    except UserError as err:
        raise UserError(
            f"mesh.dcn_shape spans {'processes' if by_process else 'slices'} ({granules} here), not devices: {err}"
        ) from None
    ici = resolve_mesh_shape(shape, len(devices) // granules)
    try:
        return mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=by_process, allow_split_physical_axes=True
        )
    except ValueError as err:
        raise UserError(f"mesh shape {ici} x dcn_shape {dcn}: {err}") from None


def rows_follow_processes(grid: np.ndarray, process_count: int) -> bool:
    """Whether process p's devices hold exactly batch rows [p*R/n, (p+1)*R/n) of the R = data x fsdp rows,
    i.e. the rows `MLMLoader(process_index=p, process_count=n)` reads (what `to_global` assumes)."""
    procs = np.vectorize(lambda d: d.process_index, otypes=[int])(grid.reshape(-1, grid.shape[-1]))
    rows = procs.shape[0]
    return rows % process_count == 0 and bool((procs == (np.arange(rows) // (rows // process_count))[:, None]).all())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "global batch size", accum_steps: int = 1) -> None:
    """The batch must split into `accum_steps` micro-batches that each spread evenly over the data-parallel
    devices."""
    dp = data_parallel_size(mesh)
    if accum_steps < 1:
        raise UserError(f"train.accum_steps must be >= 1, got {accum_steps}")
    if global_batch_size % accum_steps:
        raise UserError(
            f"{what} {global_batch_size} is not divisible by train.accum_steps {accum_steps} (the "
            f"batch is split into that many micro-batches); use a multiple of {accum_steps} or lower "
            "train.accum_steps"
        )
    micro = global_batch_size // accum_steps
    if micro % dp:
        rows = f" / train.accum_steps {accum_steps} = {micro} rows per micro-batch" if accum_steps > 1 else ""
        raise UserError(
            f"{what} {global_batch_size}{rows} is not divisible by the data-parallel size {dp} "
            f"(mesh data x fsdp); use a batch size that is a multiple of {accum_steps * dp}"
        )


def _partition(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> tuple[P, list[tuple[str | None, int, tuple[str, ...]]]]:
    """(spec, undivided): the PartitionSpec, and each (logical name, size, mesh axes) whose rule named mesh axes
    larger than 1 that the dimension's size could not be split over (that dimension is replicated instead)."""
    table = dict(rules)
    used: set[str] = set()
    spec, undivided = [], []
    for name, size in zip(names, shape):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
            if axes:
                undivided.append((name, size, axes))
    return P(*spec), undivided


def logical_to_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> NamedSharding:
    """Map one array's logical axis names to a NamedSharding, replicating dimensions that do not divide."""
    return NamedSharding(mesh, _partition(names, shape, mesh, rules)[0])


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def check_replicated(
    boxed_abstract: Any, mesh: Mesh, rules: Rules, *, limit_bytes: int = REPLICATED_LIMIT_BYTES
) -> None:
    """Refuse parameters of at least `limit_bytes` that would sit whole on every device because their rules'
    mesh axes could not divide them (e.g. an unpadded 50265-row vocabulary on tensor=2): the layout silently
    costs the memory the mesh was chosen to save. Parameters the rules replicate on purpose are left alone."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(boxed_abstract, is_leaf=_is_box)[0]:
        if not _is_box(leaf) or not hasattr(leaf.value, "shape"):
            continue
        shape = tuple(leaf.value.shape)
        size = math.prod(shape) * np.dtype(leaf.value.dtype).itemsize
        spec, undivided = _partition(leaf.names, shape, mesh, rules)
        if size >= limit_bytes and undivided and all(s is None for s in spec):
            found.append((size, "/".join(str(getattr(k, "key", k)) for k in path), shape, undivided[0]))
    if not found:
        return
    size, name, shape, (logical, dim, axes) = max(found)
    mesh_text = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
    divisor = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
    others = f" ({len(found) - 1} more parameter(s) alike)" if len(found) > 1 else ""
    raise UserError(
        f"parameter {name} {list(shape)} ({size / 2**20:.1f} MiB) would be replicated on every device "
        f"of mesh {mesh_text}: its {logical!r} dimension {dim} is not divisible by {divisor}{others}; "
        "choose mesh sizes (or mesh.rules) that divide it, or set mesh.allow_replicated=True to accept "
        "the copies"
    )


def tree_shardings(boxed_abstract: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for a pytree whose leaves may be flax LogicallyPartitioned boxes (unboxed structure out)."""

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            if not hasattr(leaf.value, "shape"):  # optax.MaskedNode: a frozen leaf's absent optimizer state
                return leaf.value
            return logical_to_sharding(leaf.names, leaf.value.shape, mesh, rules)
        return NamedSharding(mesh, P())  # scalars, step counters, RNG keys: replicated

    return jax.tree_util.tree_map(one, boxed_abstract, is_leaf=_is_box)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) dimension split over data x fsdp; everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays on the mesh (works for 1 or many hosts)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def put_tree(tree: Any, shardings: Any) -> Any:
    """Place host numpy arrays (identical on every host, e.g. imported weights) onto their shardings."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]), tree, shardings
    )


def _named(entry: Any) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _entry(axes: tuple[str, ...]) -> Any:
    return axes[0] if len(axes) == 1 else (axes or None)


def only_axes(spec: P, axes: Sequence[str]) -> P:
    """`spec` naming only the mesh axes in `axes` (a shard_map spec over those axes; the others stay automatic)."""
    return P(*(_entry(tuple(a for a in _named(e) if a in axes)) for e in spec))


def rules_without(rules: Rules, axes: Sequence[str]) -> Rules:
    """The logical rules with `axes` removed: inside a shard_map over them each device's block is local, so an
    activation constraint must not name them."""
    return tuple((name, _entry(tuple(a for a in _named(target) if a not in axes))) for name, target in rules)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Context for tracing model code: logical activation constraints resolve against this mesh."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
