"""Compile time of a paper preset's train step, with and without `nn.scan` over blocks.

The train step of `engram-27b` (Muon, Engram tables on the devices) is lowered and
compiled for 8 simulated CPU devices, mesh data 2 x fsdp 2 x expert 2, with abstract
arguments only (`jax.ShapeDtypeStruct`s carrying their shardings): nothing is
allocated. The global batch is reduced to 8 x 512 tokens (the preset trains on
1280 x 4096): compile time hardly depends on it, and the reduced batch keeps the
temporaries printed beside it readable. `scan_layers=True` stacks the 13 and 14 MoE
blocks between the Engram layers and compiles one of each; False unrolls all 30.

    python benchmarks/bench_compile.py [--config engram-27b] [--variants scan,unrolled]

Prints one JSON object: per variant, seconds to lower and to compile, and the
per-device temporaries of the compiled program (XLA:CPU's figure).
"""

from __future__ import annotations

import os

# Before JAX is imported: 8 simulated devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from engram_jax import configs, model, optim, sharding, training  # noqa: E402
from engram_jax.model import ModelConfig  # noqa: E402
from engram_jax.optim import OptimConfig  # noqa: E402
from engram_jax.sharding import MeshConfig  # noqa: E402
from engram_jax.table import Tables  # noqa: E402

GIB = 2**30


def lower_train_step(config: ModelConfig, batch: int, seq: int, mesh_config: MeshConfig,
                     optim_config: OptimConfig | None = None, devices=None):
    """The jitted train step lowered with abstract, sharded arguments (nothing allocated).

    Args:
      config: the model; batch, seq: the global batch shape.
      mesh_config: the mesh, over `devices` (default: as many of this process's devices
        as the mesh needs, a -1 axis counting 1).
      optim_config: the optimizers (and the tables' row optimizer); default OptimConfig().

    Returns:
      (lowered, seconds it took).
    """
    if devices is None:
        sizes = (mesh_config.data, mesh_config.fsdp, mesh_config.expert)
        devices = jax.devices()[: math.prod(max(s, 1) for s in sizes)]
    mesh = sharding.make_mesh(mesh_config, devices)
    optim_config = optim_config or OptimConfig()
    tables = Tables(config.engram, mesh, optim.table_optimizer(optim_config)) if config.engram else None
    shapes = model.variable_shapes(config, mesh)
    axes = sharding.logical_axes(shapes)["params"]
    tx = optim.build_optimizer(optim_config, axes, total_steps=1000)
    init = functools.partial(training.init_state, config, tx, tables, jax.random.key(0), mesh)
    abstract = jax.eval_shape(init)
    params = sharding.tree_shardings(mesh, axes, nn.unbox(shapes)["params"])
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sharding = training.TrainState(
        step=replicated, params=params, moe_bias=jax.tree.map(lambda _: replicated, abstract.moe_bias),
        opt_state=sharding.like_params(abstract.opt_state, params, replicated),
        tables=tables.shardings() if tables else abstract.tables)
    batch_sharding = sharding.batch_sharding(mesh)
    bias_rate = config.moe.bias_update_rate if config.moe else 0.0
    train, _ = training.jit_steps(config, tx, tables, optim.schedule(optim_config, 1000), bias_rate,
                                  state_sharding=state_sharding, batch_sharding=batch_sharding, mesh=mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sharding)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_sharding)
    data = {"inputs": tokens, "targets": tokens}
    if config.engram is not None:
        data["hash_ids"] = {i: jax.ShapeDtypeStruct((batch, seq, config.engram.num_heads), jnp.int32,
                                                    sharding=batch_sharding) for i in config.engram.layer_ids}
    start = time.perf_counter()
    lowered = train.lower(state, data)
    return lowered, time.perf_counter() - start


def measure(config: ModelConfig, batch: int, seq: int, mesh_config: MeshConfig, optim_config: OptimConfig) -> dict:
    lowered, lower_s = lower_train_step(config, batch, seq, mesh_config, optim_config)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    return {"lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
            "lower_plus_compile_s": round(lower_s + compile_s, 1),
            "temp_gib_per_device": round(compiled.memory_analysis().temp_size_in_bytes / GIB, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="engram-27b")
    parser.add_argument("--variants", default="scan,unrolled", help="scan, unrolled or both")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--optimizer", default="muon", choices=("muon", "adamw"), help="muon: the paper's")
    args = parser.parse_args()
    mesh_config = MeshConfig(data=2, fsdp=2, expert=2)
    # The paper's optimizer (section 4.1): Muon at 4e-4 with step decay.
    optim_config = OptimConfig(algorithm=args.optimizer, learning_rate=4e-4, schedule="step")
    base = configs.get(args.config)
    results = {}
    for variant in args.variants.split(","):
        config = base.replace(scan_layers={"scan": True, "unrolled": False}[variant])
        results[variant] = {"modules_of_blocks": len(config.block_groups),
                            **measure(config, args.batch, args.seq, mesh_config, optim_config)}
    print(json.dumps({"config": args.config, "remat": base.remat, "optimizer": args.optimizer,
                      "devices": "8 simulated CPU devices",
                      "mesh": "data 2 x fsdp 2 x expert 2", "global_batch": [args.batch, args.seq],
                      "host": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "jax": jax.__version__, "variants": results}, indent=1))


if __name__ == "__main__":
    main()
