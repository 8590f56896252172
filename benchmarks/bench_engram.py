"""Engram layer throughput: forward and forward+backward, jitted; parts; the reference.

Size: batch 8 x 512 tokens, D = 512, N = 3, K = 8, d_mem = 512 (head width 32), base
table size 100,003 rows per head (1.6M rows per layer), conv on. Variants, side by side:
M = 4 branches (mHC) and M = 1, float32 and bfloat16 compute.

    python benchmarks/bench_engram.py [--repeats 5] [--batch 8] [--seq 512]
    python benchmarks/bench_engram.py --parts      # issue 20's per-part table
    python benchmarks/bench_engram.py --reference  # against DeepSeek's PyTorch layer

`--parts` times each part of the layer jitted alone (forward, and forward+backward of a
sum of squares), with XLA's FLOPs (`cost_analysis`) and the number of [B, T, G, D]-sized
buffers the compiled forward+backward writes; "autodiff" rows differentiate the layer's
forward with jax.grad (the layer before issue 20), "layer" rows use the layer's own
backward (`engram._mix`, a custom_vjp). The variants alternate within one run.

`--reference` times DeepSeek's Engram layer as published in their demo
(github.com/deepseek-ai/Engram, engram_demo_v1.py: per-branch key Linears and RMSNorms,
the signed-square-root gate, one value Linear, a grouped Conv1d over RMSNorm'd
branches, SiLU), re-written here as a harness of the same modules, in PyTorch at the
same shapes and float32, from the same gathered rows (hashing and the table's gradient
left out on both sides). It needs torch (not a dependency of engram-jax) and skips
when torch is missing. It also prints the floor: the layer's forward+backward FLOPs at
the machine's best float32 matmul rate, and the reference's time over that floor, the
largest speed-up any code could show on this machine.

Prints one JSON object. On CPU the numbers are for comparing variants (ratios); the
absolute numbers that matter come from an accelerator.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import engram as engram_lib
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


def cost(fn, args) -> dict:
    """XLA's own cost analysis of the compiled program, and its large buffers."""
    compiled = fn.lower(*args).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis  # older jax: a list
    return {"flops": float(analysis.get("flops", float("nan"))),
            "bytes": float(analysis.get("bytes accessed", float("nan"))), "hlo": compiled.as_text()}


def flops(fn, args) -> float:
    """FLOPs of the compiled program, by XLA's own cost analysis."""
    return cost(fn, args)["flops"]


def large_writes(hlo: str, elements: int) -> int:
    """Instructions of the entry computation whose result has at least `elements`
    elements (each one a buffer written to memory on XLA:CPU), parameters left out."""
    entry = hlo[hlo.index("\nENTRY"):]
    count = 0
    for shape, op in re.findall(r"= \w+\[([\d,]*)\]\S* (\w[\w\-]*)\(", entry):
        if op not in ("parameter", "bitcast") and shape and math.prod(int(s) for s in shape.split(",")) >= elements:
            count += 1
    return count


def alternate(fns: dict, args: dict, repeats: int) -> dict:
    """Median seconds of each named function, calls interleaved so that load falls alike."""
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            samples[name].append(time.perf_counter() - start)
    return {name: float(np.median(s)) for name, s in samples.items()}


def bench_config() -> EngramConfig:
    return EngramConfig(layer_ids=(1,), max_ngram_size=3, heads_per_ngram=8, embed_per_ngram=256,
                        table_sizes=(100_003, 100_003), conv_zero_init=False)


def layers(args) -> dict:
    """Forward and forward+backward of the whole layer, M = 4 and 1, float32 and bfloat16."""
    config = bench_config()
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
            times = alternate({"fwd": forward, "bwd": backward}, {"fwd": (params, hidden), "bwd": (params, hidden)},
                              args.repeats)
            fwd, bwd = times["fwd"], times["bwd"]
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
    return results


def parts(args, branches: int) -> dict:
    """Each part of the layer alone (float32), forward and forward+backward: ms, GFLOPs,
    GB accessed and the [B, T, G, D]-sized buffers written."""
    config = bench_config()
    b, t, d, g = args.batch, args.seq, args.hidden, branches
    rng = np.random.default_rng(0)
    f32 = jnp.float32
    normal = lambda *shape, scale=1.0: jnp.asarray(scale * rng.normal(size=shape), f32)  # noqa: E731
    e, h = normal(b, t, config.memory_dim), normal(b, t, g, d)
    kernel, bias = normal(config.memory_dim, 1 + g, d, scale=config.memory_dim ** -0.5), normal(1 + g, d, scale=0.1)
    params = {"key_scale": 1 + normal(g, d, scale=0.1), "query_scale": 1 + normal(g, d, scale=0.1),
              "conv_scale": 1 + normal(g, d, scale=0.1), "conv_kernel": normal(config.kernel_size, g, d, scale=0.5)}
    spec = engram_lib._MixSpec(dtype=jnp.dtype(f32), gating=True, signed_sqrt=True,
                               gate_eps=float(jnp.finfo(f32).eps), short_conv=True, conv_eps=config.conv_norm_eps,
                               dilation=config.dilation)
    kv = jnp.einsum("btm,msd->btsd", e, kernel) + bias  # [B, T, 1 + G, D]
    gate_params = {k: params[k] for k in ("key_scale", "query_scale")}
    conv_params = {k: params[k] for k in ("conv_scale", "conv_kernel")}
    gate = jax.nn.sigmoid(normal(b, t, g))
    u = gate[..., None] * kv[:, :, :1]  # [B, T, G, D]

    def project(e, kernel, bias):
        return jnp.einsum("btm,msd->btsd", e, kernel) + bias  # [B, T, 1 + G, D]

    def gate_part(kv, h, p):  # key and query RMSNorms, score, signed sqrt, sigmoid
        return engram_lib._gated_value(kv, h, p, spec)[1]  # [B, T, G]

    def broadcast_part(gate, kv):  # the gated value: one value times each branch's gate
        return gate[..., None] * kv[:, :, :1]  # [B, T, G, D]

    def conv_part(u, p):  # RMSNorm, causal taps, SiLU, residual
        x, _ = engram_lib._rms_norm(u, p["conv_scale"], spec.conv_eps, f32)
        return u + jax.nn.silu(engram_lib._causal_taps(x, p["conv_kernel"], spec.dilation))

    def after_projection_autodiff(kv, h, p):
        return engram_lib._mix_forward(kv, h, p, spec)[0][0]

    def after_projection_layer(kv, h, p):
        return engram_lib._mix(kv, h, p, spec)[0]

    def whole(mix):
        def run(e, h, kernel, bias, p):
            return mix(project(e, kernel, bias), h, p)
        return run

    cases = {
        "projection (value + G keys, one einsum)": (project, (e, kernel, bias)),
        "gate: key/query RMSNorm, score, signed sqrt, sigmoid": (gate_part, (kv, h, gate_params)),
        "gated value (branch broadcast)": (broadcast_part, (gate, kv)),
        "short conv: RMSNorm, taps, SiLU, residual": (conv_part, (u, conv_params)),
        "after the projection, autodiff": (after_projection_autodiff, (kv, h, params)),
        "after the projection, layer (custom_vjp)": (after_projection_layer, (kv, h, params)),
        "whole layer, autodiff": (whole(after_projection_autodiff), (e, h, kernel, bias, params)),
        "whole layer, layer (custom_vjp)": (whole(after_projection_layer), (e, h, kernel, bias, params)),
    }
    fns, fn_args, costs = {}, {}, {}
    for name, (fn, fargs) in cases.items():
        loss = lambda *a, fn=fn: jnp.sum(fn(*a).astype(f32) ** 2)  # noqa: E731
        fns[f"{name}|fwd"] = jax.jit(fn)
        fns[f"{name}|bwd"] = jax.jit(jax.grad(loss, argnums=tuple(range(len(fargs)))))
        fn_args[f"{name}|fwd"] = fn_args[f"{name}|bwd"] = fargs
        for kind in ("fwd", "bwd"):
            costs[f"{name}|{kind}"] = cost(fns[f"{name}|{kind}"], fargs)
    times = alternate(fns, fn_args, args.repeats)
    out = {}
    for name in cases:
        fwd, bwd = costs[f"{name}|fwd"], costs[f"{name}|bwd"]
        out[name] = {
            "forward_ms": round(times[f"{name}|fwd"] * 1e3, 2),
            "forward_backward_ms": round(times[f"{name}|bwd"] * 1e3, 2),
            "forward_gflops": round(fwd["flops"] / 1e9, 3),
            "forward_backward_gflops": round(bwd["flops"] / 1e9, 3),
            "forward_backward_gb": round(bwd["bytes"] / 1e9, 3),
            "forward_backward_btgd_buffers": large_writes(bwd["hlo"], b * t * g * d),
        }
    return out


def reference(args, branches: int) -> dict | None:
    """DeepSeek's reference layer (PyTorch) against this layer, float32, alternating."""
    # OpenMP's threads spin after each of torch's parallel regions by default, taking the
    # cores from XLA's next call (measured here: JAX's times doubled when alternating);
    # passive waiting lets the two runtimes take turns. Read when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        return None
    from torch import nn as tnn

    config = bench_config()
    b, t, d, g = args.batch, args.seq, args.hidden, branches

    class ReferenceShortConv(tnn.Module):  # the demo's ShortConv: per-branch RMSNorm, grouped Conv1d, SiLU
        def __init__(self):
            super().__init__()
            self.conv = tnn.Conv1d(g * d, g * d, config.kernel_size, groups=g * d, bias=False,
                                   padding=(config.kernel_size - 1) * config.dilation, dilation=config.dilation)
            self.norms = tnn.ModuleList([tnn.RMSNorm(d, eps=config.conv_norm_eps) for _ in range(g)])

        def forward(self, x):  # [B, T, G, D]
            normed = torch.cat([self.norms[i](x[:, :, i]) for i in range(g)], dim=-1)  # [B, T, G * D]
            y = self.conv(normed.transpose(1, 2))[..., :t]  # [B, G * D, T]
            return tnn.functional.silu(y).transpose(1, 2).reshape(b, t, g, d)

    class ReferenceEngram(tnn.Module):  # the demo's Engram.forward from the embeddings on
        def __init__(self):
            super().__init__()
            self.value_proj = tnn.Linear(config.memory_dim, d)
            self.key_projs = tnn.ModuleList([tnn.Linear(config.memory_dim, d) for _ in range(g)])
            self.norm1 = tnn.ModuleList([tnn.RMSNorm(d) for _ in range(g)])
            self.norm2 = tnn.ModuleList([tnn.RMSNorm(d) for _ in range(g)])
            self.short_conv = ReferenceShortConv()

        def forward(self, hidden, embeddings):
            gates = []
            for i in range(g):
                key = self.norm1[i](self.key_projs[i](embeddings))
                query = self.norm2[i](hidden[:, :, i])
                score = (key * query).sum(dim=-1) / math.sqrt(d)
                score = score.abs().clamp_min(1e-6).sqrt() * score.sign()
                gates.append(score.sigmoid().unsqueeze(-1))
            value = torch.stack(gates, dim=2) * self.value_proj(embeddings).unsqueeze(2)
            return value + self.short_conv(value)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50_000, (b, t))
    hash_ids = config.make_hasher(np.arange(50_000))(ids)[1]
    rows_np = rng.normal(size=(config.table_rows(1), config.head_dim)).astype(np.float32)
    hidden_np = rng.normal(size=(b, t, g, d)).astype(np.float32)
    offsets = table.head_offsets(config.head_sizes(1))

    torch.manual_seed(0)
    ref = ReferenceEngram()
    rows_t, hidden_t = torch.from_numpy(rows_np), torch.from_numpy(hidden_np)
    ids_t = torch.from_numpy((hash_ids + offsets).astype(np.int64))

    def ref_forward():
        with torch.no_grad():
            return ref(hidden_t, tnn.functional.embedding(ids_t, rows_t).flatten(start_dim=-2))

    def ref_backward():
        hidden = hidden_t.clone().requires_grad_(True)
        with torch.no_grad():
            embeddings = tnn.functional.embedding(ids_t, rows_t).flatten(start_dim=-2)
        embeddings.requires_grad_(True)
        ref.zero_grad(set_to_none=True)
        (ref(hidden, embeddings) ** 2).sum().backward()
        return hidden.grad, embeddings.grad

    layer = Engram(config, layer_id=1)
    rows, hidden = jnp.asarray(rows_np), jnp.asarray(hidden_np)
    read = lambda: table.gather(rows, jnp.asarray(hash_ids), config.head_sizes(1))  # noqa: E731
    params = jax.jit(layer.init)(jax.random.key(0), hidden, read())["params"]
    forward = jax.jit(lambda p, h: layer.apply({"params": p}, h, read()))
    loss = lambda p, h, e: jnp.sum(layer.apply({"params": p}, h, e) ** 2)  # noqa: E731
    backward = jax.jit(lambda p, h: jax.grad(loss, argnums=(0, 1, 2))(p, h, read()))
    calls = {"jax_fwd": lambda: jax.block_until_ready(forward(params, hidden)),
             "jax_bwd": lambda: jax.block_until_ready(backward(params, hidden)),
             "ref_fwd": ref_forward, "ref_bwd": ref_backward}
    for call in calls.values():
        call()
    samples = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    ms = {name: float(np.median(s)) * 1e3 for name, s in samples.items()}
    # The floor: the forward+backward's FLOPs (nearly all of them the projection's three
    # dots, which the reference computes too) at this machine's best float32 matmul rate.
    flops = backward.lower(params, hidden).compile().cost_analysis()["flops"]
    peak = matmul_peak_flops()
    floor_ms = flops / peak * 1e3
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            **{f"{name}_ms": round(v, 2) for name, v in ms.items()},
            "forward_speedup_vs_reference": round(ms["ref_fwd"] / ms["jax_fwd"], 2),
            "forward_backward_speedup_vs_reference": round(ms["ref_bwd"] / ms["jax_bwd"], 2),
            "jax_fwd_bwd_gflop": round(flops / 1e9, 2), "matmul_peak_gflops": round(peak / 1e9, 1),
            "jax_fwd_bwd_floor_ms": round(floor_ms, 1),
            "largest_possible_speedup_vs_reference": round(ms["ref_bwd"] / floor_ms, 2)}


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of this machine's fastest float32 [n, n] x [n, n] matmul through XLA (best of `repeats`)."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, a))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)  # benchmarks/RESULTS.md: median of 5
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--parts", action="store_true", help="the per-part table (issue 20), M = 4 and 1")
    parser.add_argument("--reference", action="store_true", help="against DeepSeek's PyTorch layer")
    parser.add_argument("--layers", action="store_true", help="the whole-layer table (default without flags)")
    args = parser.parse_args()
    run_layers = args.layers or not (args.parts or args.reference)

    config = bench_config()
    out = {
        "benchmark": "engram_layer",
        "size": {"batch": args.batch, "seq": args.seq, "hidden": args.hidden, "max_ngram_size": 3,
                 "heads_per_ngram": 8, "memory_dim": config.memory_dim,
                 "table_rows": config.table_rows(1)},
        "machine": {"backend": jax.default_backend(), "devices": str(jax.devices()[0]),
                    "cpu": platform.processor() or platform.machine(), "jax": jax.__version__},
    }
    if run_layers:
        out["results"] = layers(args)
    if args.parts:
        out["parts"] = {f"M{g}_float32": parts(args, g) for g in (4, 1)}
    if args.reference:
        results = {f"M{g}_float32": reference(args, g) for g in (4, 1)}
        out["reference"] = results if results["M4_float32"] is not None else "skipped: torch is not installed"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
