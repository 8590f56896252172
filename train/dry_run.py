"""Ahead-of-time fit check: compile a run's train step for a target mesh, allocate nothing.

    engram-train --config engram-27b --dry-run --set mesh.fsdp=8 --set mesh.expert=8 \
        --set mesh.device_memory_gb=80
    engram-train --config engram-27b --dry-run --devices 64 --set mesh.expert=8   # data inferred
    engram-train --config tiny --dry-run --set mesh.fsdp=2 --set mesh.expert=2 \
        --set model.engram.placement=host

The train step is lowered and compiled for `data x fsdp x expert` (x `dcn_data`)
simulated CPU devices with abstract arguments only (`jax.ShapeDtypeStruct`s carrying
their shardings): no parameter, table or batch is allocated, and no tokenizer or data
is read (the batch shape is `data.batch_size x data.seq_len`; token ids stop at
`model.vocab_size`). The report gives per-device bytes of each part of the state (the
sums of its leaves' shard sizes), the compiled program's arguments, outputs, aliased
(donated) buffers and temporaries (`Compiled.memory_analysis()`), its largest buffers,
the collectives' bytes and the compile time, and whether it fits
`mesh.device_memory_gb` (GiB per device).

Devices. Without `--devices N` the device count is the product of the mesh axes, an
axis left at -1 (by default `data`) counting 1; with it, the -1 axis is inferred from
N. The simulated devices are this process's CPU devices when it has enough (a process
that has not started JAX yet gets them through `jax_num_cpu_devices`); otherwise the
dry run runs again in a subprocess (`python -m train.dry_run`, the config as JSON on
its stdin, the report as JSON on its stdout) with `JAX_NUM_CPU_DEVICES=N`.

Exit codes of `engram-train --dry-run`: 0 fits (or no `mesh.device_memory_gb` given),
3 does not fit, 2 bad input (one line on stderr).

Caveats. The numbers are XLA:CPU's buffer assignment for this program: GPU and TPU
compilers fuse, schedule and keep bfloat16 differently, so temporaries there differ
(state bytes do not: they follow the shardings). Host-resident tables
(`model.engram.placement=host`) are counted as host memory, not device memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding

from engram_jax import hlo, sharding
from engram_jax.config_base import ConfigError
from engram_jax.sharding import MeshConfig
from train.run import RunConfig, build_steps

log = logging.getLogger("engram_jax.train")

DOES_NOT_FIT = 3  # exit code of `engram-train --dry-run` when the step does not fit
GIB = 2**30
_HOST_KINDS = ("pinned_host", "unpinned_host")
# State parts of the report, in order: key -> label.
PARTS = {"params": "parameters", "opt_state": "optimizer state (backbone)", "table_rows": "Engram table rows",
         "table_slots": "Engram optimizer slots (per row)", "other_state": "step, MoE balancing biases",
         "batch": "batch"}
# Reports of this process's dry runs by (config without the memory limit, devices).
_MEASURED: dict[tuple[str, int], dict] = {}
# Instructions that name (alias) a buffer rather than fill a new one.
_NOT_BUFFERS = {"parameter", "tuple", "get-tuple-element", "bitcast", "while", "conditional", "call",
                "constant", "after-all", "partition-id", "replica-id", "opt-barrier"}


def num_devices(mesh: MeshConfig, devices: int | None = None) -> int:
    """The simulated device count: `devices`, or the product of the mesh axes (-1 counting 1).

    Raises:
      ValueError: the mesh does not split `devices` (one line).
    """
    if devices is None:
        devices = math.prod(max(size, 1) for size in (mesh.data, mesh.fsdp, mesh.expert)) * mesh.dcn_data
    elif devices < 1:
        raise ValueError(f"--devices must be >= 1, got {devices}")
    mesh.shape(devices)  # raises its one-line error for a mesh that does not match
    return devices


def abstract_batch(config: RunConfig, mesh: jax.sharding.Mesh) -> dict:
    """The batch the train step receives, as ShapeDtypeStructs on the batch sharding.

    `{"inputs", "targets": [B, T], "hash_ids": {layer: [B, T, H]}}` (hash ids only when
    the pipeline hashes, i.e. not `hash_on_device`), plus "segment_ids" and "positions"
    [B, T] with `data.segment_ids`; all int32, as `data.Pipeline` makes them.

    Raises:
      ValueError: the batch does not split evenly over the devices.
    """
    _check_batch(config, mesh.size)
    b, t = config.data.batch_size, config.data.seq_len
    spec = sharding.batch_sharding(mesh)
    tokens = jax.ShapeDtypeStruct((b, t), np.int32, sharding=spec)
    engram = config.model.engram
    hash_ids = {}
    if engram is not None and not engram.hash_on_device:
        hash_ids = {i: jax.ShapeDtypeStruct((b, t, engram.num_heads), np.int32, sharding=spec)
                    for i in engram.layer_ids}
    batch = {"inputs": tokens, "targets": tokens, "hash_ids": hash_ids}
    if config.data.segment_ids:
        batch["segment_ids"] = batch["positions"] = tokens
    return batch


def _check_batch(config: RunConfig, devices: int) -> None:
    if config.data.batch_size % devices:
        raise ValueError(f"data.batch_size = {config.data.batch_size} does not split over the {devices} devices "
                         "of the mesh (the batch is split over every device); use a multiple of it")


def _shard_bytes(leaf: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of `leaf` (its sharding's shard shape)."""
    return math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def _is_host(leaf: jax.ShapeDtypeStruct) -> bool:
    return isinstance(leaf.sharding, NamedSharding) and leaf.sharding.memory_kind in _HOST_KINDS


def part_bytes(state, batch: dict) -> tuple[dict[str, int], dict[str, int]]:
    """Per-device bytes of each state part and of the batch, in device and in host memory.

    Args:
      state: the abstract `TrainState` with shardings (`Steps.abstract_with_sharding`).
      batch: the abstract batch (`abstract_batch`).

    Returns:
      ({part: device bytes}, {part: host bytes}), parts as in `PARTS`.
    """
    trees = {"params": state.params, "opt_state": state.opt_state, "table_rows": state.tables.rows,
             "table_slots": state.tables.slots, "other_state": (state.step, state.moe_bias), "batch": batch}
    device, host = {}, {}
    for part, tree in trees.items():
        leaves = jax.tree.leaves(tree)
        host[part] = sum(_shard_bytes(x) for x in leaves if _is_host(x))
        device[part] = sum(_shard_bytes(x) for x in leaves if not _is_host(x))
    return device, host


def largest_buffers(hlo_text: str, count: int = 5) -> list[dict]:
    """The `count` largest arrays that the per-device program fills, largest first.

    Instructions inside fused computations (never materialised) and those that only
    name another buffer (parameters, tuples, bitcasts) are left out.
    """
    fused = set(re.findall(r"\bfusion\(.*?calls=%?([\w.\-]+)", hlo_text))
    found, skip = [], False
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header:
            skip = header.group(1) in fused
            continue
        if skip:
            continue
        for name, result, opcode in hlo.instructions(line):
            if opcode not in _NOT_BUFFERS:
                parts = hlo.arrays(result)
                kind = re.sub(r"\{[^}]*\}", "", result) if len(parts) == 1 else f"({len(parts)} arrays)"
                found.append({"name": name, "opcode": opcode, "type": kind, "bytes": hlo.nbytes(result)})
    found.sort(key=lambda b: -b["bytes"])
    return found[:count]


def _stand_in_hasher(config: RunConfig):
    """With `hash_on_device`, a device hasher of the right shapes without a tokenizer: the
    identity as the raw -> compressed lookup (the compiled program's shapes and buffers
    are those of the real lookup, which also has `model.vocab_size` entries)."""
    engram = config.model.engram
    if engram is None or not engram.hash_on_device:
        return None
    return engram.make_hasher(np.arange(config.model.vocab_size)).on_device()


def measure(config: RunConfig, devices: list) -> dict:
    """Compiles `config`'s train step on `devices` (abstract arguments) and reads its memory.

    Returns:
      The report (see `dry_run`).
    """
    steps = build_steps(config, _stand_in_hasher(config), devices)
    state = steps.abstract_with_sharding()
    batch = abstract_batch(config, steps.mesh)
    device_bytes, host_bytes = part_bytes(state, batch)
    mesh_shape = dict(steps.mesh.shape)
    log.info("dry run: compiling the train step of %s for %d simulated devices (%s)", config.name,
             len(devices), " x ".join(f"{k} {v}" for k, v in mesh_shape.items()))
    start = time.perf_counter()
    lowered = steps.train_step.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    stats = compiled.memory_analysis()
    text = compiled.as_text()
    # The init: one program for the dense state; the tables are made on the host, shard
    # by shard (`Tables.create`), so at most one shard of host memory is in flight.
    init_stats = steps.init.dense.lower(steps.init.model_rng).compile().memory_analysis()
    init = {name: int(getattr(init_stats, f"{name}_size_in_bytes")) for name in ("temp", "output")}
    init["table_shard_on_host"] = max((_shard_bytes(leaf) for leaf in jax.tree.leaves(state.tables)), default=0)
    memory = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in
              ("argument", "output", "alias", "temp", "generated_code", "host_argument", "host_output",
               "host_alias", "host_temp")}
    engram = config.model.engram
    host_total = sum(host_bytes.values())
    # XLA:CPU counts pinned-host arguments in argument_size (its host_argument_size is
    # 0); a compiler that reports them apart leaves nothing to take off. Donated state
    # comes back aliased, so outputs minus aliases are the other outputs (the metrics).
    host_in_arguments = max(host_total - memory["host_argument"], 0)
    return {
        "config": config.name,
        "devices": len(devices),
        "mesh": mesh_shape,
        "dcn_data": config.mesh.dcn_data,
        "batch": [config.data.batch_size, config.data.seq_len],
        "placement": engram.placement if engram else None,
        "table_rows": {str(i): layout.padded_rows for i, layout in steps.tables.layouts.items()} if engram else {},
        "lower_s": lowered_at - start,
        "compile_s": compiled_at - lowered_at,
        "state_bytes": device_bytes,
        "state_host_bytes": host_bytes,
        "compiled": memory,
        "init": init,
        "device_total": memory["argument"] - host_in_arguments + memory["output"] - memory["alias"] + memory["temp"],
        "host_total": host_total,
        "host_in_arguments": host_in_arguments,
        "largest_buffers": largest_buffers(text),
        "collective_bytes": hlo.collective_bytes(text),
        "collective_traffic": hlo.collective_traffic(text),
    }


def reserve_devices(config: RunConfig, devices: int | None = None) -> None:
    """Gives this process the dry run's CPU devices if JAX has not started yet (else nothing).

    Raises:
      ValueError: the mesh does not match the device count.
    """
    _cpu_devices(num_devices(config.mesh, devices))


def _cpu_devices(count: int) -> list | None:
    """`count` CPU devices of this process, or None when it has fewer.

    A process whose JAX backends have not started yet is given at least `count` CPU
    devices (`jax_num_cpu_devices` can only be set before they start).
    """
    try:
        present = int(os.environ.get("JAX_NUM_CPU_DEVICES") or _flag_device_count() or 1)
        jax.config.update("jax_num_cpu_devices", max(count, present))
    except RuntimeError:
        pass  # backends already started: use what they have
    try:
        cpus = jax.devices("cpu")
    except RuntimeError:  # JAX_PLATFORMS leaves the CPU out
        return None
    return cpus[:count] if len(cpus) >= count else None


def _flag_device_count() -> int | None:
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(match.group(1)) if match else None


def _in_subprocess(config: RunConfig, count: int) -> dict:
    """The dry run in a fresh Python with `count` CPU devices (this one has fewer)."""
    log.info("dry run: this process has %d CPU devices, so a subprocess simulates %d",
             len(jax.devices("cpu")), count)
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(count), "JAX_PLATFORMS": "cpu"}
    request = json.dumps({"config": config.to_dict(), "devices": count})
    # stderr passes through (the compiler's warnings as they come); stdout is the answer.
    done = subprocess.run([sys.executable, "-m", "train.dry_run"], input=request, stdout=subprocess.PIPE,
                          text=True, env=env, check=False)
    lines = done.stdout.strip().splitlines()
    answer = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if "error" in answer:
        raise ValueError(answer["error"])
    if done.returncode != 0 or not answer:
        why = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
        raise RuntimeError(f"the dry run's subprocess ({count} CPU devices) failed: {why}; see its errors above")
    return answer


def dry_run(config: RunConfig, devices: int | None = None, *, spawn: bool = True) -> dict:
    """Compiles `config`'s train step for its mesh on simulated devices and reports its memory.

    Nothing is allocated: the arguments are abstract, and no tokenizer or data is read.
    Measurements are kept for the process's lifetime: asking again with another
    `mesh.device_memory_gb` does not compile again.

    Args:
      config: the run.
      devices: how many devices to simulate; default the product of the mesh axes (an
        axis at -1 counting 1).
      spawn: run in a subprocess when this process has too few CPU devices (else raise).

    Returns:
      A JSON-ready dict: `devices`, `mesh` {axis: size}, `batch` [B, T], `placement`,
      `lower_s` and `compile_s`; per-device bytes `state_bytes` and `state_host_bytes`
      ({part: bytes}, parts as in `PARTS`); `compiled` (the compiled program's
      argument, output, alias, temp and host sizes); `init` (the compiled init of the
      dense state: `temp` and `output` bytes per device; `table_shard_on_host`: the
      largest table shard, drawn on the host); `device_total` (arguments +
      outputs - aliased + temporaries); `host_total`; `device_memory` (the limit, 0 if
      none); `largest_buffers`; `collective_bytes` and `collective_traffic` per step.

    Raises:
      ValueError: the mesh does not match the device count, or the batch does not split.
    """
    count = num_devices(config.mesh, devices)
    _check_batch(config, count)
    # The memory limit only decides the verdict: a measurement serves every limit.
    key = (json.dumps(config.replace(mesh=config.mesh.replace(device_memory_gb=0.0)).to_dict(), sort_keys=True),
           count)
    if key not in _MEASURED:
        cpus = _cpu_devices(count)
        if cpus is not None:
            _MEASURED[key] = measure(config, cpus)
        elif spawn:
            _MEASURED[key] = _in_subprocess(config, count)
        else:
            raise RuntimeError(f"this process has {len(jax.devices('cpu'))} CPU devices, fewer than {count}")
    return {**_MEASURED[key], "device_memory": int(config.mesh.device_memory_gb * GIB)}


def fits(report: dict) -> bool | None:
    """Whether the step fits the device memory (None when no limit was given)."""
    return None if not report["device_memory"] else report["device_total"] <= report["device_memory"]


def _size(n: int) -> str:
    """Bytes in GiB, or in MiB below 1 GiB."""
    return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / 2**20:,.1f} MiB"


def format_report(report: dict) -> str:
    """The report as lines of text."""
    mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
    b, t = report["batch"]
    dcn = f" ({report['dcn_data']} DCN replicas)" if report["dcn_data"] > 1 else ""
    lines = [f"dry run of {report['config']}: {report['devices']} simulated devices, mesh {mesh}{dcn}",
             (f"batch {b} x {t} tokens ({b // report['devices']} x {t} per device); lowered in "
              f"{report['lower_s']:.1f} s, compiled in {report['compile_s']:.1f} s"),
             f"{'per device':<40}{'device':>14}{'host':>14}"]
    dev, host = report["state_bytes"], report["state_host_bytes"]
    for part, label in PARTS.items():
        if dev[part] or host[part] or part in ("params", "opt_state"):
            lines.append(f"  {label:<38}{_size(dev[part]):>14}{_size(host[part]) if host[part] else '':>14}")
    c = report["compiled"]
    host_total = _size(report["host_total"]) if report["host_total"] else ""
    of_host = f" with {_size(report['host_in_arguments'])} of host memory" if report["host_in_arguments"] else ""
    lines += [f"  {'temporaries':<38}{_size(c['temp']):>14}{_size(c['host_temp']) if c['host_temp'] else '':>14}",
              f"  {'outputs not aliased to the state':<38}{_size(c['output'] - c['alias']):>14}",
              f"  {'total':<38}{_size(report['device_total']):>14}{host_total:>14}",
              (f"  (compiled program: arguments {_size(c['argument'])}{of_host}, outputs {_size(c['output'])}, "
               f"aliased {_size(c['alias'])}, temporaries {_size(c['temp'])})")]
    init = report["init"]
    lines.append(f"init: the dense state by one program ({_size(init['output'])} out, {_size(init['temp'])} "
                 "temporaries per device)" + (f"; tables drawn on the host shard by shard (largest shard "
                                              f"{_size(init['table_shard_on_host'])}), no device temporaries"
                                              if report["placement"] else ""))
    if report["placement"]:
        rows = sum(report["table_rows"].values())
        tables = f"Engram tables ({len(report['table_rows'])} layers, {rows:,} rows with padding):"
        if report["placement"] == "host":
            lines.append(f"{tables} in pinned host memory, {_size(report['host_total'])} per device of host RAM "
                         "(not device memory: not in the device total)")
        else:
            lines.append(f"{tables} in device memory, {_size(dev['table_rows'] + dev['table_slots'])} per device "
                         "(rows and optimizer slots, in the device total)")
    lines.append("largest buffers: " + "; ".join(f"{b['opcode']} {b['type']} {_size(b['bytes'])}"
                                                 for b in report["largest_buffers"]))
    if report["collective_bytes"]:
        lines.append("collectives per device per step (result bytes): " + ", ".join(
            f"{k} {_size(v)}" for k, v in sorted(report["collective_bytes"].items())))
    verdict = fits(report)
    if verdict is None:
        lines.append("fit: no device memory given (--set mesh.device_memory_gb=80 to check)")
    else:
        limit, total = report["device_memory"], report["device_total"]
        lines.append(f"fit: {'fits' if verdict else 'DOES NOT FIT'} in {_size(limit)} per device "
                     f"({_size(abs(limit - total))} {'to spare' if verdict else 'over'}; XLA:CPU's buffer "
                     "assignment, an estimate for GPU/TPU)")
    return "\n".join(lines)


def dry_run_main(config: RunConfig, devices: int | None = None) -> int:
    """`engram-train --dry-run`: prints the report; returns 0 if it fits (or no limit), else 3."""
    report = dry_run(config, devices)
    print(format_report(report), flush=True)
    return DOES_NOT_FIT if fits(report) is False else 0


def _child() -> int:
    """`python -m train.dry_run`: the request as JSON on stdin, the report (or {"error": one
    line}) as JSON on the last line of stdout."""
    try:
        request = json.loads(sys.stdin.read())
        report = dry_run(RunConfig.from_dict(request["config"]), request["devices"], spawn=False)
    except (ConfigError, ValueError, KeyError) as err:  # bad input: one line, in the parent
        print(json.dumps({"error": err.args[0] if isinstance(err, KeyError) and err.args else str(err)}))
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(_child())
