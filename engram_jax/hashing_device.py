"""Multi-head N-gram hashing inside jit, bit-equal to `NgramHasher`, in 32-bit integers.

`NgramHasher.on_device()` returns a `DeviceHasher`: a pure, jittable callable for
generation (the newest token's ids at every decode step, no host round trip), for
models that hash raw tokens in-graph, and for checking the pipeline's ids on the device.

The reference arithmetic is int64 (hashing.py): products x * m of compressed ids
x < V' with odd multipliers m < 2**63 / V', XOR across the n-gram, and a remainder
modulo a prime p per head. JAX without `jax_enable_x64` has no 64-bit integers (and
TPUs emulate them), so every 64-bit value here is a pair of uint32 words (hi, lo):

- product: (x * m) mod 2**64 with x sign-extended (negative ids are padding markers
  that the reference hashes as int64, and its int64 products wrap mod 2**64). The
  32 x 32 -> 64-bit products are built from four 16 x 16-bit products (`_mul_hi`).
- XOR: word by word.
- remainder: with R = 2**32, u = hi R + lo = hi R^2 R^-1 + lo R R^-1 (mod p), so two
  Montgomery reductions (`_redc`) of hi * (R^2 mod p) and lo * (R mod p), both
  < p R, give hi R mod p and lo mod p; every intermediate stays below 2**32 for any
  odd p < 2**31. A mix with its top bit set is negative in the reference (only
  negative ids make one), and its floored remainder is (u - 2**64) mod p. The single
  even prime, 2 (a table size of 2), is read off the low bit.

Out-of-range raw ids cannot raise inside jit. A `DeviceHasher` therefore checks every
input it can see: the dtype always (int64 and uint32 ids raise TypeError, since JAX
without x64 would truncate them), and the values whenever they are concrete (eager
calls raise ValueError naming the id and its position). Under jit, an n-gram that
contains an id >= V gets the id -1 in every head of its order, never a valid row, and
`in_vocab(raw_ids)` gives the flag to assert on or log. One case is out of its reach:
an int64 NumPy array passed to the caller's own jitted function is cast to int32 by
JAX before the hasher sees it; pass int32 (the pipeline's ids fit it) or call the
hasher eagerly once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

_LOW16 = 0xFFFF
_WORD = 2**32
_INT32 = np.iinfo(np.int32)


def _mul_hi(a: jax.Array, b) -> jax.Array:
    """High word of the 64-bit product of uint32 a and b: four exact 16 x 16-bit products."""
    a0, a1 = a & _LOW16, a >> 16
    b0, b1 = b & _LOW16, b >> 16
    lh, hl = a0 * b1, a1 * b0  # each < 2**32
    mid = ((a0 * b0) >> 16) + (lh & _LOW16) + (hl & _LOW16)  # < 3 * 2**16: the carry into bit 32
    return a1 * b1 + (lh >> 16) + (hl >> 16) + (mid >> 16)


def _redc(t_hi: jax.Array, t_lo: jax.Array, p, p_neg_inv) -> jax.Array:
    """Montgomery reduction: t * 2**-32 mod p, in [0, 2p), for t = t_hi 2**32 + t_lo < p 2**32, odd p.

    m = t * (-1/p) mod 2**32 makes t + m p a multiple of 2**32 below 2 p 2**32; its low
    words sum to 0 or 2**32, so the carry into the high word is (t_lo != 0).
    """
    m = t_lo * p_neg_inv
    return t_hi + _mul_hi(m, p) + (t_lo != 0).astype(jnp.uint32)


def _below(x: jax.Array, p) -> jax.Array:
    """x mod p for x < 2p."""
    return jnp.where(x >= p, x - p, x)


@dataclasses.dataclass(frozen=True)
class _Primes:
    """Per-head constants of one order, [K] uint32 each (see `_remainder`)."""

    p: np.ndarray
    p_neg_inv: np.ndarray  # -1/p mod 2**32
    r1: np.ndarray  # 2**32 mod p
    r2: np.ndarray  # 2**64 mod p
    two: np.ndarray | None  # [K] bool where p == 2 (Montgomery needs an odd p), else None

    @classmethod
    def of(cls, primes) -> _Primes:
        odd = [p if p % 2 else 3 for p in primes]  # 3 stands in for 2; replaced at the end
        u32 = functools.partial(np.array, dtype=np.uint32)
        has_two = any(p == 2 for p in primes)
        return cls(p=u32(odd), p_neg_inv=u32([-pow(p, -1, _WORD) % _WORD for p in odd]),
                   r1=u32([_WORD % p for p in odd]), r2=u32([_WORD**2 % p for p in odd]),
                   two=np.array([p == 2 for p in primes]) if has_two else None)


def _remainder(hi: jax.Array, lo: jax.Array, c: _Primes) -> jax.Array:
    """The reference's int64 `mix % p` per head: words [...] -> uint32 [..., K] in [0, p)."""
    hi, lo = hi[..., None], lo[..., None]  # [..., 1] against the [K] constants
    high = _below(_redc(_mul_hi(hi, c.r2), hi * c.r2, c.p, c.p_neg_inv), c.p)  # hi 2**32 mod p
    low = _below(_redc(_mul_hi(lo, c.r1), lo * c.r1, c.p, c.p_neg_inv), c.p)  # lo mod p
    r = _below(high + low, c.p)
    # A negative int64 mix is u - 2**64: its floored remainder is (r - 2**64 mod p) mod p.
    r = jnp.where(hi >> 31 != 0, _below(r + (c.p - c.r2), c.p), r)
    if c.two is not None:
        r = jnp.where(c.two, lo & 1, r)  # 2**64 = 0 mod 2: the low bit, sign or not
    return r


def _times(x_lo: jax.Array, x_hi: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """(x * m) mod 2**64 as words (hi, lo), for x sign-extended into (x_hi, x_lo), m < 2**64."""
    m_lo, m_hi = np.uint32(m % _WORD), np.uint32(m // _WORD)
    hi = _mul_hi(x_lo, m_lo) + x_lo * m_hi + x_hi * m_lo
    return hi, x_lo * m_lo


@functools.partial(jax.tree_util.register_dataclass, data_fields=["lookup"],
                   meta_fields=["pad_id", "compressed_pad_id", "layer_ids", "multipliers", "head_sizes"])
@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: jax.jit(hasher) keys on it
class DeviceHasher:
    """`NgramHasher` as a pure, jittable function; make one with `NgramHasher.on_device()`.

    A pytree (the lookup is its one array), so it can be closed over by a jitted
    function or passed into one. Everything is elementwise over the batch: a batch
    sharded over devices stays sharded.

    Attributes:
      lookup: raw -> compressed id [V] int32 (a device array).
      pad_id: the raw pad id; `compressed_pad_id` is read before a row's start.
      layer_ids: the Engram layer ids, in the host hasher's order.
      multipliers: per layer, the N odd multipliers m_0..m_{N-1} (Python ints < 2**63).
      head_sizes: per layer, per order n = 2..N, the K primes (each < 2**31).
    """

    lookup: jax.Array
    pad_id: int
    compressed_pad_id: int
    layer_ids: tuple[int, ...]
    multipliers: tuple[tuple[int, ...], ...]
    head_sizes: tuple[tuple[tuple[int, ...], ...], ...]

    @classmethod
    def from_host(cls, hasher) -> DeviceHasher:
        """The device form of an `NgramHasher`; ValueError for sizes that need 64-bit ids."""
        if hasher.vocab_size > _INT32.max or hasher.num_compressed > _INT32.max:
            raise ValueError(f"a vocabulary of {hasher.vocab_size} raw / {hasher.num_compressed} compressed "
                             "ids does not fit the device hasher's int32 ids")
        heads = tuple(tuple(tuple(int(p) for p in order) for order in hasher.head_sizes[layer])
                      for layer in hasher.layer_ids)
        largest = max(p for layer in heads for order in layer for p in order)
        if largest > _INT32.max:
            raise ValueError(f"a head has {largest} rows, too many for the device hasher's int32 ids")
        return cls(lookup=jnp.asarray(hasher.lookup.astype(np.int32)), pad_id=hasher.pad_id,
                   compressed_pad_id=hasher.compressed_pad_id, layer_ids=tuple(hasher.layer_ids),
                   multipliers=tuple(tuple(int(m) for m in hasher.multipliers[layer])
                                     for layer in hasher.layer_ids),
                   head_sizes=heads)

    @property
    def vocab_size(self) -> int:
        """V, the number of raw ids the lookup covers."""
        return self.lookup.shape[0]

    @property
    def max_ngram_size(self) -> int:
        """N: orders 2..N are hashed."""
        return len(self.multipliers[0])

    @property
    def num_heads(self) -> int:
        """H = (N - 1) * K hash heads per layer."""
        return sum(len(order) for order in self.head_sizes[0])

    def __call__(self, raw_ids) -> dict[int, jax.Array]:
        """Raw ids [B, T] -> `{layer_id: hash ids int32 [B, T, H]}`, equal to `NgramHasher`.

        Args:
          raw_ids: int32 [B, T] (or a narrower integer type); negative ids are padding
            markers, hashed as the reference does. When concrete, an id >= V raises
            ValueError; under jit its n-grams get -1 (see the module docstring).

        Returns:
          `{layer_id: [B, T, H]}` int32, H = (N - 1) * K, heads ordered by n then k.
        """
        return _hash_sequence(self, self._checked("raw_ids", raw_ids, 2))

    def context(self, raw_ids) -> jax.Array:
        """The decoding context after raw ids [B, T] (T may be 0): int32 [B, N - 1].

        Its last N - 1 ids, left-filled with the raw pad id where the row is shorter,
        which is what the full function reads before a row's start.
        """
        raw_ids = self._checked("raw_ids", raw_ids, 2)
        lead = self.max_ngram_size - 1
        filled = jnp.concatenate([jnp.full((raw_ids.shape[0], lead), self.pad_id, jnp.int32), raw_ids], 1)
        return jax.lax.slice_in_dim(filled, filled.shape[1] - lead, filled.shape[1], axis=1)  # [B, N - 1]

    def step(self, context, token) -> tuple[dict[int, jax.Array], jax.Array]:
        """One decode step: the ids of the newest token from it and the N - 1 before it.

        Args:
          context: int32 [B, N - 1], raw ids of positions t - N + 1 .. t - 1 (oldest
            first), from `context` or the previous step.
          token: int32 [B], the raw id at position t.

        Returns:
          `({layer_id: [B, H]}, context)`: the ids equal the full function's at
          position t, and the context is the one for position t + 1.
        """
        context = self._checked("context", context, 2)
        token = self._checked("token", token, 1)
        if context.shape != (token.shape[0], self.max_ngram_size - 1):
            raise ValueError(f"context must be [batch, N - 1] = [{token.shape[0]}, {self.max_ngram_size - 1}], "
                             f"got {tuple(context.shape)}")
        return _hash_step(self, context, token)

    def in_vocab(self, raw_ids) -> jax.Array:
        """bool []: whether every id is below V (negative padding markers count as in)."""
        return jnp.all(jnp.asarray(raw_ids) < self.vocab_size)

    def _checked(self, name: str, ids, ndim: int):
        """ids as int32 of rank ndim; names int64 and out-of-range ids it can see."""
        if not hasattr(ids, "dtype"):
            ids = np.asarray(ids, np.int32)  # a Python list; NumPy raises on values past int32
        dtype = np.dtype(ids.dtype)
        if not np.issubdtype(dtype, np.integer):
            raise TypeError(f"{name} must hold integers, got {dtype}")
        if np.iinfo(dtype).max > _INT32.max or np.iinfo(dtype).min < _INT32.min:
            raise TypeError(f"{name} are {dtype}, but the device hasher takes int32 ids (JAX without x64 "
                            f"truncates {dtype} silently): check the range on the host and cast to int32")
        if ids.ndim != ndim:
            raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(ids.shape)}")
        if not isinstance(ids, jax.core.Tracer):  # concrete: the values can be checked here
            values = np.asarray(ids)
            if values.size and values.max() >= self.vocab_size:
                where = tuple(int(i) for i in np.argwhere(values >= self.vocab_size)[0])
                raise ValueError(f"token id {values[where]} at {name}{list(where)} is outside the vocabulary "
                                 f"(ids 0..{self.vocab_size - 1}; negative ids are padding markers)")
        return ids if dtype == np.int32 else jnp.asarray(ids, jnp.int32)

    def _compress(self, raw: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Raw ids -> (compressed ids int32, out-of-vocabulary mask), both raw.shape."""
        # out_sharding: with Explicit mesh axes a gather must be told to keep the ids' sharding.
        got = self.lookup.at[jnp.clip(raw, 0, self.vocab_size - 1)].get(
            mode="promise_in_bounds", out_sharding=jax.typeof(raw).sharding)
        return jnp.where(raw >= 0, got, raw), raw >= self.vocab_size

    def _hash(self, xs: list[jax.Array], bad: list[jax.Array]) -> dict[int, jax.Array]:
        """Compressed ids xs[k] at positions t - k (k < N), any shape S -> `{layer: [*S, H]}`."""
        x_lo = [jax.lax.bitcast_convert_type(x, jnp.uint32) for x in xs]
        x_hi = [jax.lax.bitcast_convert_type(x >> 31, jnp.uint32) for x in xs]  # sign extension
        spoiled = [bad[0]]  # [k]: an id >= V among positions t - k .. t
        for b in bad[1:]:
            spoiled.append(spoiled[-1] | b)
        out = {}
        for layer_id, mults, orders in zip(self.layer_ids, self.multipliers, self.head_sizes):
            cols = []
            hi, lo = _times(x_lo[0], x_hi[0], mults[0])
            for k in range(1, len(mults)):  # order n = k + 1
                p_hi, p_lo = _times(x_lo[k], x_hi[k], mults[k])
                hi, lo = hi ^ p_hi, lo ^ p_lo
                r = jax.lax.bitcast_convert_type(_remainder(hi, lo, _Primes.of(orders[k - 1])), jnp.int32)
                cols.append(jnp.where(spoiled[k][..., None], -1, r))  # [*S, K]
            out[layer_id] = jnp.concatenate(cols, axis=-1)  # [*S, H]
        return out


@jax.jit
def _hash_sequence(hasher: DeviceHasher, raw: jax.Array) -> dict[int, jax.Array]:
    b, t = raw.shape
    lead = hasher.max_ngram_size - 1
    x, bad = hasher._compress(raw)
    x = jnp.concatenate([jnp.full((b, lead), hasher.compressed_pad_id, jnp.int32), x], 1)  # [B, T + N - 1]
    bad = jnp.concatenate([jnp.zeros((b, lead), bool), bad], 1)
    shifts = range(hasher.max_ngram_size)  # [B, T] slices at t - k
    xs = [jax.lax.slice_in_dim(x, lead - k, lead - k + t, axis=1) for k in shifts]
    return hasher._hash(xs, [jax.lax.slice_in_dim(bad, lead - k, lead - k + t, axis=1) for k in shifts])


@jax.jit
def _hash_step(hasher: DeviceHasher, context: jax.Array, token: jax.Array):
    window = jnp.concatenate([context, token[:, None]], 1)  # [B, N]: positions t - N + 1 .. t
    x, bad = hasher._compress(window)
    n = hasher.max_ngram_size
    column = lambda a, k: jax.lax.index_in_dim(a, n - 1 - k, axis=1, keepdims=False)  # [B]: position t - k
    ids = hasher._hash([column(x, k) for k in range(n)], [column(bad, k) for k in range(n)])  # [B, H]
    return ids, jax.lax.slice_in_dim(window, 1, n, axis=1)
