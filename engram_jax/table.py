"""Engram's multi-head embedding tables as their own sharded state (paper eq. 1-2, section 2.5).

All hash heads of a layer share one table of V = sum(p) rows: head i owns rows
[offset_i, offset_i + p_i), offsets being the exclusive prefix sum of the head primes,
so a token's global row is `hash + offset`. The tables are not Flax parameters: they
live beside them in the train state (`TableState`: rows plus per-row optimizer
slots), and the train step reads and writes them through this engine:

    memory = tables.lookup(state.rows, hash_ids)          # only the addressed rows move
    (loss, _), (g_params, g_memory) = value_and_grad(...)(params, memory)
    pushed = tables.push(hash_ids, g_memory)              # row gradients to their owners
    state  = tables.apply(state, pushed, lr, step, scale) # row optimizer, touched rows only

Layout. The rows of every layer are split over the shard axes of the mesh (by default
every device): shard s owns the contiguous rows [s R, (s + 1) R), R = ceil(V / S), and
the last shard is padded so that all shards have the same shape. Padding rows are
never addressed. Mesh axes that are not shard axes hold replicas.

Lookup (`jax.shard_map` over the whole mesh). Each device takes 1/devices of the
batch's ids, sorts and de-duplicates them, and sends each unique id to the shard that
owns it with one `all_to_all` in fixed-capacity buckets [S, C]; the owners gather
their rows (in host memory when the table is placed there) and a second `all_to_all`
returns them. Gradients take the same route back: summed once per unique id on the
requesting device, once more per row at the owner, where the row optimizer updates
only those rows in place. No device holds a whole table, and no table-shaped gradient
exists (except for the dense `adam` algorithm, kept for parity).

Capacity. A bucket holds C = min(U, max(ceil(f U / S), 64)) ids, U being the device's
id slots and f `EngramConfig.lookup_capacity_factor`; f = 0 sizes C = U, which can
never overflow. Hash ids are uniform over the rows, so the expected load of a bucket
is at most U / S; ids beyond C are dropped (their memory vector is zero and their row
is not updated) and counted in the `engram_dropped/<layer>` metric, never silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compute_on import compute_on
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engram_jax import sharding, table_optim
from engram_jax.engram import EngramConfig

# Row ids and local offsets are int32 on the device (x64 is off in the library).
_INT32_LIMIT = 2**31
# Smallest bucket: below this many ids per destination the binomial tail of a
# capacity factor is not small, so small batches get exact (no-drop) buckets.
_MIN_CAPACITY = 64
ROW_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def head_offsets(head_sizes: Sequence[int]) -> np.ndarray:
    """First row of each head, [H]: the exclusive prefix sum of the head sizes."""
    return np.concatenate([[0], np.cumsum(head_sizes)[:-1]]).astype(np.int64)


def layer_key(layer_id: int) -> str:
    """The key of a layer's table in `TableState` (Orbax trees need string keys)."""
    return f"layer_{layer_id}"


def gather(rows: jax.Array, hash_ids: jax.Array, head_sizes: Sequence[int]) -> jax.Array:
    """A plain lookup of one layer's memory vectors, for one device or a reference.

    Args:
      rows: [V, Dh] (or padded [V', Dh]) table of the layer.
      hash_ids: [B, T, H] integer row of each head within its own head table.
      head_sizes: rows of each head, [H].

    Returns:
      [B, T, H * Dh] memory vectors e_t in the table's dtype.
    """
    chex.assert_rank(hash_ids, 3)
    chex.assert_axis_dimension(hash_ids, 2, len(head_sizes))
    chex.assert_type(hash_ids, int)
    ids = hash_ids + jnp.asarray(head_offsets(head_sizes), hash_ids.dtype)  # [B, T, H]
    e = jnp.take(rows, ids, axis=0)  # [B, T, H, Dh]
    return e.reshape(*hash_ids.shape[:2], -1)


@dataclasses.dataclass(frozen=True)
class TableLayout:
    """How one layer's table is split over S shards.

    Attributes:
      head_sizes: rows of each head (the primes), [H].
      dim: columns (Dh).
      shards: S, the number of row shards.
    """

    head_sizes: tuple[int, ...]
    dim: int
    shards: int

    def __post_init__(self):
        if self.padded_rows >= _INT32_LIMIT:
            raise ValueError(f"an Engram table of {self.rows:,} rows ({self.padded_rows:,} padded over "
                             f"{self.shards} shards) has row ids >= 2**31, which int32 cannot address; "
                             "use smaller table_sizes or more Engram layers")

    @property
    def rows(self) -> int:
        """V: the addressed rows."""
        return int(sum(self.head_sizes))

    @property
    def rows_per_shard(self) -> int:
        """R = ceil(V / S)."""
        return -(-self.rows // self.shards)

    @property
    def padded_rows(self) -> int:
        """S R: the table's global shape along rows."""
        return self.rows_per_shard * self.shards


@flax.struct.dataclass
class TableState:
    """The tables of every Engram layer and their optimizer slots.

    Attributes:
      rows: `{layer_key: [V', Dh]}` the tables (V' rows with padding).
      slots: `{layer_key: {slot: [V', ...]}}` per-row optimizer state (`table_optim`).
    """

    rows: dict
    slots: dict


@flax.struct.dataclass
class PushedGrads:
    """One layer's row gradients at their owners: per device M slots of (row, gradient).

    Attributes:
      rows: [S * M] int32 local row of each slot within its shard (split over the shard
        axes, the same on a shard's replicas); R (one past the shard) marks an empty slot.
      grads: [S * M, Dh] float32 gradient of each row, duplicates summed.
    """

    rows: jax.Array
    grads: jax.Array


class Tables:
    """The engine that owns the layout of all Engram tables on one mesh.

    Args:
      config: the Engram config (layers, head primes, placement, row dtype).
      mesh: the device mesh. The batch may be split over any of its axes: each device
        looks up 1/devices of the batch's ids, whichever they are.
      optimizer: the row optimizer (`table_optim.RowOptimizer`).
      shard_axes: mesh axes that split the rows; default every axis.
    """

    def __init__(self, config: EngramConfig, mesh: Mesh, optimizer: table_optim.RowOptimizer,
                 shard_axes: Sequence[str] = ()):
        unknown = [a for a in shard_axes if a not in mesh.axis_names]
        if unknown:
            raise ValueError(f"mesh axes {unknown} are not in the mesh {tuple(mesh.axis_names)}")
        if optimizer.dense and config.placement == "host":
            raise ValueError("table_algorithm 'adam' updates every row each step, which a table in host "
                             "memory cannot do where it lives; use lazy_adam, adagrad or sgd with placement=host")
        self.config, self.mesh, self.optimizer = config, mesh, optimizer
        self.axes = tuple(mesh.axis_names)  # the shard_maps run over the whole mesh
        self.shard_axes = tuple(shard_axes) or self.axes
        self.replica_axes = tuple(a for a in self.axes if a not in self.shard_axes)
        self.devices = mesh.size
        shards = math.prod(mesh.shape[a] for a in self.shard_axes)
        self.layouts = {i: TableLayout(config.head_sizes(i), config.head_dim, shards) for i in config.layer_ids}
        self.host = config.placement == "host"
        self.row_dtype = ROW_DTYPES[config.table_dtype]

    # ------------------------------------------------------------------ state

    def _sharding(self, ndim: int) -> NamedSharding:
        return sharding.table_sharding(self.mesh, self.shard_axes, self.config.placement, ndim)

    def abstract_state(self) -> TableState:
        """Shapes, dtypes and shardings of the state (nothing is allocated)."""
        rows, slots = {}, {}
        for i, layout in self.layouts.items():
            shape = (layout.padded_rows, layout.dim)
            rows[layer_key(i)] = jax.ShapeDtypeStruct(shape, self.row_dtype, sharding=self._sharding(2))
            slots[layer_key(i)] = {
                name: jax.ShapeDtypeStruct(s, d, sharding=self._sharding(len(s)))
                for name, (s, d) in self.optimizer.slot_shapes(layout.padded_rows, layout.dim,
                                                               self.row_dtype).items()}
        return TableState(rows=rows, slots=slots)

    def shardings(self) -> TableState:
        """The NamedShardings (with memory kinds) of the state."""
        return jax.tree.map(lambda x: x.sharding, self.abstract_state())

    def init(self, rng: jax.Array) -> TableState:
        """Fresh tables: N(0, table_init_std) rows, zero padding rows, zero slots.

        Call it under `jax.jit(..., out_shardings=tables.shardings())` (as `init_state`
        does) so that each device draws only its own rows.
        """
        rows, slots = {}, {}
        for i, layout in self.layouts.items():
            key = jax.random.fold_in(rng, i)
            shape = (layout.padded_rows, layout.dim)
            table = self.config.table_init_std * jax.random.normal(key, shape, jnp.float32)
            valid = jnp.arange(layout.padded_rows)[:, None] < layout.rows  # padding rows stay 0
            rows[layer_key(i)] = jnp.where(valid, table, 0).astype(self.row_dtype)
            slots[layer_key(i)] = {name: jnp.zeros(s, d) for name, (s, d) in
                                   self.optimizer.slot_shapes(layout.padded_rows, layout.dim, self.row_dtype).items()}
        return TableState(rows=rows, slots=slots)

    # ------------------------------------------------------------------ routing

    def global_ids(self, hash_ids: Mapping[int, jax.Array]) -> dict[int, jax.Array]:
        """`{layer: [B, T, H]}` per-head ids -> global rows (hash + head offset), int32;
        a negative id stays -1, which no device fetches and no update touches."""
        out = {}
        for i, layout in self.layouts.items():
            ids = hash_ids[i]
            chex.assert_rank(ids, 3)
            chex.assert_axis_dimension(ids, 2, len(layout.head_sizes))
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise ValueError(f"hash_ids of layer {i} must be integers, got {ids.dtype}")
            ids = ids.astype(jnp.int32)
            rows = ids + jnp.asarray(head_offsets(layout.head_sizes), jnp.int32)
            # A negative id (the device hasher's mark of a token outside the vocabulary) reads zeros.
            out[i] = jnp.where(ids >= 0, rows, -1)
        return out

    def _flat(self, x: jax.Array, fill) -> tuple[jax.Array, int]:
        """[B, T, H, ...] -> [n', ...] padded with `fill` so that every device gets n' / devices."""
        n = x.shape[0] * x.shape[1] * x.shape[2]
        flat = x.reshape(n, *x.shape[3:])
        pad = (-n) % self.devices
        if pad:
            flat = jnp.concatenate([flat, jnp.full((pad, *x.shape[3:]), fill, x.dtype)])
        return flat, n

    def capacity(self, local_ids: int) -> int:
        """C: ids per destination bucket for a device with `local_ids` id slots."""
        shards = next(iter(self.layouts.values())).shards
        factor = self.config.lookup_capacity_factor
        if factor <= 0 or shards == 1:
            return local_ids
        return min(local_ids, max(math.ceil(factor * local_ids / shards), _MIN_CAPACITY))

    def _plan(self, ids: jax.Array, layout: TableLayout, capacity: int):
        """Deduplicates a device's ids and places each unique id in its owner's bucket.

        Args:
          ids: [U] global rows, -1 for padding.

        Returns:
          (inverse [U]: slot of each id in the unique list (U: none),
           owner [U], position [U]: bucket and place of each unique id (position >= C:
           dropped), unique [U] sorted unique ids (-1 past the end), dropped scalar).
        """
        u = ids.shape[0]
        order = jnp.argsort(ids)  # padding (-1) first
        s = ids[order]
        valid = s >= 0
        first = valid & jnp.concatenate([jnp.ones((1,), bool), s[1:] != s[:-1]])
        slot = jnp.cumsum(first) - 1  # [U] index in the unique list
        unique = jnp.full((u,), -1, jnp.int32).at[jnp.where(first, slot, u)].set(s, mode="drop")
        inverse = jnp.zeros((u,), jnp.int32).at[order].set(jnp.where(valid, slot, u).astype(jnp.int32))
        present = unique >= 0
        owner = jnp.where(present, unique // layout.rows_per_shard, layout.shards)
        # Unique ids are sorted, so each owner's ids are contiguous: place = index - start.
        start = jnp.searchsorted(owner, jnp.arange(layout.shards), side="left")
        position = jnp.arange(u) - start[jnp.minimum(owner, layout.shards - 1)]
        position = jnp.where(present, position, capacity)
        dropped = jnp.sum(present & (position >= capacity))
        return inverse, owner, position, unique, dropped

    def _shard_index(self) -> jax.Array:
        return jax.lax.axis_index(self.shard_axes) if self.shard_axes else jnp.int32(0)

    def _to_owners(self, x: jax.Array) -> jax.Array:
        """[S, C, ...] buckets by destination -> [S, C, ...] buckets by source."""
        return jax.lax.all_to_all(x, self.shard_axes, 0, 0, tiled=True)

    def _host(self, x):
        return jax.device_put(x, jax.memory.Space.Host) if self.host else x

    def _device(self, x):
        return jax.device_put(x, jax.memory.Space.Device) if self.host else x

    def _where_table_lives(self):
        return compute_on("device_host") if self.host else contextlib.nullcontext()

    # ------------------------------------------------------------------ lookup

    def lookup(self, rows: Mapping[str, jax.Array], hash_ids: Mapping[int, jax.Array],
               dtype=jnp.float32) -> tuple[dict[int, jax.Array], dict[str, jax.Array]]:
        """The memory vectors e_t of every Engram layer.

        Args:
          rows: `TableState.rows`.
          hash_ids: `{layer: [B, T, H]}` per-head ids from `NgramHasher`.
          dtype: dtype of the returned vectors.

        Returns:
          (`{layer: [B, T, H * Dh]}`, `{"engram_dropped/<layer>": ids dropped by full
          buckets, "engram_unique/<layer>": unique ids fetched}` summed over devices).
        """
        memory, stats = {}, {}
        for i, ids in self.global_ids(hash_ids).items():
            layout, table = self.layouts[i], rows[layer_key(i)]
            flat, n = self._flat(ids, -1)  # [n']
            got, dropped, unique = self._lookup_layer(table, flat, layout)
            b, t, h = ids.shape
            memory[i] = got[:n].reshape(b, t, h * layout.dim).astype(dtype)  # [B, T, H * Dh]
            stats[f"engram_dropped/{i}"], stats[f"engram_unique/{i}"] = dropped, unique
        return memory, stats

    def _lookup_layer(self, table, flat_ids, layout: TableLayout):
        everywhere = PartitionSpec(self.axes)
        capacity = self.capacity(flat_ids.shape[0] // self.devices)

        def local(table, ids):  # table [R, Dh] (this shard), ids [U] (this device)
            inverse, owner, position, unique, dropped = self._plan(ids, layout, capacity)
            send = jnp.full((layout.shards, capacity), -1, jnp.int32).at[owner, position].set(unique, mode="drop")
            asked = self._to_owners(send)  # [S, C] ids that each device asks of this shard
            local_row = asked - self._shard_index() * layout.rows_per_shard
            wanted = asked >= 0
            index = self._host(jnp.where(wanted, local_row, 0))
            with self._where_table_lives():
                found = table[index]  # [S, C, Dh]
            found = jnp.where(wanted[..., None], self._device(found).astype(jnp.float32), 0)
            back = self._to_owners(found)  # [S, C, Dh] rows of this device's buckets
            rows_unique = back.at[owner, position].get(mode="fill", fill_value=0)  # [U, Dh]
            out = rows_unique.at[inverse].get(mode="fill", fill_value=0)  # [U, Dh]
            count = jnp.sum(unique >= 0)
            return out, jax.lax.psum(dropped, self.axes), jax.lax.psum(count, self.axes)

        return jax.shard_map(local, mesh=self.mesh, in_specs=(PartitionSpec(self.shard_axes, None), everywhere),
                             out_specs=(PartitionSpec(self.axes, None), PartitionSpec(), PartitionSpec()))(
            table, flat_ids)

    # ------------------------------------------------------------------ gradients

    def push(self, hash_ids: Mapping[int, jax.Array], grads: Mapping[int, jax.Array]) -> dict[int, PushedGrads]:
        """Sends the gradients of the memory vectors to the rows' owners.

        Args:
          hash_ids: the `{layer: [B, T, H]}` ids of the lookup.
          grads: `{layer: [B, T, H * Dh]}` gradients of the memory vectors.

        Returns:
          `{layer: PushedGrads}`, each unique row once per shard, its gradient summed
          over every position and device that read it.
        """
        out = {}
        for i, ids in self.global_ids(hash_ids).items():
            layout = self.layouts[i]
            b, t, h = ids.shape
            flat_ids, _ = self._flat(ids, -1)
            flat_grads, _ = self._flat(grads[i].astype(jnp.float32).reshape(b, t, h, layout.dim), 0)
            out[i] = self._push_layer(flat_ids, flat_grads, layout)
        return out

    def _push_layer(self, flat_ids, flat_grads, layout: TableLayout) -> PushedGrads:
        everywhere = PartitionSpec(self.axes)
        capacity = self.capacity(flat_ids.shape[0] // self.devices)

        def local(ids, grads):  # ids [U], grads [U, Dh]
            u = ids.shape[0]
            inverse, owner, position, unique, _ = self._plan(ids, layout, capacity)
            g_unique = segment_sum(inverse, grads, u)  # [U, Dh], once per id, in batch order
            send_ids = jnp.full((layout.shards, capacity), -1, jnp.int32).at[owner, position].set(
                unique, mode="drop")
            send_g = jnp.zeros((layout.shards, capacity, layout.dim), jnp.float32).at[owner, position].set(
                g_unique, mode="drop")
            got_ids, got_g = self._to_owners(send_ids), self._to_owners(send_g)  # [S, C], [S, C, Dh]
            if self.replica_axes:  # replicas of a shard apply the same updates
                got_ids = jax.lax.all_gather(got_ids, self.replica_axes, tiled=True)
                got_g = jax.lax.all_gather(got_g, self.replica_axes, tiled=True)
            local_row = jnp.where(got_ids >= 0, got_ids - self._shard_index() * layout.rows_per_shard,
                                  layout.rows_per_shard).reshape(-1)  # [M]
            rows, summed = _sum_duplicates(local_row, got_g.reshape(-1, layout.dim), layout.rows_per_shard)
            return rows, summed

        # Replicas of a shard hold the same slots: split over the shard axes only. The
        # all_gather over the replica axes makes them equal, which shard_map's replication
        # check cannot infer from an all_gather (it can from a psum, at R times the traffic).
        rows, summed = jax.shard_map(local, mesh=self.mesh, in_specs=(everywhere, PartitionSpec(self.axes, None)),
                                     out_specs=(PartitionSpec(self.shard_axes), PartitionSpec(self.shard_axes, None)),
                                     check_vma=not self.replica_axes)(flat_ids, flat_grads)
        return PushedGrads(rows=rows, grads=summed)

    def squared_norm(self, pushed: Mapping[int, PushedGrads]) -> jax.Array:
        """Sum of squares of the tables' gradient (each row counted once)."""
        return sum(jnp.sum(p.grads**2) for p in pushed.values())

    # ------------------------------------------------------------------ update

    def apply(self, state: TableState, pushed: Mapping[int, PushedGrads], lr: jax.Array, step: jax.Array,
              scale: jax.Array | float = 1.0) -> TableState:
        """Applies the row optimizer to the pushed rows, in place where the tables live.

        Args:
          state: the tables and slots (donate them to update in place).
          pushed: `push`'s output.
          lr: the tables' learning rate this step.
          step: updates applied so far (dense Adam's bias correction).
          scale: factor on the gradients (global-norm clipping).
        """
        rows, slots = dict(state.rows), dict(state.slots)
        for i, p in pushed.items():
            key = layer_key(i)
            rows[key], slots[key] = self._apply_layer(rows[key], slots[key], p, lr, step, scale, self.layouts[i])
        return state.replace(rows=rows, slots=slots)

    def _apply_layer(self, table, slots, pushed: PushedGrads, lr, step, scale, layout: TableLayout):
        row_spec = PartitionSpec(self.shard_axes, None)
        slot_specs = {k: PartitionSpec(self.shard_axes, *([None] * (v.ndim - 1))) for k, v in slots.items()}
        opt = self.optimizer

        def local(table, slots, rows, grads, lr, step, scale):  # rows [M], grads [M, Dh]
            grads = grads * scale
            if opt.dense:  # every row, every step: the table-shaped gradient of dense Adam
                dense = jnp.zeros(table.shape, jnp.float32).at[rows].add(grads, mode="drop")
                return opt.update(table, slots, dense, lr, step)
            touched = self._host(rows)
            with self._where_table_lives():
                old = table[touched]  # [M, Dh]; empty slots clamp to a real row and are dropped below
                old_slots = {k: v[touched] for k, v in slots.items()}
            new, new_slots = opt.update(self._device(old), {k: self._device(v) for k, v in old_slots.items()},
                                        grads, lr, step)
            new, new_slots = self._host(new), {k: self._host(v) for k, v in new_slots.items()}
            with self._where_table_lives():
                table = table.at[touched].set(new, mode="drop")
                slots = {k: slots[k].at[touched].set(new_slots[k], mode="drop") for k in slots}
            return table, slots

        return jax.shard_map(
            local, mesh=self.mesh,
            in_specs=(row_spec, slot_specs, PartitionSpec(self.shard_axes), row_spec, PartitionSpec(),
                      PartitionSpec(), PartitionSpec()),
            out_specs=(row_spec, slot_specs))(table, slots, pushed.rows, pushed.grads, jnp.asarray(lr, jnp.float32),
                                              jnp.asarray(step), jnp.asarray(scale, jnp.float32))


def segment_sum(segments: jax.Array, values: jax.Array, num_segments: int) -> jax.Array:
    """Per-segment sums in a fixed order: by segment, then by position in the input.

    On one device this adds a row's gradients in the order the dense scatter-add of
    `jax.grad` does, so sparse SGD equals dense SGD bit for bit there. The order is
    fixed by the data, never by the hardware's arrival order; XLA:GPU may still run the
    sorted scatter-add with atomics: set `--xla_gpu_deterministic_ops=true` for bitwise
    reproducibility there.

    Args:
      segments: [M] segment of each row (>= num_segments: dropped).
      values: [M, Dh].

    Returns:
      [num_segments, Dh] sums (0 for empty segments).
    """
    order = jnp.argsort(segments, stable=True)
    return jax.ops.segment_sum(values[order], segments[order], num_segments=num_segments, indices_are_sorted=True)


def _sum_duplicates(rows: jax.Array, grads: jax.Array, empty: int) -> tuple[jax.Array, jax.Array]:
    """Sums the gradients of equal rows: one slot per distinct row, in row order.

    Args:
      rows: [M] row of each gradient; `empty` marks a slot with no row.
      grads: [M, Dh].

    Returns:
      ([M] distinct rows then `empty`, [M, Dh] their summed gradients, added in the
      order of the slots: source device, then place in its bucket).
    """
    m = rows.shape[0]
    s = jnp.sort(rows)
    first = (s < empty) & jnp.concatenate([jnp.ones((1,), bool), s[1:] != s[:-1]])
    distinct = jnp.full((m,), empty, rows.dtype).at[jnp.where(first, jnp.cumsum(first) - 1, m)].set(s, mode="drop")
    slot = jnp.searchsorted(distinct, rows)  # distinct is sorted, `empty` past the end
    slot = jnp.where(rows < empty, slot, m)
    return distinct, segment_sum(slot, grads, m)
