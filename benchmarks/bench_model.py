"""Backbone throughput: forward+backward tokens/s of `tiny` and `small`, with and without Engram.

For each size, three variants side by side in one run: the preset (with Engram), the
same model with Engram removed, and the iso-parameter baseline (Engram's parameters
spent on routed experts). Each step is a jitted value_and_grad of the next-token loss;
compilation is left out. Shapes (batch x seq): `tiny` 16 x 128, its training shape;
`small` 4 x 512, an eighth of its training batch (32 x 512), so that a CPU step takes
seconds rather than a minute.

    python benchmarks/bench_model.py [--repeats 5] [--sizes tiny,small] [--no-baseline]

The variants of one size are timed alternately (one step of each in turn), so that a
shared machine's load falls on all alike. Each variant also reports the compiled step's
FLOPs (XLA's `cost_analysis`, counted on the same model with nn.scan off); with Engram,
`engram_extra_time` and `engram_extra_flops` are the preset's time and FLOPs over the
same model without Engram, minus one (the issue-20 target: the first no more than the
second plus 5 points).

Prints one JSON object. On CPU, compare variants by their ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import configs, model, training
from engram_jax.table import Tables
from engram_jax.table_optim import RowOptimizer

# (batch, seq): tiny's training shape; small's training seq with batch 4 of its 32 (CPU time).
SHAPES = {"tiny": (16, 128), "small": (4, 512)}


def build(config, batch: int, seq: int):
    """The jitted train-step gradient of `config` and its arguments."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch, seq + 1))
    data = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "hash_ids": {}}
    if config.engram is not None:
        hasher = config.engram.make_hasher(np.arange(config.vocab_size))
        data["hash_ids"] = {k: jnp.asarray(v) for k, v in hasher(tokens[:, :-1]).items()}
    variables = jax.jit(lambda: model.init_variables(config, jax.random.key(0)))()
    params = jax.tree.map(lambda x: getattr(x, "value", x), variables["params"],
                          is_leaf=lambda x: hasattr(x, "value"))
    moe_bias = variables.get("moe_bias", {})
    tables = rows = None
    if config.engram is not None:  # one device; the lookup and its gradient are in the step
        mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
        tables = Tables(config.engram, mesh, RowOptimizer())
        rows = tables.create(jax.random.key(1)).rows

    @jax.jit
    def step(p, rows, batch):  # gradients of the params and of the rows read, as in the train step
        memory, _ = training.lookup(tables, rows, batch)
        loss = lambda p, memory: training.forward(config, p, moe_bias, batch, memory)[0]  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1))(p, memory)

    return step, (params, rows, data)


def measure(configs_by_name: dict, batch: int, seq: int, repeats: int) -> dict:
    """ms/step of each variant (steps interleaved), tokens/s and the compiled FLOPs."""
    out = {}
    for name, config in configs_by_name.items():
        # XLA's cost analysis counts a loop's body once, so the FLOPs are those of the
        # same model with every block unrolled (nn.scan off); the timed step is the preset's.
        step, args = build(config.replace(scan_layers=False), batch, seq)
        analysis = step.lower(*args).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        out[name] = {"gflops": round(float(analysis.get("flops", float("nan"))) / 1e9, 2)}
    steps = {name: build(config, batch, seq) for name, config in configs_by_name.items()}
    for step, args in steps.values():
        jax.block_until_ready(step(*args))
    samples = {name: [] for name in steps}
    for _ in range(repeats):
        for name, (step, args) in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(*args))
            samples[name].append(time.perf_counter() - start)
    for name, config in configs_by_name.items():
        seconds = float(np.median(samples[name]))
        out[name].update({"params": model.count_params(config).total, "ms_per_step": round(seconds * 1e3, 1),
                          "tokens_per_s": round(batch * seq / seconds)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--no-baseline", action="store_true", help="leave out the iso-parameter baseline")
    args = parser.parse_args()
    results = {}
    for size in args.sizes.split(","):
        batch, seq = SHAPES[size]
        preset = configs.get(size)
        variants = {size: preset, f"{size} without engram": preset.replace(engram=None)}
        if not args.no_baseline:
            variants[f"{size}-baseline"] = configs.get(f"{size}-baseline")
        for name, r in measure(variants, batch, seq, args.repeats).items():
            results[name] = {"batch": batch, "seq": seq, **r}
        base = results[size]["tokens_per_s"]
        for name in variants:
            results[name]["speed_vs_engram"] = round(results[name]["tokens_per_s"] / base, 3)
        with_engram, without = results[size], results[f"{size} without engram"]
        results[size]["engram_extra_time"] = round(with_engram["ms_per_step"] / without["ms_per_step"] - 1, 3)
        results[size]["engram_extra_flops"] = round(with_engram["gflops"] / without["gflops"] - 1, 3)
    print(json.dumps({"benchmark": "model_forward_backward", "results": results,
                      "machine": {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
                                  "cpu": platform.processor() or platform.machine(), "jax": jax.__version__}},
                     indent=2))


if __name__ == "__main__":
    main()
