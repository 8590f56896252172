"""A hot-row cache for host-resident Engram tables, for decoding.

N-gram traffic is Zipfian: a few rows of each layer's table are addressed far more
often than the rest. `HotRows` keeps, per layer, the K rows addressed most often over a
calibration token stream (`count_rows`) in device memory; a lookup reads hits there
and asks the table engine (`Tables.lookup`, host or device placement) only for the
misses: their ids are passed as -1, which the engine neither fetches nor reads.

    counts = count_rows(hasher, calibration_ids, config)       # NumPy, on the host
    hot = HotRows.build(counts, rows, config, k=4096)          # [K] ids + [K, Dh] rows per layer
    memory = hot.lookup(tables, rows, hash_ids)                # == tables.lookup(rows, hash_ids)[0]

The engine's programs have static shapes: its host gather and copy have one slot per
id whether it is a hit or not, so in a compiled step the cache saves host reads of
distinct rows only where the engine de-duplicates (the rows it gathers are the unique
missed ids; padding slots read row 0). `host_rows_read` measures what a step needs
from host memory with and without the cache: the distinct missed rows.

Shapes: B batch, T time, H heads, K hot rows, Dh row width.
"""

from __future__ import annotations

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
    """

    ids: dict
    rows: dict

    @classmethod
    def build(cls, counts: Mapping[int, np.ndarray], table_rows: Mapping[str, jax.Array],
              config: EngramConfig, k: int) -> HotRows:
        """The top-k rows of every layer by `counts`, copied out of the tables.

        Raises:
          ValueError: k < 1, or k larger than a layer's table (one line).
        """
        if k < 1:
            raise ValueError(f"the hot-row count must be >= 1, got {k}")
        ids, rows = {}, {}
        for layer in config.layer_ids:
            size = config.table_rows(layer)
            if k > size:
                raise ValueError(f"the hot-row count {k:,} is larger than layer {layer}'s table of {size:,} rows")
            top = np.sort(np.argsort(-counts[layer], kind="stable")[:k]).astype(np.int32)  # [K] ascending
            table = np.asarray(table_rows[layer_key(layer)])  # host copy: a table is read once, here
            ids[layer_key(layer)] = jnp.asarray(top)
            rows[layer_key(layer)] = jnp.asarray(table[top])
        return cls(ids=ids, rows=rows)

    @property
    def size(self) -> int:
        return next(iter(self.ids.values())).shape[0]

    def lookup(self, tables, table_rows, hash_ids: Mapping[int, jax.Array], dtype=jnp.float32) -> dict:
        """The memory vectors `{layer: [B, T, H * Dh]}`: hits from this cache, misses
        through `tables` (which gets -1 for every hit). Equal to `tables.lookup`'s."""
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
        missed, _ = tables.lookup(table_rows, missed_ids, dtype)
        out = {}
        for layer, (hit, rows) in hits.items():
            b, t, h = hit.shape
            host = missed[layer].reshape(b, t, h, -1)  # [B, T, H, Dh]
            out[layer] = jnp.where(hit[..., None], rows.astype(dtype), host).reshape(b, t, -1)  # [B, T, H * Dh]
        return out


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
