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
is at most U / S; ids beyond C are dropped (their head's part of the memory vector is
zero and their row is not updated) and counted, never silently: `engram_dropped/<layer>`
counts the token positions affected. Which ids a full bucket drops changes with a salt
(the step), so the same rows do not starve on every overflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
# Initial rows are drawn in blocks of this many rows, each from its own NumPy stream
# keyed by (seed, layer, block): a shard draws only the blocks it overlaps, and the rows
# do not depend on how the table is split. 4096 rows keep a block's draw ~1 MB at Dh=64.
_INIT_BLOCK_ROWS = 4096


def head_offsets(head_sizes: Sequence[int]) -> np.ndarray:
    """First row of each head, [H]: the exclusive prefix sum of the head sizes."""
    return np.concatenate([[0], np.cumsum(head_sizes)[:-1]]).astype(np.int64)


def layer_key(layer_id: int) -> str:
    """The key of a layer's table in `TableState` (Orbax trees need string keys)."""
    return f"layer_{layer_id}"


def _seed_words(rng: jax.Array) -> tuple[int, ...]:
    """The words of a (typed or raw) PRNG key, to seed NumPy streams with."""
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    return tuple(int(w) for w in np.asarray(data).ravel())


def init_rows(seed: Sequence[int], layer_id: int, start: int, stop: int, layout: "TableLayout",
              std: float) -> np.ndarray:
    """Rows [start, stop) of a layer's initial table, float32 [stop - start, Dh].

    Row r is drawn by the stream of block r // _INIT_BLOCK_ROWS (NumPy's default bit
    generator keyed by (seed, layer, block), standard normals in row-major order), times
    `std`; padding rows (r >= V) are 0. So any range is computed alone, on the host.
    """
    out = np.zeros((stop - start, layout.dim), np.float32)
    last = min(stop, layout.rows)
    for block in range(start // _INIT_BLOCK_ROWS, -(-last // _INIT_BLOCK_ROWS) if last > start else 0):
        first = block * _INIT_BLOCK_ROWS
        lo, hi = max(first, start), min(first + _INIT_BLOCK_ROWS, last)
        stream = np.random.default_rng([*seed, layer_id, block])
        drawn = stream.standard_normal((hi - first, layout.dim), np.float32)  # a stream's prefix: rows first..hi
        out[lo - start:hi - start] = std * drawn[lo - first:]
    return out


def _place_by_shard(shape: tuple[int, ...], where: NamedSharding, make) -> jax.Array:
    """A global array whose addressable shards are made by `make(index)` on the host and
    copied to their device (or host memory) one at a time, so that host memory holds one
    shard beyond the placed ones (`jax.make_array_from_callback` makes all first)."""
    shards = []
    for device, index in where.addressable_devices_indices_map(shape).items():
        one = jax.sharding.SingleDeviceSharding(device, memory_kind=where.memory_kind)
        shards.append(jax.block_until_ready(jax.device_put(make(index), one)))
    return jax.make_array_from_single_device_arrays(shape, where, shards)


def _zeros(shape, dtype, index) -> np.ndarray:
    """The zero block of a `shape` array at `index` (a `make_array_from_callback` source)."""
    return np.zeros([len(range(*sl.indices(n))) for sl, n in zip(index, shape)], dtype)


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

    def create(self, rng: jax.Array) -> TableState:
        """Fresh tables, N(0, table_init_std) rows, zero padding rows and zero slots,
        made shard by shard on the host and put where they live.

        No device program makes them: each addressable shard is drawn with NumPy
        (`init_rows`) and copied to its device or pinned host memory, so creating a
        table larger than device memory (the reason for `placement="host"`) needs no
        device temporaries at all, and host memory holds one shard at a time. The rows
        are a function of the key and the row alone: the same on any mesh, device
        count and placement. Not jittable (the key must be concrete).

        Args:
          rng: a JAX PRNG key (typed or raw uint32).
        """
        seed = _seed_words(rng)
        rows, slots = {}, {}
        for i, layout in self.layouts.items():
            shape = (layout.padded_rows, layout.dim)

            def draw(index, layer=i, layout=layout):
                start, stop, _ = index[0].indices(layout.padded_rows)
                return init_rows(seed, layer, start, stop, layout, self.config.table_init_std).astype(self.row_dtype)

            rows[layer_key(i)] = _place_by_shard(shape, self._sharding(2), draw)
            slots[layer_key(i)] = {
                name: _place_by_shard(s, self._sharding(len(s)), functools.partial(_zeros, s, d))
                for name, (s, d) in self.optimizer.slot_shapes(layout.padded_rows, layout.dim,
                                                               self.row_dtype).items()}
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

    def _plan(self, ids: jax.Array, layout: TableLayout, capacity: int, salt: jax.Array):
        """Deduplicates a device's ids and places each unique id in its owner's bucket.

        Places in a bucket go by a salted hash of the id, not by the id: when a bucket
        overflows, the ids it drops are spread over the owner's rows, and a new `salt`
        (the step) drops others next time, instead of starving the highest rows of every
        shard on every overflow. Every device uses the same salt, and the lookup and the
        push of a step use the same plan.

        Args:
          ids: [U] global rows, -1 for padding.
          salt: int32 scalar, the permutation of this step.

        Returns:
          (inverse [U]: slot of each id in the unique list (U: none),
           owner [U], position [U]: bucket and place of each unique id (position >= C:
           dropped), unique [U] sorted unique ids (-1 past the end)).
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
        # Within each owner (unique ids are sorted, so its ids are contiguous), rank by the
        # salted hash: sort by (owner, priority), place = sorted index - owner's start.
        by_priority = jnp.lexsort((_mix(unique, salt), owner))  # [U]
        start = jnp.searchsorted(owner, jnp.arange(layout.shards), side="left")
        ranked = jnp.arange(u) - start[jnp.minimum(owner[by_priority], layout.shards - 1)]
        position = jnp.zeros((u,), ranked.dtype).at[by_priority].set(ranked)
        position = jnp.where(present, position, capacity)
        return inverse, owner, position, unique

    def _shard_index(self) -> jax.Array:
        return jax.lax.axis_index(self.shard_axes) if self.shard_axes else jnp.int32(0)

    def _to_owners(self, x: jax.Array) -> jax.Array:
        """[S, C, ...] buckets by destination -> [S, C, ...] buckets by source.

        16-bit floats travel as their bits (uint16): XLA:CPU widens a bfloat16 all-to-all
        to float32, which would send twice the bytes; an integer exchange is sent as is
        by every backend."""
        if x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating):
            bits = jax.lax.all_to_all(jax.lax.bitcast_convert_type(x, jnp.uint16), self.shard_axes, 0, 0, tiled=True)
            return jax.lax.bitcast_convert_type(bits, x.dtype)
        return jax.lax.all_to_all(x, self.shard_axes, 0, 0, tiled=True)

    def _host(self, x):
        return jax.device_put(x, jax.memory.Space.Host) if self.host else x

    def _device(self, x):
        return jax.device_put(x, jax.memory.Space.Device) if self.host else x

    def _where_table_lives(self):
        return compute_on("device_host") if self.host else contextlib.nullcontext()

    # ------------------------------------------------------------------ lookup

    def lookup(self, rows: Mapping[str, jax.Array], hash_ids: Mapping[int, jax.Array],
               dtype=jnp.float32, salt: jax.Array | int = 0,
               capacity: int | None = None) -> tuple[dict[int, jax.Array], dict[str, jax.Array]]:
        """The memory vectors e_t of every Engram layer.

        Args:
          rows: `TableState.rows`.
          hash_ids: `{layer: [B, T, H]}` per-head ids from `NgramHasher`.
          dtype: dtype of the returned vectors.
          salt: which ids a full bucket drops (`_plan`); the train step passes its step,
            and `push` must get the same.
          capacity: C, ids per destination bucket, overriding `lookup_capacity_factor`'s
            (at most the ids per device). Each device reads shards x C rows per layer
            whatever the ids, so a small C reads few rows and drops the rest (counted):
            `hot_rows.HotRows` reads its misses this way.

        Returns:
          (`{layer: [B, T, H * Dh]}`, counters summed over devices: per layer
          `"engram_dropped/<layer>"` token positions whose memory vector lost at least
          one head to a full bucket (that head's part is zero), `"engram_dropped_ids/<layer>"`
          the distinct ids dropped per device, and `"engram_unique/<layer>"` unique ids
          fetched).
        """
        memory, stats = {}, {}
        salt = jnp.asarray(salt, jnp.int32)
        for i, ids in self.global_ids(hash_ids).items():
            layout, table = self.layouts[i], rows[layer_key(i)]
            flat, n = self._flat(ids, -1)  # [n']
            got, lost, dropped_ids, unique = self._lookup_layer(table, flat, layout, salt, capacity)
            b, t, h = ids.shape
            memory[i] = got[:n].reshape(b, t, h * layout.dim).astype(dtype)  # [B, T, H * Dh]
            positions = jnp.sum(jnp.any(lost[:n].reshape(b, t, h), axis=-1))  # [B, T] any head lost
            stats[f"engram_dropped/{i}"] = positions.astype(jnp.int32)
            stats[f"engram_dropped_ids/{i}"], stats[f"engram_unique/{i}"] = dropped_ids, unique
        return memory, stats

    def rows_read(self, ids: int, capacity: int | None = None) -> int:
        """Row slots one layer's lookup of `ids` id slots gathers from its table, summed
        over devices: every device gathers shards x C rows (its buckets' static shape),
        whatever the ids' values, so this is also what a host table's lookup copies."""
        c = self._bucket_capacity(-(-ids // self.devices), capacity)
        return self.devices * next(iter(self.layouts.values())).shards * c

    def _bucket_capacity(self, local_ids: int, capacity: int | None) -> int:
        """C for a device with `local_ids` id slots: `capacity` (clamped to [1, local_ids])
        when given, else the engine's (`capacity`)."""
        return self.capacity(local_ids) if capacity is None else max(1, min(capacity, local_ids))

    def _lookup_layer(self, table, flat_ids, layout: TableLayout, salt, capacity: int | None = None):
        everywhere = PartitionSpec(self.axes)
        capacity = self._bucket_capacity(flat_ids.shape[0] // self.devices, capacity)

        def local(table, ids, salt):  # table [R, Dh] (this shard), ids [U] (this device)
            inverse, owner, position, unique = self._plan(ids, layout, capacity, salt)
            send = jnp.full((layout.shards, capacity), -1, jnp.int32).at[owner, position].set(unique, mode="drop")
            asked = self._to_owners(send)  # [S, C] ids that each device asks of this shard
            local_row = asked - self._shard_index() * layout.rows_per_shard
            wanted = asked >= 0
            index = self._host(jnp.where(wanted, local_row, 0))
            with self._where_table_lives():
                found = table[index]  # [S, C, Dh]
            # Rows travel in the table's dtype (bfloat16 rows: half the bytes of float32).
            found = jnp.where(wanted[..., None], self._device(found), jnp.zeros((), found.dtype))
            back = self._to_owners(found)  # [S, C, Dh] rows of this device's buckets
            rows_unique = back.at[owner, position].get(mode="fill", fill_value=0)  # [U, Dh]
            out = rows_unique.at[inverse].get(mode="fill", fill_value=0)  # [U, Dh]
            dropped = (unique >= 0) & (position >= capacity)  # [U] per unique id
            lost = dropped.at[inverse].get(mode="fill", fill_value=False)  # [U] per id slot
            count = jnp.sum(unique >= 0)
            return (out, lost, jax.lax.psum(jnp.sum(dropped), self.axes), jax.lax.psum(count, self.axes))

        return jax.shard_map(local, mesh=self.mesh,
                             in_specs=(PartitionSpec(self.shard_axes, None), everywhere, PartitionSpec()),
                             out_specs=(PartitionSpec(self.axes, None), everywhere, PartitionSpec(),
                                        PartitionSpec()))(table, flat_ids, salt)

    # ------------------------------------------------------------------ gradients

    def push(self, hash_ids: Mapping[int, jax.Array], grads: Mapping[int, jax.Array],
             salt: jax.Array | int = 0) -> dict[int, PushedGrads]:
        """Sends the gradients of the memory vectors to the rows' owners.

        Args:
          hash_ids: the `{layer: [B, T, H]}` ids of the lookup.
          grads: `{layer: [B, T, H * Dh]}` gradients of the memory vectors.
          salt: the lookup's (the same ids are dropped, and get no update).

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
            out[i] = self._push_layer(flat_ids, flat_grads, layout, jnp.asarray(salt, jnp.int32))
        return out

    def _push_layer(self, flat_ids, flat_grads, layout: TableLayout, salt) -> PushedGrads:
        everywhere = PartitionSpec(self.axes)
        capacity = self.capacity(flat_ids.shape[0] // self.devices)

        def local(ids, grads, salt):  # ids [U], grads [U, Dh]
            u = ids.shape[0]
            inverse, owner, position, unique = self._plan(ids, layout, capacity, salt)
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
        rows, summed = jax.shard_map(local, mesh=self.mesh,
                                     in_specs=(everywhere, PartitionSpec(self.axes, None), PartitionSpec()),
                                     out_specs=(PartitionSpec(self.shard_axes), PartitionSpec(self.shard_axes, None)),
                                     check_vma=not self.replica_axes)(flat_ids, flat_grads, salt)
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


def _mix(ids: jax.Array, salt: jax.Array) -> jax.Array:
    """A salted bijective hash of int32 ids (the 32-bit finalizer of MurmurHash3), as a
    sort key that orders ids pseudo-randomly, differently for each salt."""
    x = jax.lax.bitcast_convert_type(ids, jnp.uint32) ^ (jax.lax.bitcast_convert_type(salt, jnp.uint32)
                                                         * jnp.uint32(0x9E3779B9))
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


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
