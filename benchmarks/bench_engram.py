"""Engram layer throughput: forward and forward+backward tokens/s, jitted.

Size: batch 8 x 512 tokens, D = 512, N = 3, K = 8, d_mem = 512 (head width 32), base
table size 100,003 rows per head (1.6M rows per layer), conv on. Variants, side by side:
M = 4 branches (mHC) and M = 1, float32 and bfloat16 compute.

    python benchmarks/bench_engram.py [--repeats 5] [--batch 8] [--seq 512]

Prints one JSON object. On CPU the numbers are for comparing variants (ratios); the
absolute numbers that matter come from an accelerator.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import table
from engram_jax.engram import Engram, EngramConfig


def measure(fn, args, repeats: int) -> float:
    """Median seconds per call; the first call (compilation) is left out."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def flops(fn, args) -> float:
    """FLOPs of the compiled program, by XLA's own cost analysis."""
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per program
    return float(cost.get("flops", float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)  # benchmarks/RESULTS.md: median of 5
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()

    config = EngramConfig(layer_ids=(1,), max_ngram_size=3, heads_per_ngram=8, embed_per_ngram=256,
                          table_sizes=(100_003, 100_003), conv_zero_init=False)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50_000, (args.batch, args.seq))
    hash_ids = jnp.asarray(config.make_hasher(np.arange(50_000))(ids)[1])
    tokens = args.batch * args.seq
    results = {}
    for branches in (4, 1):
        for dtype in (jnp.float32, jnp.bfloat16):
            layer = Engram(config, layer_id=1, dtype=dtype)
            hidden = jnp.asarray(rng.normal(size=(args.batch, args.seq, branches, args.hidden)), dtype)
            rows = jnp.asarray(rng.normal(size=(config.table_rows(1), config.head_dim)), jnp.float32)
            read = lambda: table.gather(rows, hash_ids, config.head_sizes(1)).astype(dtype)  # noqa: E731
            params = jax.jit(layer.init)(jax.random.key(0), hidden, read())["params"]
            forward = jax.jit(lambda p, h: layer.apply({"params": p}, h, read()))
            # The gradient of the rows read (what the table engine sends to the row owners).
            loss = lambda p, h, e: jnp.sum(layer.apply({"params": p}, h, e).astype(jnp.float32) ** 2)  # noqa: E731
            backward = jax.jit(lambda p, h: jax.grad(loss, argnums=(0, 1, 2))(p, h, read()))
            # Alternate the two so that a shared machine's load falls on both alike.
            fwd_s, bwd_s = [], []
            for _ in range(args.repeats):
                fwd_s.append(measure(forward, (params, hidden), 1))
                bwd_s.append(measure(backward, (params, hidden), 1))
            fwd, bwd = float(np.median(fwd_s)), float(np.median(bwd_s))
            fwd_flops, bwd_flops = flops(forward, (params, hidden)), flops(backward, (params, hidden))
            results[f"M{branches}_{jnp.dtype(dtype).name}"] = {
                "forward_tok_per_s": round(tokens / fwd),
                "forward_backward_tok_per_s": round(tokens / bwd),
                "forward_ms": round(fwd * 1e3, 2),
                "forward_backward_ms": round(bwd * 1e3, 2),
                # The issue-20 guard: forward+backward over forward, in time and in FLOPs.
                "fwd_bwd_over_fwd_time": round(bwd / fwd, 2),
                "forward_gflops": round(fwd_flops / 1e9, 3),
                "forward_backward_gflops": round(bwd_flops / 1e9, 3),
                "fwd_bwd_over_fwd_flops": round(bwd_flops / fwd_flops, 2),
            }
    base = results["M4_float32"]["forward_backward_ms"]
    for r in results.values():
        r["fwd_bwd_speed_vs_M4_float32"] = round(base / r["forward_backward_ms"], 2)
    print(json.dumps({
        "benchmark": "engram_layer",
        "size": {"batch": args.batch, "seq": args.seq, "hidden": args.hidden, "max_ngram_size": 3,
                 "heads_per_ngram": 8, "memory_dim": config.memory_dim,
                 "table_rows": config.table_rows(1)},
        "machine": {"backend": jax.default_backend(), "devices": str(jax.devices()[0]),
                    "cpu": platform.processor() or platform.machine(), "jax": jax.__version__},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
