"""One process of the two-process data check that tests/test_multihost.py launches.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multihost_worker.py \\
        --port 12345 --process-id {0,1} --cache 'cache{process}' --out 'out{process}.json' \\
        --set data.source=corpus ...

Each process joins the run (gloo collectives between CPU processes), gets the tokenizer and
compression table from process 0 (its own cache folder, `--cache`, shows whether it built
them itself), assembles global batches with `sharding.global_batch` on several meshes and
gathers them back whole, and writes what it saw as JSON for the test to compare with the
single-process batches. Nothing is asserted here: the test does that, with both processes'
output at hand.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib

import jax
import numpy as np

# Meshes the global batch is checked on: pure data parallelism, the hybrid mesh with one
# replica per process (`process_is_granule`), and every axis in use.
MESHES = {"data": {}, "dcn_data=2": {"dcn_data": 2}, "fsdp=2,expert=2": {"fsdp": 2, "expert": 2}}
TRAIN_BATCHES = 2


def _flat(batch: dict) -> dict[str, np.ndarray]:
    """{"inputs": ..., "hash_ids/1": ...}: one name per array."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x) for path, x in leaves}


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--cache", required=True, help="this process's cache folder; {process} is its id")
    parser.add_argument("--out", required=True, help="JSON output; {process} is its id")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=2, process_id=args.process_id)

    from jax.experimental import multihost_utils

    from engram_jax import data, sharding
    from engram_jax.sharding import MeshConfig
    from train.run import run_preset

    cache = pathlib.Path(args.cache.format(process=args.process_id))
    config = run_preset("tiny").override([*args.set, f"data.cache_dir={cache}"])
    tokenizer = data.shared_tokenizer(config.data)
    compression = data.shared_compression(tokenizer, config.data.cache_root)
    data.check_same_data(config.data, tokenizer, compression)
    hasher = config.model.engram.make_hasher(compression.lookup)
    report = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "devices": jax.device_count(), "local_devices": jax.local_device_count(),
              "tokenizer_sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
              "lookup_sha256": _sha(compression.lookup),
              "cache_folders": sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []}

    # The single-process batches, read by this process alone, against the global ones.
    expected = {split: [_flat(b) for b, _ in zip(data.Pipeline(config.data, tokenizer, hasher, split,
                                                               process_index=0, process_count=1),
                                                 range(TRAIN_BATCHES))]
                for split in data.SPLITS}
    report["meshes"] = {}
    for name, fields in MESHES.items():
        mesh = sharding.make_mesh(MeshConfig(**fields))
        seen = {"process_of_device": np.vectorize(lambda d: d.process_index)(mesh.devices).tolist(),
                "shape": dict(mesh.shape)}
        for split in data.SPLITS:
            iterator = data.Pipeline(config.data, tokenizer, hasher, split).iterator(TRAIN_BATCHES)
            for k, local in enumerate(iterator):
                whole = _flat(multihost_utils.process_allgather(sharding.global_batch(mesh, local), tiled=True))
                single = expected[split][k]
                arrays = {key: {"shape": list(whole[key].shape),
                                "equal": bool(np.array_equal(whole[key], single[key]))}
                          for key in single if key in whole}
                seen[f"{split}/{k}"] = {"keys": sorted(whole), "single_process_keys": sorted(single),
                                        "arrays": arrays}
            iterator.close()
        report["meshes"][name] = seen

    # Another held-out share on process 1: another token stream, which must be refused.
    other = config.data.replace(val_fraction=config.data.val_fraction + 0.1 * jax.process_index())
    try:
        data.check_same_data(other, tokenizer, compression)
        report["mismatch_error"] = None
    except ValueError as err:
        report["mismatch_error"] = str(err)
    pathlib.Path(args.out.format(process=args.process_id)).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
