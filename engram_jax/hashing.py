"""Multi-head N-gram hashing (paper eq. 1; reference section 2).

Hash ids depend only on the tokens, so they are computed on the host in NumPy (in the
input pipeline, paper section 2.5) and reach the device with the batch. Where they are
needed inside jit (decoding, in-graph hashing), `NgramHasher.on_device()` gives the same
ids in 32-bit integer arithmetic (`engram_jax.hashing_device`).

For layer L, order n and head j, with compressed ids x and odd int64 multipliers m:

    mix_n[t]  = (x[t] * m_0) XOR (x[t-1] * m_1) XOR ... XOR (x[t-n+1] * m_{n-1})
    z[t, n, j] = mix_n[t] mod p_{L, n, j}

where positions before the start of a row read the compressed pad id, and every head
has its own prime table size p. All products stay below 2**63, so int64 is exact.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import math
import sys
import threading
import weakref
from collections.abc import Sequence

import numpy as np

from engram_jax import hashing_device

# Reference section 2: the generator for layer L is seeded with seed + 10007 * L.
LAYER_SEED_STRIDE = 10007
# Tokens per tile of the hashing loop. Measured on a 2-core EPYC: 8k-32k tokens keep the
# temporaries in L2 and amortise NumPy's per-call overhead; 4k is 1.5x slower.
_TILE_TOKENS = 16384
# Two int32 hash ids are written per int64 store (see `_hash_tile`), which needs a
# little-endian host and remainders below 2**31.
_PACKED_OK = sys.byteorder == "little"
_INT32_LIMIT = 2**31

_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin; exact for every n < 3.3e24 (bases: first 12 primes)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(start: int, exclude: set[int] | frozenset[int] = frozenset()) -> int:
    """The smallest prime strictly greater than `start` that is not in `exclude`."""
    candidate = start + 1
    while not (is_prime(candidate) and candidate not in exclude):
        candidate += 1
    return candidate


@functools.lru_cache(maxsize=128)
def head_primes(
    table_sizes: tuple[int, ...], heads_per_ngram: int, layer_ids: tuple[int, ...]
) -> dict[int, tuple[tuple[int, ...], ...]]:
    """Prime table size of every hash head: `{layer_id: ((p_{2,0}, ...), (p_{3,0}, ...))}`.

    One set of used primes spans all layers, so no prime repeats anywhere. For each
    layer (in the given order) and order n, the search starts at `table_sizes[n-2] - 1`
    and each head takes the next unused prime above the previous head's.
    """
    seen: set[int] = set()
    result = {}
    for layer_id in layer_ids:
        orders = []
        for base in table_sizes:
            start, heads = base - 1, []
            for _ in range(heads_per_ngram):
                start = next_prime(start, seen)
                seen.add(start)
                heads.append(start)
            orders.append(tuple(heads))
        result[layer_id] = tuple(orders)
    return result


def layer_multipliers(
    num_compressed: int, max_ngram_size: int, layer_ids: Sequence[int], seed: int
) -> dict[int, np.ndarray]:
    """Odd int64 multipliers `m_0..m_{N-1}` per layer, bounded so that x * m < 2**63."""
    bound = max(1, (np.iinfo(np.int64).max // num_compressed) // 2)
    result = {}
    for layer_id in layer_ids:
        rng = np.random.default_rng(seed + LAYER_SEED_STRIDE * layer_id)
        r = rng.integers(0, bound, size=max_ngram_size, dtype=np.int64)
        result[layer_id] = 2 * r + 1
    return result


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class _BufferPool:
    """Output arrays whose memory returns to the pool once no array can reach it.

    Writing into freshly mapped pages costs as much as the hashing itself (measured on a
    2-core VM: ~8 ms per 32 MB), so the memory of results the caller has dropped is
    reused. Each result is a new array over a pooled block, made through a fresh ctypes
    lease of the block: NumPy keeps the lease as the array's base, every later view keeps
    the array or the lease, and every buffer export keeps its array, so the lease lives
    as long as anything can reach that memory. A `weakref.finalize` on the lease hands
    the block back. Safety rests on Python's object lifetime (a reachable object is never
    freed), not on reference counts: an interpreter that frees later (deferred counting,
    a cycle) only makes the pool allocate more.
    """

    def __init__(self, capacity: int = 8):
        self.capacity = capacity  # free blocks kept per size; 0 turns recycling off
        self.free: dict[int, collections.deque] = {}  # nbytes -> free blocks

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0 or self.capacity <= 0:
            return np.empty(shape, dtype)
        free = self.free.setdefault(nbytes, collections.deque())  # atomic, unlike defaultdict
        try:
            block = free.pop()  # atomic: no two callers get one block
        except IndexError:
            block = np.empty(nbytes, np.uint8)
        lease = (ctypes.c_char * nbytes).from_buffer(block)
        flat = np.frombuffer(lease, dtype)
        if flat.base is not lease:  # a NumPy that bypasses the lease: never recycle this block
            return flat.reshape(shape)
        # The finalizer may run in any thread, mid-call: deque.append needs no lock.
        weakref.finalize(lease, _give_back, free, block, self.capacity).atexit = False
        return flat.reshape(shape)


def _give_back(free: collections.deque, block: np.ndarray, capacity: int) -> None:
    if len(free) < capacity:
        free.append(block)


def checked_lookup(lookup) -> np.ndarray:
    """A read-only int64 copy of a raw -> compressed id lookup [V]; ValueError if it is not one."""
    arr = np.asarray(lookup)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"lookup must be a non-empty 1-D [V] array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"lookup must hold integers, got dtype {arr.dtype}")
    out = arr.astype(np.int64)  # a private copy, so nobody else can edit it
    if out.min() < 0:  # also catches uint64 values that wrapped around
        raise ValueError(f"lookup holds negative ids (min {out.min()})")
    out.flags.writeable = False
    return out


class NgramHasher:
    """Hashes raw token ids into per-head row ids of every Engram layer's table.

    Args:
      lookup: raw-to-compressed id array [V] (see `engram_jax.compression`); use
        `np.arange(V)` for no compression. V' = lookup.max() + 1.
      max_ngram_size: N >= 2; orders 2..N are hashed.
      heads_per_ngram: K >= 1 hash heads per order.
      table_sizes: base table size S_n for each order n = 2..N (N - 1 values).
      layer_ids: the Engram layer ids (0-based); each has its own multipliers and primes.
      pad_id: the raw pad id, a valid raw id; positions before a row's start read its
        compressed id.
      seed: base seed of the multipliers.
      dtype: output dtype: np.int32 (default; what JAX indexes with, and half the bytes)
        or np.int64 (as the reference). The values are identical; int32 needs every
        prime below 2**31.

    Negative input ids are padding markers (e.g. -1): as in the reference, compression
    passes them through unchanged and they are hashed like any other id. Any id >= V
    raises ValueError.
    """

    def __init__(
        self,
        lookup,
        *,
        max_ngram_size: int,
        heads_per_ngram: int,
        table_sizes: Sequence[int],
        layer_ids: Sequence[int],
        pad_id: int,
        seed: int,
        dtype=np.int32,
    ):
        self.lookup = lookup = checked_lookup(lookup)
        self.vocab_size = int(lookup.size)
        self.num_compressed = int(lookup.max()) + 1

        self.max_ngram_size = _check_int("max_ngram_size", max_ngram_size, 2)
        self.heads_per_ngram = _check_int("heads_per_ngram", heads_per_ngram, 1)
        self.table_sizes = tuple(_check_int("table_sizes[i]", s, 2) for s in table_sizes)
        if len(self.table_sizes) != self.max_ngram_size - 1:
            raise ValueError(
                f"table_sizes needs one base size per order 2..{self.max_ngram_size} "
                f"({self.max_ngram_size - 1} values), got {len(self.table_sizes)}"
            )
        self.layer_ids = tuple(_check_int("layer_ids[i]", i, 0) for i in layer_ids)
        if not self.layer_ids or len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"layer_ids must be non-empty and distinct, got {list(layer_ids)}")
        self.pad_id = _check_int("pad_id", pad_id, 0)
        if self.pad_id >= self.vocab_size:
            raise ValueError(f"pad_id {pad_id} is outside the vocabulary of {self.vocab_size} ids")
        self.seed = _check_int("seed", seed, 0)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
            raise ValueError(f"dtype must be int32 or int64, got {self.dtype}")

        self.compressed_pad_id = int(self.lookup[self.pad_id])
        self.multipliers = layer_multipliers(
            self.num_compressed, self.max_ngram_size, self.layer_ids, self.seed
        )
        primes = head_primes(self.table_sizes, self.heads_per_ngram, self.layer_ids)
        self.head_sizes = {layer: [list(order) for order in primes[layer]] for layer in self.layer_ids}
        largest = max(p for layer in primes.values() for order in layer for p in order)
        if self.dtype == np.int32 and largest >= _INT32_LIMIT:
            raise ValueError(f"a head has {largest} rows, too many for int32 ids; use dtype=np.int64")
        self._packed = _PACKED_OK and largest < _INT32_LIMIT
        self._pool = _BufferPool()
        self._local = threading.local()

    def __getstate__(self) -> dict:
        # Grain sends the hasher to worker processes: drop the lock and thread-local scratch.
        return {k: v for k, v in self.__dict__.items() if k not in ("_pool", "_local")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pool = _BufferPool()
        self._local = threading.local()

    @property
    def num_heads(self) -> int:
        """Hash heads per layer, (N - 1) * K."""
        return (self.max_ngram_size - 1) * self.heads_per_ngram

    def on_device(self) -> hashing_device.DeviceHasher:
        """This hasher as a pure, jittable function of int32 raw ids [B, T], bit-equal to it.

        `f(raw_ids) -> {layer_id: int32 [B, T, H]}` in 32-bit integer arithmetic (no x64);
        `f.context` and `f.step` hash one new token per decode step. Raises ValueError when
        an id or a head size does not fit int32. See `engram_jax.hashing_device`.
        """
        return hashing_device.DeviceHasher.from_host(self)

    def compress(self, input_ids) -> np.ndarray:
        """Raw ids [B, T] -> compressed ids [B, T] int64 (negative ids pass through)."""
        x = self._checked(input_ids)
        out = np.empty(x.shape, np.int64)
        self._compress_into(x, out)
        return out

    def __call__(self, input_ids) -> dict[int, np.ndarray]:
        """Raw ids [B, T] -> `{layer_id: hash ids [B, T, H]}`, H = (N - 1) * K."""
        x = self._checked(input_ids)
        work = self._workspace(x.shape)
        signed = self._compress_into(x, work.padded[:, self.max_ngram_size - 1 :])
        return self._hash(work, signed)

    def hash_compressed(self, compressed) -> dict[int, np.ndarray]:
        """Compressed ids [B, T] (from `compress`) -> `{layer_id: [B, T, H]}`."""
        compressed = np.asarray(compressed)
        if compressed.ndim != 2 or not np.issubdtype(compressed.dtype, np.integer):
            raise ValueError(f"compressed ids must be an integer [batch, seq] array, got "
                             f"{compressed.dtype} {compressed.shape}")
        if compressed.size and compressed.max() >= self.num_compressed:
            raise ValueError(f"compressed id {compressed.max()} is >= V' = {self.num_compressed}")
        work = self._workspace(compressed.shape)
        work.padded[:, self.max_ngram_size - 1 :] = compressed
        return self._hash(work, bool(compressed.size and compressed.min() < 0))

    def _checked(self, input_ids) -> np.ndarray:
        x = np.asarray(input_ids)
        if x.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"input_ids must hold integers, got dtype {x.dtype}")
        if x.size and x.max() >= self.vocab_size:
            raise ValueError(
                f"token id {x.max()} is outside the vocabulary (ids 0..{self.vocab_size - 1}; "
                "negative ids are padding markers)"
            )
        return x

    def _compress_into(self, x: np.ndarray, out: np.ndarray) -> bool:
        """Writes compressed ids of x into out; returns whether any id is negative."""
        if x.size == 0 or x.min() >= 0:
            np.take(self.lookup, x, out=out, mode="clip")  # in range: checked by _checked
            return False
        out[...] = x
        keep = x >= 0
        out[keep] = self.lookup[x[keep]]
        return True

    def _workspace(self, shape: tuple[int, int]) -> _Workspace:
        """This thread's scratch buffers for batches of `shape`, reused across calls."""
        work = getattr(self._local, "work", None)
        if work is None or work.shape != shape:
            work = self._local.work = _Workspace(shape, self.max_ngram_size, self.num_heads)
            work.padded[:, : self.max_ngram_size - 1] = self.compressed_pad_id
        return work

    def _hash(self, work: _Workspace, signed: bool) -> dict[int, np.ndarray]:
        b, t = work.shape
        out = {}
        for layer_id in self.layer_ids:
            out[layer_id] = self._pool.take((b, t, self.num_heads), self.dtype)
            if b and t:
                _hash_layer(work, self.multipliers[layer_id], self.head_sizes[layer_id],
                            out[layer_id], signed, self._packed)
        return out


class _Workspace:
    """Scratch of one thread for one batch shape: padded ids and one tile's temporaries.

    Allocating these per call costs more than the hashing when the allocator hands back
    fresh pages (measured: a 2-3x slowdown), so they live as long as the batch shape.
    """

    def __init__(self, shape: tuple[int, int], max_ngram_size: int, num_heads: int):
        b, t = shape
        self.shape = shape
        lead = max_ngram_size - 1
        self.padded = np.empty((b, t + lead), np.int64)  # [B, T + N - 1]: pad' then ids
        if t <= _TILE_TOKENS:
            self.rows, self.cols = max(1, min(b, _TILE_TOKENS // max(t, 1))), t
        else:
            self.rows, self.cols = 1, _TILE_TOKENS
        size = self.rows * self.cols
        self.mix = np.empty((lead, size), np.uint64)  # [N-1, tile]: XOR-mix of order o + 2
        self.wide = np.empty((lead, size), np.uint64)  # mix * (2**32 + 1), per order
        self.prod, self.quot, self.acc = (np.empty(size, np.uint64) for _ in range(3))
        # int64 output (or odd H) is staged here as packed int32, then widened in one copy.
        self.block = np.empty((size, num_heads + num_heads % 2), np.int32)  # [tile, H]


def _hash_layer(work: _Workspace, multipliers, head_sizes, out: np.ndarray, signed: bool,
                packed: bool) -> None:
    """Hashes one layer: work.padded [B, T + N - 1] -> out [B, T, H], tile by tile."""
    b, t, h = out.shape
    n = len(multipliers)
    # Non-negative ids give non-negative mixes, for which NumPy's unsigned division
    # (libdivide) is ~1.6x faster than floored signed division. Both wrap mod 2**64.
    ity = np.int64 if signed else np.uint64
    mult = [ity(m) for m in multipliers]
    # (order, p, p * 2**32); the scaled prime is only used when packing (p < 2**31).
    heads = [(o, ity(p), ity(p << 32) if packed else None)
             for o, order in enumerate(head_sizes) for p in order]
    mix, wide = work.mix.view(ity), work.wide.view(ity)
    quot, acc, prod = work.quot.view(ity), work.acc.view(ity), work.prod.view(ity)
    padded, lead = work.padded.view(ity), n - 1
    for r0 in range(0, b, work.rows):
        r1 = min(b, r0 + work.rows)
        for c0 in range(0, t, work.cols):
            c1 = min(t, c0 + work.cols)
            count = (r1 - r0) * (c1 - c0)
            m, w, q, a = mix[:, :count], wide[:, :count], quot[:count], acc[:count]
            p2 = prod[:count].reshape(r1 - r0, c1 - c0)
            for k in range(n):
                shifted = padded[r0:r1, lead - k + c0 : lead - k + c1]  # x[t - k]
                if k == 0:
                    np.multiply(shifted, mult[0], out=m[0].reshape(p2.shape))
                    continue
                np.multiply(shifted, mult[k], out=p2)
                np.bitwise_xor(m[max(k - 2, 0)], p2.reshape(-1), out=m[k - 1])
                np.multiply(m[k - 1], ity(2**32 + 1), out=w[k - 1])
            tile = out[r0:r1, c0:c1].reshape(count, h)  # contiguous: full rows or part of one row
            if not packed:
                for j, (o, p, _) in enumerate(heads):
                    np.floor_divide(m[o], p, out=q)
                    np.multiply(q, p, out=q)
                    np.subtract(m[o], q, out=tile[:, j], casting="unsafe")
                continue
            staged = out.dtype != np.int32 or h % 2  # int64 output, or rows not 8-byte aligned
            dest = work.block[:count] if staged else tile
            _store_pairs(m, w, q, a, heads, dest.view(np.int64).view(ity))
            if staged:
                np.copyto(tile, dest[:, :h])


def _store_pairs(m, w, q, a, heads, pairs) -> None:
    """Writes int32 hash ids two heads per int64 store into pairs [tile, ceil(H/2)].

    With r_a = mix_a mod p_a and r_b = mix_b mod p_b (both < 2**31), the int64 that holds
    heads (a, b) on a little-endian host is r_a + r_b * 2**32
      = mix_a - q_a p_a + mix_b 2**32 - q_b (p_b 2**32)   (mod 2**64),
    so one subtraction writes both heads, and mix * (2**32 + 1) serves a whole order.
    """
    heads = heads + heads[-1:] * (len(heads) % 2)  # odd H: the last head fills both halves
    floor_divide, multiply, subtract = np.floor_divide, np.multiply, np.subtract
    for j in range(0, len(heads), 2):
        (oa, pa, _), (ob, pb, pb_scaled) = heads[j], heads[j + 1]
        if oa == ob:
            base = w[oa]
        else:
            base = np.left_shift(m[ob], m.dtype.type(32), out=a)
            np.add(base, m[oa], out=a)
        floor_divide(m[oa], pa, out=q)
        multiply(q, pa, out=q)
        subtract(base, q, out=a)
        floor_divide(m[ob], pb, out=q)
        multiply(q, pb_scaled, out=q)
        subtract(a, q, out=pairs[:, j // 2])
