"""Where arrays live: the device mesh and the logical-axis -> mesh-axis rules.

Modules only name logical axes (`embed`, `experts`, `engram_rows`, ...); this module is
the one place that maps them to the mesh. The mesh has a `data` axis (batch) and a
`model` axis (routed experts are split over it); with `model = 1` everything but the
batch and the Engram tables is replicated. Engram tables are state of their own
(`table.py`): their rows are split over `MeshConfig.table_axes` (default: every device)
and their memory kind follows their placement (`table_sharding`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from engram_jax.config_base import Config

DATA, MODEL = "data", "model"

# Logical axis -> mesh axis. Anything not named here is replicated.
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", DATA),
    ("experts", MODEL),  # expert parallelism
)


@dataclasses.dataclass(frozen=True)
class MeshConfig(Config):
    """Device mesh shape.

    Attributes:
      model: devices along the `model` axis (experts); the remaining devices form the
        `data` axis.
      table_axes: mesh axes that split the rows of the Engram tables; empty means every
        axis (each device holds 1/devices of every table, no replica). Axes left out
        hold replicas, which receive every shard's updates.
    """

    model: int = 1
    table_axes: tuple[str, ...] = ()

    def validate(self) -> None:
        self.check(self.model >= 1, "model", "must be >= 1")
        self.check(set(self.table_axes) <= {DATA, MODEL}, "table_axes", f"axes must be among {DATA!r}, {MODEL!r}")


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """A (data, model) mesh over all devices (or the given ones)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % config.model:
        raise ValueError(f"MeshConfig.model = {config.model} does not divide the {len(devices)} devices")
    grid = np.array(devices).reshape(len(devices) // config.model, config.model)
    # Auto axes: GSPMD propagates shardings through the model from those we place.
    return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def logical_to_spec(names) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names, under RULES."""
    rules = dict(RULES)
    return PartitionSpec(*(rules.get(n) for n in names))


def is_axes(x) -> bool:
    """Whether `x` is one array's logical axis names (a leaf of an axes tree)."""
    return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def tree_shardings(mesh: Mesh, axes) -> dict:
    """NamedShardings for a pytree of logical axis-name tuples (one per array)."""
    return jax.tree.map(lambda names: NamedSharding(mesh, logical_to_spec(names)), axes, is_leaf=is_axes)


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


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split along their first axis over the `data` mesh axis."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
    """This process's batch shard -> global jax.Arrays split over `data`."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch)
