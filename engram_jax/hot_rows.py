"""A hot-row cache for host-resident Engram tables, for decoding.

N-gram traffic is Zipfian: a few rows of each layer's table are addressed far more
often than the rest. `HotRows` keeps, per layer, the K rows addressed most often over a
calibration token stream (`count_rows`) in device memory; a lookup reads hits there
and asks the table engine (`Tables.lookup`, host or device placement) only for the
misses: their ids are passed as -1, which the engine neither fetches nor reads.

    counts = count_rows(hasher, calibration_ids, config)       # NumPy, on the host
    hot = HotRows.build(counts, rows, config, k=4096)          # [K] ids + [K, Dh] rows per layer
    memory, reads = hot.lookup(tables, rows, hash_ids)         # memory == tables.lookup(rows, hash_ids)[0]

The engine's programs have static shapes: a lookup gathers shards x C rows per device
whatever the ids (`Tables.rows_read`). So the misses are read with a small bucket, C
sized for the share of a step's ids expected to miss (`miss_share`, by default from
the calibration counts) with room to spare; a step whose misses do not fit (the engine
counts the ids it would drop) reads them again with full buckets (`lax.cond`, so only
such a step pays twice). What a step gathers from the table, and whether it fell back,
come back with the memory vectors: a compiled step's host reads fall with the hit rate.

Shapes: B batch, T time, H heads, K hot rows, Dh row width.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.engram import EngramConfig
from engram_jax.table import head_offsets, layer_key


def global_rows(config: EngramConfig, layer: int, hash_ids: np.ndarray) -> np.ndarray:
    """Per-head ids [..., H] -> the layer table's global rows [..., H] (NumPy)."""
    return hash_ids.astype(np.int64) + head_offsets(config.head_sizes(layer))


def count_rows(hasher, token_ids: Iterable[np.ndarray], config: EngramConfig) -> dict[int, np.ndarray]:
    """How often each row of each layer is addressed over a token stream.

    Args:
      hasher: the run's `NgramHasher`.
      token_ids: chunks of raw ids, each [T] or [B, T] (hashed as rows of their own).
      config: the Engram config.

    Returns:
      `{layer: counts [V] int64}`.
    """
    counts = {layer: np.zeros(config.table_rows(layer), np.int64) for layer in config.layer_ids}
    for chunk in token_ids:
        chunk = np.asarray(chunk)
        chunk = chunk[None] if chunk.ndim == 1 else chunk
        for layer, ids in hasher(chunk).items():
            counts[layer] += np.bincount(global_rows(config, layer, ids).ravel(), minlength=counts[layer].size)
    return counts


@flax.struct.dataclass
class HotRows:
    """The K most addressed rows of each layer, in device memory.

    Attributes:
      ids: `{layer_key: [K] int32}` global rows, ascending.
      rows: `{layer_key: [K, Dh]}` their values, in the table's dtype.
      miss_share: the share of a lookup's ids expected to miss (static). The table read
        has room for m = miss_share x ids per device / shards misses per bucket plus
        slack for a step that misses more (C = m + 3 sqrt(m) + 2); 1 reads as many rows
        as the ids, as the engine alone does.
    """

    ids: dict
    rows: dict
    miss_share: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def build(cls, counts: Mapping[int, np.ndarray], table_rows: Mapping[str, jax.Array],
              config: EngramConfig, k: int, miss_share: float | None = None) -> HotRows:
        """The top-k rows of every layer by `counts`, copied out of the tables.

        Args:
          miss_share: see the attribute; None: 1.25 x the share of the counted reads the
            top-k rows miss (the layer that misses most), at most 1.

        Raises:
          ValueError: k < 1, k larger than a layer's table, or miss_share outside (0, 1]
            (one line).
        """
        if k < 1:
            raise ValueError(f"the hot-row count must be >= 1, got {k}")
        if miss_share is not None and not 0 < miss_share <= 1:
            raise ValueError(f"miss_share must be in (0, 1], got {miss_share}")
        ids, rows, served = {}, {}, []
        for layer in config.layer_ids:
            size = config.table_rows(layer)
            if k > size:
                raise ValueError(f"the hot-row count {k:,} is larger than layer {layer}'s table of {size:,} rows")
            top = np.sort(np.argsort(-counts[layer], kind="stable")[:k]).astype(np.int32)  # [K] ascending
            table = np.asarray(table_rows[layer_key(layer)])  # host copy: a table is read once, here
            ids[layer_key(layer)] = jnp.asarray(top)
            rows[layer_key(layer)] = jnp.asarray(table[top])
            served.append(counts[layer][top].sum() / max(1, counts[layer].sum()))
        if miss_share is None:
            miss_share = float(min(1.0, 1.25 * (1 - min(served))))
        return cls(ids=ids, rows=rows, miss_share=max(miss_share, 1e-6))

    @property
    def size(self) -> int:
        return next(iter(self.ids.values())).shape[0]

    def capacity(self, tables, ids: int) -> int:
        """C for a lookup of `ids` id slots (per layer) by `tables`."""
        local = -(-ids // tables.devices)
        expected = self.miss_share * local / next(iter(tables.layouts.values())).shards  # misses per bucket
        return min(local, math.ceil(expected + 3 * math.sqrt(expected) + 2))

    def lookup(self, tables, table_rows, hash_ids: Mapping[int, jax.Array],
               dtype=jnp.float32) -> tuple[dict, dict]:
        """The memory vectors `{layer: [B, T, H * Dh]}`, equal to `tables.lookup`'s: hits
        from this cache, misses through `tables` (which gets -1 for every hit).

        Returns:
          (memory, reads): reads `{"table_rows": int32, "fallback": int32}`: the row slots
          gathered from the tables (over layers and devices) and 1 if the misses did not
          fit and were read again with full buckets.
        """
        hits, missed_ids = {}, {}
        for layer, ids in hash_ids.items():
            chex.assert_rank(ids, 3)
            key = layer_key(layer)
            offsets = jnp.asarray(head_offsets(tables.config.head_sizes(layer)), jnp.int32)
            wanted = jnp.where(ids >= 0, ids.astype(jnp.int32) + offsets, -1)  # [B, T, H] global rows
            slot = jnp.clip(jnp.searchsorted(self.ids[key], wanted), 0, self.size - 1)  # [B, T, H]
            hit = (self.ids[key][slot] == wanted) & (wanted >= 0)
            hits[layer] = (hit, self.rows[key][slot])  # [B, T, H], [B, T, H, Dh]
            missed_ids[layer] = jnp.where(hit, -1, ids)
        slots = next(iter(hash_ids.values())).size  # ids per layer (every layer has B x T x H)
        capacity = self.capacity(tables, slots)
        full, small = tables.rows_read(slots), tables.rows_read(slots, capacity)  # per layer
        if small >= full:  # no smaller than the engine's own read
            missed, _ = tables.lookup(table_rows, missed_ids, dtype)
            over, read = jnp.bool_(False), full
        else:
            missed, stats = tables.lookup(table_rows, missed_ids, dtype, capacity=capacity)
            over = sum(stats[f"engram_dropped_ids/{layer}"] for layer in hash_ids) > 0
            missed = jax.lax.cond(over, lambda: tables.lookup(table_rows, missed_ids, dtype)[0], lambda: missed)
            read = small + jnp.where(over, full, 0)
        read = len(hash_ids) * read
        out = {}
        for layer, (hit, rows) in hits.items():
            b, t, h = hit.shape
            host = missed[layer].reshape(b, t, h, -1)  # [B, T, H, Dh]
            out[layer] = jnp.where(hit[..., None], rows.astype(dtype), host).reshape(b, t, -1)  # [B, T, H * Dh]
        return out, {"table_rows": jnp.asarray(read, jnp.int32), "fallback": over.astype(jnp.int32)}


def hit_rate(counts_eval: Mapping[int, np.ndarray], counts_calibration: Mapping[int, np.ndarray],
             k: int) -> dict[int, float]:
    """Per layer, the share of an evaluation stream's row reads that the top-k rows of the
    calibration stream would serve."""
    out = {}
    for layer, calib in counts_calibration.items():
        top = np.argsort(-calib, kind="stable")[:k]
        out[layer] = float(counts_eval[layer][top].sum() / counts_eval[layer].sum())
    return out


def host_rows_read(hasher, tokens: np.ndarray, config: EngramConfig, hot_ids: Mapping[int, np.ndarray] | None,
                   batch: int) -> dict[int, float]:
    """Distinct rows per generated token a decode step reads from host memory, per layer.

    Decoding `batch` sequences, step t reads the rows of every sequence's token t; hits
    of `hot_ids` (global rows; None: no cache) are not read, duplicates within a step are
    read once.

    Args:
      tokens: [batch, T] raw ids of the sequences being generated.
    """
    out = {}
    for layer, ids in hasher(tokens).items():  # [B, T, H]
        rows = global_rows(config, layer, ids)
        if hot_ids is not None:
            rows = np.where(np.isin(rows, hot_ids[layer]), -1, rows)
        distinct = sum(np.unique(rows[:, t][rows[:, t] >= 0]).size for t in range(rows.shape[1]))
        out[layer] = distinct / rows[:, :].shape[0] / rows.shape[1]
    return out
