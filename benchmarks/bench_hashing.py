"""Hashing throughput on one core: `NgramHasher`, its jitted device form, and the spec.

Size (issue 2): batch 64 x 4096 raw ids, N = 3, K = 8, two Engram layers [1, 15], base
table size 2,262,400 (Engram-27B), raw vocab 129,280 compressed to 99,092 ids.

    python benchmarks/bench_hashing.py [--repeats 30] [--core 0]

Prints one JSON object. Every variant is checked against `plain_numpy` first, then
timed for `--repeats` steps after 3 warm-up steps (plain NumPy, which is slow, only on
every fifth step); variants run interleaved, so machine noise hits all alike:
- `engram_jax_int32` / `engram_jax_int64`: the library as used, results dropped each
  step (the hasher recycles the memory of results nobody holds).
- `engram_jax_int32_fresh`: the same with recycling off, every output freshly mapped.
- `device_jit`: `NgramHasher.on_device()` under `jax.jit` on JAX's default backend (the
  CPU here; the core pinning applies to XLA's threads too), ids already on the device,
  results left there: the in-graph cost. Compilation is timed once, separately.
- `device_jit_numpy_io`: the same from NumPy ids to NumPy results, as the host hasher.
- `plain_numpy`: the spec written out directly (np.remainder per head, np.stack), the
  way the reference demo computes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from engram_jax.hashing import NgramHasher, head_primes, layer_multipliers

BATCH, SEQ, MAX_N, HEADS, LAYERS = 64, 4096, 3, 8, (1, 15)
TABLE_SIZE, RAW_VOCAB, COMPRESSED_VOCAB, PAD_ID = 2_262_400, 129_280, 99_092, 2


def plain_numpy(lookup: np.ndarray, ids: np.ndarray) -> dict[int, np.ndarray]:
    """Reference section 2 transcribed with no optimisation."""
    x = lookup[ids]
    num_compressed = int(lookup.max()) + 1
    mult = layer_multipliers(num_compressed, MAX_N, LAYERS, 0)
    primes = head_primes((TABLE_SIZE,) * (MAX_N - 1), HEADS, LAYERS)
    pad = lookup[PAD_ID]
    shifted = [np.pad(x, ((0, 0), (k, 0)), constant_values=pad)[:, : x.shape[1]] for k in range(MAX_N)]
    out = {}
    for layer in LAYERS:
        heads = []
        for n in range(2, MAX_N + 1):
            mix = shifted[0] * mult[layer][0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifted[k] * mult[layer][k])
            heads += [mix % p for p in primes[layer][n - 2]]
        out[layer] = np.stack(heads, axis=2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--core", type=int, default=0, help="pin to this CPU core")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})

    rng = np.random.default_rng(0)
    lookup = rng.permutation(np.arange(RAW_VOCAB) % COMPRESSED_VOCAB)
    ids = rng.integers(0, RAW_VOCAB, (BATCH, SEQ))
    common = dict(max_ngram_size=MAX_N, heads_per_ngram=HEADS, table_sizes=[TABLE_SIZE] * (MAX_N - 1),
                  layer_ids=LAYERS, pad_id=PAD_ID, seed=0)
    h32 = NgramHasher(lookup, dtype=np.int32, **common)
    h64 = NgramHasher(lookup, dtype=np.int64, **common)
    fresh = NgramHasher(lookup, dtype=np.int32, **common)
    fresh._pool.capacity = 0  # no recycling: every output is newly allocated
    device = jax.jit(h32.on_device())
    ids32 = ids.astype(np.int32)
    on_device = jax.device_put(ids32)
    start = time.perf_counter()
    jax.block_until_ready(device(on_device))
    compile_s = time.perf_counter() - start
    variants = {
        "engram_jax_int32": lambda: h32(ids),
        "engram_jax_int64": lambda: h64(ids),
        "engram_jax_int32_fresh": lambda: fresh(ids),
        "device_jit": lambda: jax.block_until_ready(device(on_device)),
        "device_jit_numpy_io": lambda: {k: np.asarray(v) for k, v in device(ids32).items()},
        "plain_numpy": lambda: plain_numpy(lookup, ids),
    }
    expected = plain_numpy(lookup, ids)
    for name, fn in variants.items():
        got = fn()
        assert all(np.array_equal(np.asarray(got[layer]), expected[layer]) for layer in LAYERS), name

    times = {name: [] for name in variants}
    for step in range(args.repeats + 3):
        for name, fn in variants.items():
            if name == "plain_numpy" and step % 5:
                continue  # slow; a fifth of the samples is plenty
            start = time.perf_counter()
            fn()
            if step >= 3:  # warm-up steps are not recorded
                times[name].append(time.perf_counter() - start)

    tokens = BATCH * SEQ
    results = {}
    for name, samples in times.items():
        s = np.array(samples)
        results[name] = {
            "median_ms": round(float(np.median(s)) * 1e3, 2),
            "mtok_per_s_median": round(tokens / float(np.median(s)) / 1e6, 2),
            "mtok_per_s_p10": round(tokens / float(np.percentile(s, 90)) / 1e6, 2),
            "mtok_per_s_p90": round(tokens / float(np.percentile(s, 10)) / 1e6, 2),
            "samples": len(samples),
        }
    base = results["plain_numpy"]["median_ms"]
    for name in results:
        results[name]["speedup_vs_plain_numpy"] = round(base / results[name]["median_ms"], 2)
    print(json.dumps({
        "benchmark": "hashing",
        "size": {"batch": BATCH, "seq": SEQ, "max_ngram_size": MAX_N, "heads_per_ngram": HEADS,
                 "layers": list(LAYERS), "table_size": TABLE_SIZE, "raw_vocab": RAW_VOCAB,
                 "compressed_vocab": COMPRESSED_VOCAB},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores_used": 1,
                    "python": platform.python_version(), "numpy": np.__version__, "jax": jax.__version__,
                    "jax_device": str(jax.devices()[0].device_kind)},
        "repeats": args.repeats, "warmup": 3, "device_compile_s": round(compile_s, 2),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
