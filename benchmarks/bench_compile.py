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
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from engram_jax import configs  # noqa: E402
from engram_jax.data import DataConfig  # noqa: E402
from engram_jax.model import ModelConfig  # noqa: E402
from engram_jax.optim import OptimConfig  # noqa: E402
from engram_jax.sharding import MeshConfig  # noqa: E402
from train.dry_run import abstract_batch  # noqa: E402
from train.run import RunConfig, build_steps  # noqa: E402

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
    run = RunConfig(model=config, optim=optim_config or OptimConfig(), mesh=mesh_config, steps=1000,
                    data=DataConfig(vocab_size=config.vocab_size, batch_size=batch, seq_len=seq, segment_ids=False))
    steps = build_steps(run, devices=devices)  # as engram-train builds it
    state, data = steps.abstract_with_sharding(), abstract_batch(run, steps.mesh)
    train = steps.train_step
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
