"""`tiny`'s train step on one device against 8 simulated devices on several meshes.

A sanity figure only: the 8 "devices" are threads sharing this machine's cores and
RAM, so the 8-device steps cost the same arithmetic plus the collectives and the
partitioning overhead; on real devices each would do 1/8 of the work. Steps of the
meshes are interleaved (round-robin) so that a noisy machine affects each alike.

    python benchmarks/bench_mesh.py [--meshes 1x1x1,8x1x1,2x2x2,1x2x4] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from engram_jax import configs, optim, sharding  # noqa: E402
from engram_jax.data import DataConfig  # noqa: E402
from train.run import RunConfig, build_steps  # noqa: E402

BATCH, SEQ = 16, 128  # tiny's training shape


def step_of(spec: str, config, optim_config):
    """(train step, state, batch) of `config` on the mesh `spec` = "data x fsdp x expert"."""
    data, fsdp, expert = map(int, spec.split("x"))
    run = RunConfig(model=config, optim=optim_config, steps=1000, data=DataConfig(vocab_size=config.vocab_size),
                    mesh=sharding.MeshConfig(data=data, fsdp=fsdp, expert=expert))
    steps = build_steps(run, devices=jax.devices()[: data * fsdp * expert])  # as engram-train builds it
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (BATCH, SEQ + 1))
    hasher = config.engram.make_hasher(np.arange(config.vocab_size))
    batch = sharding.global_batch(steps.mesh, {"inputs": tokens[:, :-1].astype(np.int32),
                                               "targets": tokens[:, 1:].astype(np.int32),
                                               "hash_ids": hasher(tokens[:, :-1])})
    return steps.train_step, steps.init(), batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meshes", default="1x1x1,8x1x1,2x2x2,1x2x4")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    config, optim_config = configs.get("tiny"), optim.OptimConfig(learning_rate=1e-3)
    runs = {}
    for spec in args.meshes.split(","):
        train, state, batch = step_of(spec, config, optim_config)
        start = time.perf_counter()
        state, metrics = train(state, batch)
        jax.block_until_ready(metrics["loss"])
        runs[spec] = {"train": train, "state": state, "batch": batch, "compile_s": time.perf_counter() - start,
                      "times": []}
    for _ in range(args.steps):
        for run in runs.values():
            start = time.perf_counter()
            run["state"], metrics = run["train"](run["state"], run["batch"])
            jax.block_until_ready(metrics["loss"])
            run["times"].append(time.perf_counter() - start)
    base = float(np.median(runs[next(iter(runs))]["times"]))
    for spec, run in runs.items():
        median = float(np.median(run["times"]))
        print(json.dumps({"mesh": spec, "step_ms_median": round(1e3 * median, 1),
                          "vs_first": round(median / base, 2), "first_step_s": round(run["compile_s"], 1)}))
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "backend": jax.default_backend(), "batch": [BATCH, SEQ], "steps": args.steps}))


if __name__ == "__main__":
    main()
