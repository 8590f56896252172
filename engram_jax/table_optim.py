"""Row optimizers of the Engram tables: each updates only the rows a step touched.

The paper trains the tables with Adam at 5x the backbone's learning rate and no
weight decay (section 4.1). A table row is read by a few tokens per step, so a dense
optimizer would spend most of its time (and two table-sized moments) on rows with a
zero gradient. The algorithms (`OptimConfig.table_algorithm`):

- `lazy_adam` (default): Adam on the touched rows only. Each row keeps its moments m, v
  and a count c of the updates it received; a touched row does
      c += 1;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
      row -= lr (m / (1 - b1^c)) / (sqrt(v / (1 - b2^c)) + eps) + lr wd row
  and an untouched row, its m, v and c stay bit-identical. Dense Adam differs in two
  ways: it decays m and v of untouched rows (g = 0) every step, so a row that is read
  again after k idle steps still moves along its old momentum m b1^k in between; and
  its bias correction uses the global step rather than the row's own count. Lazy Adam
  equals dense Adam when every row is touched every step.
- `adagrad`: row-wise Adagrad, one float32 accumulator per row (TPU-embedding and
  TorchRec's convention): a += mean(g^2 over the row); row -= lr g / (sqrt(a) + eps).
  Its state is 1 / Dh of the table, against Adam's 2x.
- `sgd`: row -= lr g (with decoupled weight decay on touched rows); no state. Sparse
  SGD equals dense SGD exactly, which makes it the check of the routing.
- `adam`: dense Adam over every row each step (a table-shaped gradient), kept for
  parity checks and small tables.

Rows may be stored in bfloat16 (`EngramConfig.table_dtype`), with the moments in the
same dtype; the update math always runs in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ALGORITHMS = ("lazy_adam", "adagrad", "sgd", "adam")


@dataclasses.dataclass(frozen=True)
class RowOptimizer:
    """One row optimizer with its hyperparameters.

    Attributes:
      algorithm: one of ALGORITHMS.
      b1, b2, eps: Adam's moment decays and epsilon (eps is also Adagrad's).
      weight_decay: decoupled weight decay, applied to the rows updated.
    """

    algorithm: str = "lazy_adam"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown table algorithm {self.algorithm!r}; known: {', '.join(ALGORITHMS)}")

    @property
    def dense(self) -> bool:
        """Whether it updates every row each step (from a table-shaped gradient)."""
        return self.algorithm == "adam"

    def slot_shapes(self, rows: int, dim: int, dtype) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
        """`{slot: (shape, dtype)}` of the per-row state of a [rows, dim] table."""
        if self.algorithm in ("lazy_adam", "adam"):
            slots = {"m": ((rows, dim), dtype), "v": ((rows, dim), dtype)}
            if self.algorithm == "lazy_adam":
                slots["count"] = ((rows,), jnp.int32)
            return slots
        if self.algorithm == "adagrad":
            return {"accumulator": ((rows,), jnp.float32)}
        return {}

    def update(self, rows: jax.Array, slots: dict, grads: jax.Array, lr: jax.Array,
               step: jax.Array) -> tuple[jax.Array, dict]:
        """New rows and slots for the given rows.

        Args:
          rows: [M, Dh] rows (for `adam`, the whole shard) in their storage dtype.
          slots: the same rows of every slot.
          grads: [M, Dh] float32 gradients, duplicates summed.
          lr: learning rate; step: updates applied before this one (dense Adam only).

        Returns:
          (rows, slots) in their storage dtypes.
        """
        r = rows.astype(jnp.float32)
        if self.algorithm == "sgd":
            return self._step(r, grads, lr).astype(rows.dtype), slots
        if self.algorithm == "adagrad":
            acc = slots["accumulator"] + jnp.mean(grads**2, axis=-1)  # [M]
            new = self._step(r, grads / (jnp.sqrt(acc)[:, None] + self.eps), lr)
            return new.astype(rows.dtype), {"accumulator": acc}
        if self.algorithm == "lazy_adam":
            count = slots["count"] + 1  # [M]
            c = count.astype(jnp.float32)[:, None]
        else:
            count, c = None, (step + 1).astype(jnp.float32)
        m = self.b1 * slots["m"].astype(jnp.float32) + (1 - self.b1) * grads
        v = self.b2 * slots["v"].astype(jnp.float32) + (1 - self.b2) * grads**2
        m_hat, v_hat = m / (1 - self.b1**c), v / (1 - self.b2**c)
        new = self._step(r, m_hat / (jnp.sqrt(v_hat) + self.eps), lr)
        out = {"m": m.astype(slots["m"].dtype), "v": v.astype(slots["v"].dtype)}
        if count is not None:
            out["count"] = count
        return new.astype(rows.dtype), out

    def _step(self, rows: jax.Array, direction: jax.Array, lr: jax.Array) -> jax.Array:
        """rows - lr (direction + wd rows); without decay exactly rows - lr direction."""
        if self.weight_decay:
            direction = direction + self.weight_decay * rows
        return rows - lr * direction
