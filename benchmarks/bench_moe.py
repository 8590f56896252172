"""Bytes one MoE layer moves per train step: GSPMD's MoE against expert parallelism.

One MoE layer's forward and backward (the gradients of its kernels and its input),
compiled for 8 simulated devices with the batch split over all of them; nothing is
allocated. For each global batch and mesh it prints the bytes each device sends per
kind of collective (`hlo.collective_traffic`, from the partitioned HLO):

- `gspmd`: `MoE(config)` without a mesh under jit: GSPMD partitions the global
  sort, gathers and scatters of the grouped computation itself.
- `expert_parallel`: `MoE(config, mesh)`: routing on each device, all-to-all in
  buckets of `capacity_factor` x an even share (`moe.py`).

Shapes: the `small` preset's MoE (D 512, 12 experts of width 384, top-2) and the paper
model's (D 2560, 55 experts of width 1536, top-6), sequences of 512 tokens.

    python benchmarks/bench_moe.py [--batches 16,64] [--meshes 2x1x4,1x1x8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from engram_jax import configs, hlo, sharding  # noqa: E402
from engram_jax.moe import MoE  # noqa: E402

SEQ = 512


def traffic(config, dim: int, mesh, batch: int, expert_parallel: bool) -> dict:
    layer = MoE(config, jnp.bfloat16, mesh=mesh if expert_parallel else None)
    boxed = jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((1, SEQ, dim)))
    shardings = sharding.tree_shardings(mesh, sharding.logical_axes(boxed), nn.unbox(boxed))
    variables = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), nn.unbox(boxed),
                             shardings)
    x = jax.ShapeDtypeStruct((batch, SEQ, dim), jnp.bfloat16, sharding=sharding.batch_sharding(mesh))
    grad = jax.grad(lambda v, x: jnp.sum(layer.apply(v, x, mutable=["intermediates"])[0].astype(jnp.float32) ** 2),
                    argnums=(0, 1))
    text = jax.jit(grad).lower(variables, x).compile().as_text()
    sent = hlo.collective_traffic(text)
    return {"bytes_sent_per_device": sum(sent.values()), "by_kind": sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="16,64", help="global batch sizes (sequences of 512)")
    parser.add_argument("--meshes", default="2x1x4,1x1x8", help="data x fsdp x expert meshes")
    parser.add_argument("--presets", default="small,engram-27b")
    args = parser.parse_args()
    results = []
    for preset in args.presets.split(","):
        model = configs.get(preset)
        moe = model.moe.replace(capacity_factor=2.0)
        for spec in args.meshes.split(","):
            data, fsdp, expert = map(int, spec.split("x"))
            mesh = sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, expert=expert))
            for batch in map(int, args.batches.split(",")):
                row = {"preset": preset, "mesh": spec, "global_batch": batch, "tokens_per_device": batch * SEQ // 8}
                for name, ep in (("gspmd", False), ("expert_parallel", True)):
                    row[name] = traffic(moe, model.hidden_size, mesh, batch, ep)
                row["ratio_gspmd_over_ep"] = round(row["gspmd"]["bytes_sent_per_device"]
                                                   / row["expert_parallel"]["bytes_sent_per_device"], 2)
                results.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "devices": jax.device_count(),
                      "backend": jax.default_backend(), "results": len(results)}))


if __name__ == "__main__":
    main()
