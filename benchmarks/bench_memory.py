"""Temporaries of `small`'s train step at its preset batch (32 x 512) on one device.

The step (AdamW, tables on the device, as `engram-train --config small` runs it) is
compiled with abstract arguments only, nothing allocated, for each variant: the remat
policies, blocks unrolled instead of scanned, and the loss over all logits at once
instead of in chunks. Temporaries are XLA:CPU's `memory_analysis().temp_size_in_bytes`;
arguments (state and batch) come on top and are the same for every variant.

    python benchmarks/bench_memory.py [--variants none,full,save_dots,...]

Prints one JSON object; GiB = 2**30 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from bench_compile import GIB, lower_train_step  # sets up 8 simulated devices; one is used

import jax  # noqa: E402  (after bench_compile's XLA_FLAGS)

from engram_jax import configs  # noqa: E402
from engram_jax.optim import OptimConfig  # noqa: E402
from engram_jax.sharding import MeshConfig  # noqa: E402

# Variant -> overrides of the `small` model preset.
VARIANTS = {
    "none": {"remat": "none"},
    "full": {"remat": "full"},
    "save_dots": {"remat": "save_dots"},
    "full_unrolled": {"remat": "full", "scan_layers": False},
    "full_whole_logits": {"remat": "full", "loss_chunk": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    base = configs.get("small")
    results = {}
    for name in args.variants.split(","):
        config = base.replace(**VARIANTS[name])
        lowered, _ = lower_train_step(config, 32, 512, MeshConfig(data=1), OptimConfig(), jax.devices()[:1])
        start = time.perf_counter()
        memory = lowered.compile().memory_analysis()
        results[name] = {"overrides": VARIANTS[name], "temp_gib": round(memory.temp_size_in_bytes / GIB, 2),
                         "arguments_gib": round(memory.argument_size_in_bytes / GIB, 2),
                         "compile_s": round(time.perf_counter() - start, 1)}
        print(name, results[name], flush=True, file=sys.stderr)
    print(json.dumps({"config": "small", "preset_remat": base.remat, "batch": [32, 512], "devices": 1,
                      "host": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "jax": jax.__version__, "variants": results}, indent=1))


if __name__ == "__main__":
    main()
