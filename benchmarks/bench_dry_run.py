"""Fit check of the paper's models: the dry run (`train/dry_run.py`) on 64 simulated devices.

For `engram-27b` and `engram-40b`, with the Engram tables in device memory and in
pinned host memory, the train step is compiled for a `fsdp 8 x expert 8` mesh (64
devices: one 8-GPU node's worth of FSDP times 8 nodes' worth of expert parallelism)
with abstract arguments, and its per-device memory is read from the compiled program.
Batch: 1 x 4096 tokens per device (`data.batch_size=64`); the presets' 1280 x 4096 per
step is 20 sequences per device on 64 devices, which a run reaches with more devices.
Nothing is allocated; each compile takes minutes on 2 CPU cores.

    python benchmarks/bench_dry_run.py                       # all four, one after another
    python benchmarks/bench_dry_run.py --configs engram-27b --placements host
    python benchmarks/bench_dry_run.py --set model.num_layers=8 --set model.engram.layer_ids=[1,5]

Prints one JSON object: per case the per-device GiB of each part of the state, the
temporaries, the device total against 80 GiB (an H100), host memory, the largest
buffers, the collectives' bytes per step, and the lowering and compile times.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time

from train import dry_run
from train.run import run_preset

GIB = 2**30
MESH = ["mesh.data=1", "mesh.fsdp=8", "mesh.expert=8"]
BATCH = ["data.batch_size=64"]  # 1 x 4096 tokens per device
DEVICE_MEMORY_GB = 80  # H100 SXM


def case(name: str, placement: str, overrides: list[str]) -> dict:
    config = run_preset(name).override([*MESH, *BATCH, f"model.engram.placement={placement}",
                                        f"mesh.device_memory_gb={DEVICE_MEMORY_GB}", *overrides])
    start = time.perf_counter()
    report = dry_run.dry_run(config)
    wall = time.perf_counter() - start
    print(dry_run.format_report(report), file=sys.stderr, flush=True)
    gib = lambda n: round(n / GIB, 3)  # noqa: E731
    c = report["compiled"]
    return {
        "config": name, "placement": placement, "overrides": overrides, "mesh": report["mesh"],
        "batch": report["batch"], "num_layers": config.model.num_layers,
        "state_gib": {k: gib(v) for k, v in report["state_bytes"].items()},
        "state_host_gib": {k: gib(v) for k, v in report["state_host_bytes"].items() if v},
        "temp_gib": gib(c["temp"]),
        "device_total_gib": gib(report["device_total"]),
        "host_total_gib": gib(report["host_total"]),
        "fits_80_gib": dry_run.fits(report),
        "largest_buffers": [f"{b['opcode']} {b['type']} {gib(b['bytes'])} GiB" for b in report["largest_buffers"]],
        "collective_gib": {k: gib(v) for k, v in report["collective_bytes"].items()},
        "lower_s": round(report["lower_s"], 1), "compile_s": round(report["compile_s"], 1), "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="engram-27b,engram-40b")
    parser.add_argument("--placements", default="device,host")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every case (e.g. fewer layers)")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")  # JAX not started yet
    logging.getLogger("engram_jax").setLevel(logging.INFO)
    cases = [case(name, placement, args.set) for name in args.configs.split(",")
             for placement in args.placements.split(",")]
    print(json.dumps({"devices": 64, "mesh": "data 1 x fsdp 8 x expert 8", "per_device_batch": "1 x 4096",
                      "device_memory_gib": DEVICE_MEMORY_GB, "machine": platform.processor() or platform.machine(),
                      "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
