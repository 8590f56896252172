"""Where arrays live: the device mesh and the logical-axis -> mesh-axis rules.

Modules only name logical axes (`embed`, `experts`, `batch`, ...); this module is the
one place that maps them to the mesh. The mesh has three axes:

    data     pure data parallelism: the batch is split, weights are replicated;
    fsdp     the batch is split and so are the weights and their optimizer state
             (ZeRO-3: each weight's `embed` dimension is split; a step gathers a
             weight where it is used and reduce-scatters its gradient);
    expert   the batch is split and the routed experts too (expert parallelism: the
             MoE sends token copies to their experts' devices, `moe.py`).

The batch is split over all three (every device holds a distinct slice of it). Engram
tables are state of their own (`table.py`): their rows are split over
`MeshConfig.table_axes` (default: every device) and their memory kind follows their
placement (`table_sharding`). A tensor-parallel axis is not provided: at the presets'
widths FSDP plus expert parallelism already shard every large weight.

Meshes of several hosts or slices are built with JAX's hybrid mesh (`dcn_data`
replicas of the per-slice mesh over the data-center network).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from engram_jax.config_base import Config

DATA, FSDP, EXPERT = "data", "fsdp", "expert"
AXES = (DATA, FSDP, EXPERT)
BATCH_AXES = AXES  # the batch is split over every device

# Logical axis -> mesh axes. Anything not named here is replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", FSDP),  # ZeRO-3: weights (and their moments) split along the model width
    ("branch_embed", FSDP),  # mHC's flattened G x D stream
    ("experts", EXPERT),  # expert parallelism
)


@dataclasses.dataclass(frozen=True)
class MeshConfig(Config):
    """Device mesh shape: `data x fsdp x expert` devices.

    Attributes:
      data, fsdp, expert: devices along each axis; one of them may be -1, inferred from
        the device count (default: data).
      dcn_data: replicas of the `data x fsdp x expert` mesh over the data-center network
        (slices or hosts); the `data` axis then spans dcn_data x data devices.
      table_axes: mesh axes that split the rows of the Engram tables; empty means every
        axis (each device holds 1/devices of every table, no replica). Axes left out
        hold replicas, which receive every shard's updates.
      device_memory_gb: the memory of one device, for the fit check (`--dry-run`); 0
        uses the device's own.
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    dcn_data: int = 1
    table_axes: tuple[str, ...] = ()
    device_memory_gb: float = 0.0

    def validate(self) -> None:
        sizes = {DATA: self.data, FSDP: self.fsdp, EXPERT: self.expert}
        for name, size in sizes.items():
            self.check(size >= 1 or size == -1, name, "must be >= 1, or -1 to infer it from the device count")
        self.check(sum(size == -1 for size in sizes.values()) <= 1, "data",
                   "at most one of data, fsdp, expert may be -1")
        self.check(self.dcn_data >= 1, "dcn_data", "must be >= 1")
        self.check(set(self.table_axes) <= set(AXES), "table_axes", f"axes must be among {', '.join(AXES)}")
        self.check(self.device_memory_gb >= 0, "device_memory_gb", "must be >= 0")

    def shape(self, num_devices: int) -> dict[str, int]:
        """{axis: size} for `num_devices` devices (`data` spans the DCN replicas too)."""
        sizes = {DATA: self.data, FSDP: self.fsdp, EXPERT: self.expert}
        per_slice, rest = divmod(num_devices, self.dcn_data)
        if rest:
            raise ValueError(f"mesh.dcn_data = {self.dcn_data} does not divide the {num_devices} devices")
        known = math.prod(v for v in sizes.values() if v != -1)
        if -1 in sizes.values():
            if per_slice % known:
                raise ValueError(f"the mesh {self._describe()} does not divide the {per_slice} devices per slice")
            sizes = {k: per_slice // known if v == -1 else v for k, v in sizes.items()}
        elif known != per_slice:
            raise ValueError(f"the mesh {self._describe()} has {known} devices per slice, but there are "
                             f"{per_slice}; set one axis to -1 to infer it")
        sizes[DATA] *= self.dcn_data
        return sizes

    def _describe(self) -> str:
        return " x ".join(f"{k} {'?' if v == -1 else v}" for k, v in
                          ((DATA, self.data), (FSDP, self.fsdp), (EXPERT, self.expert)))


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """The (data, fsdp, expert) mesh over all devices (or the given ones).

    One slice: `mesh_utils.create_device_mesh`, which orders devices by their physical
    links where it knows the topology. Several (`dcn_data > 1`): the hybrid mesh, each
    granule one replica along `data`: a slice where the devices name several slices
    (multi-slice TPU), else a process (GPU hosts and CPU processes, whose devices name
    slice 0 or none). The devices of one process and one slice (a dry run's simulated
    devices) are laid out as the hybrid mesh would order them: each replica is a block
    of consecutive devices.

    Raises:
      ValueError: the mesh does not fit the device count, or `dcn_data` is not the
        number of slices (or processes) the devices span (one line).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.shape(len(devices))
    shape = tuple(sizes[a] for a in AXES)
    slices = {getattr(d, "slice_index", None) for d in devices}
    processes = {getattr(d, "process_index", 0) for d in devices}
    if config.dcn_data > 1 and (len(slices) > 1 or len(processes) > 1):
        by_slice = len(slices) > 1 and None not in slices
        granules = len(slices) if by_slice else len(processes)
        if granules != config.dcn_data:
            raise ValueError(f"mesh.dcn_data = {config.dcn_data}, but the devices span {granules} "
                             f"{'slices' if by_slice else 'processes'}; set it to {granules} (or 1)")
        ici = (sizes[DATA] // config.dcn_data, sizes[FSDP], sizes[EXPERT])
        grid = mesh_utils.create_hybrid_device_mesh(ici, (config.dcn_data, 1, 1), devices,
                                                    process_is_granule=not by_slice)
    elif devices[0].platform == "cpu":
        grid = np.array(devices).reshape(shape)  # replicas (dcn_data) are consecutive blocks
    else:
        grid = mesh_utils.create_device_mesh(shape, devices)
    # Auto axes: GSPMD propagates shardings through the model from those we place.
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def axis_size(mesh: Mesh | None, axis: str) -> int:
    """Devices along `axis` (1 without a mesh or without that axis)."""
    return 1 if mesh is None else dict(mesh.shape).get(axis, 1)


def logical_to_spec(names, shape=None, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names, under RULES.

    With `shape` and `mesh`, a dimension that its mesh axes do not divide (a norm of
    odd width on fsdp 4) stays replicated, and so does a mesh axis already used by an
    earlier dimension.
    """
    rules = dict(RULES)
    spec, used = [], set()
    for i, name in enumerate(names):
        axes = rules.get(name)
        if axes is not None and mesh is not None:
            group = (axes,) if isinstance(axes, str) else tuple(axes)
            group = tuple(a for a in group if a in mesh.shape and a not in used)
            size = math.prod(mesh.shape[a] for a in group)
            if not group or (shape is not None and shape[i] % size):
                axes = None
            else:
                axes = group[0] if len(group) == 1 else group
        if axes is not None:
            used.update((axes,) if isinstance(axes, str) else axes)
        spec.append(axes)
    return PartitionSpec(*spec)


def is_axes(x) -> bool:
    """Whether `x` is one array's logical axis names (a leaf of an axes tree)."""
    return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def tree_shardings(mesh: Mesh, axes, shapes=None) -> dict:
    """NamedShardings for a pytree of logical axis-name tuples (one per array); with
    `shapes` (a matching tree of arrays or ShapeDtypeStructs) indivisible dimensions
    stay replicated (see `logical_to_spec`)."""
    if shapes is None:
        return jax.tree.map(lambda names: NamedSharding(mesh, logical_to_spec(names, None, mesh)), axes,
                            is_leaf=is_axes)
    return jax.tree.map(lambda names, x: NamedSharding(mesh, logical_to_spec(names, x.shape, mesh)), axes,
                        shapes, is_leaf=is_axes)


def logical_axes(boxed_tree) -> dict:
    """Logical axis names of every array in a tree of (possibly boxed) variables.

    Arrays without names (plain arrays, e.g. MoE balancing biases) get a tuple of
    Nones of their rank: replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    shapes = nn.unbox(boxed_tree)
    return jax.tree.map(lambda spec, x: tuple(spec) if spec else (None,) * len(x.shape), specs, shapes,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def _dict_path(path) -> tuple[str, ...]:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def like_params(tree, param_shardings, default: NamedSharding):
    """Shardings for a tree that holds params-shaped parts (an optimizer state).

    A leaf whose dict-key path ends with a parameter's path (Adam's `mu/.../kernel`)
    takes that parameter's sharding; anything else (counts, masked groups) `default`.
    """
    by_path = {_dict_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]}
    longest = max((len(p) for p in by_path), default=0)

    def pick(path, leaf):
        keys = _dict_path(path)
        for n in range(min(len(keys), longest), 0, -1):
            match = by_path.get(keys[-n:])
            if match is not None and len(match.spec) <= len(getattr(leaf, "shape", ())):
                return match
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)


def table_sharding(mesh: Mesh, axes: tuple[str, ...], placement: str, ndim: int) -> NamedSharding:
    """Engram table state: rows (the first axis) split over `axes`, in device memory or,
    for `placement="host"`, in pinned host memory."""
    kind = {"device": "device", "host": "pinned_host"}[placement]
    return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))), memory_kind=kind)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that split the batch (those of BATCH_AXES the mesh has)."""
    return tuple(a for a in BATCH_AXES if a in mesh.shape)


def constrain_batch(x, mesh: Mesh | None):
    """`x` [B, ...] constrained to be split by its first axis over the batch axes
    (activations inside a jitted step; no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(batch_axes(mesh))))


def constrain_replicated(x, mesh: Mesh | None):
    """`x` constrained to be whole on every device (a weight gathered for use)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec()))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split along their first axis over every device (`data x fsdp x expert`)."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
    """This process's batch shard -> global jax.Arrays split over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch)


class Prefetch:
    """Batches of a data iterator placed on the mesh `size` steps ahead.

    `next()` hands out global batches (`global_batch`) whose host-to-device transfers
    were started while earlier steps ran; JAX copies asynchronously, so the next batch
    is on its devices by the time the step that needs it starts. `get_state()` is the
    data iterator's state after the batches handed out, not after those prefetched:
    a checkpoint saves it (Grain's checkpoint handler takes any object with
    `get_state() -> bytes`), so a resumed run sees exactly the batches it would have.

    Args:
      iterator: a Grain `DatasetIterator` of this process's batches (already restored).
      mesh: the mesh the batches are split over.
      size: batches kept in flight.
    """

    def __init__(self, iterator, mesh: Mesh, size: int = 2):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self.iterator, self.mesh, self.size = iterator, mesh, size
        self.queue: collections.deque = collections.deque()  # (iterator state before, batch)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while len(self.queue) < self.size:
            state = self.iterator.get_state()
            self.queue.append((state, global_batch(self.mesh, next(self.iterator))))
        return self.queue.popleft()[1]

    def get_state(self) -> bytes:
        state = self.queue[0][0] if self.queue else self.iterator.get_state()
        return json.dumps(state, indent=1).encode()
