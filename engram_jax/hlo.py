"""Reading a compiled program: the evidence behind a sharding or memory claim.

`jax.jit(f).lower(*abstract_args).compile()` allocates nothing; its `as_text()` is the
partitioned, scheduled HLO of one device. These helpers read what moves between
devices (collectives and their bytes), which buffers exist, and where they live.
"""

from __future__ import annotations

import re
from collections import Counter

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8}
# "%name = f32[8,16]{1,0} all-gather(...)" or a tuple "(f32[8]{0}, s32[8]{0}) all-to-all(...)"
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")


def instructions(hlo_text: str) -> list[tuple[str, str, str]]:
    """(name, result type, opcode) of every instruction, in program order."""
    found = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            found.append(match.groups())
    return found


def arrays(result_type: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of each array in an instruction's result type."""
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(result_type)]


def nbytes(result_type: str) -> int:
    """Bytes of an instruction's result (all arrays of a tuple)."""
    total = 0
    for dtype, shape in arrays(result_type):
        size = _BYTES.get(dtype, 4)
        for d in shape:
            size *= d
        total += size
    return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of the results of each kind of collective (async `-start` forms included;
    their `-done` halves are not counted again)."""
    out: Counter = Counter()
    for _, result, opcode in instructions(hlo_text):
        kind = opcode.removesuffix("-start")
        if kind in COLLECTIVES:
            out[kind] += nbytes(result)
    return dict(out)


def _group_size(line: str, devices: int) -> int:
    """Devices in one replica group of a collective; `devices` (all of them, an upper
    bound) where the group is not spelled out as a list."""
    groups = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if groups:
        return len(groups.group(1).split(","))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    return int(iota.group(2)) if iota else devices


def collective_traffic(hlo_text: str) -> dict[str, int]:
    """Bytes each device sends per kind of collective, from the result sizes and the
    replica group size g: all-gather and all-to-all (g - 1) / g of their result,
    reduce-scatter (g - 1) x its result, all-reduce 2 (g - 1) / g (a ring), a
    collective-permute its result. Groups that the HLO writes in a compressed mesh
    form count as all devices (an upper bound)."""
    partitions = re.search(r"num_partitions=(\d+)", hlo_text)
    devices = int(partitions.group(1)) if partitions else 1
    factors = {"all-gather": lambda g: (g - 1) / g, "all-to-all": lambda g: (g - 1) / g,
               "reduce-scatter": lambda g: g - 1, "all-reduce": lambda g: 2 * (g - 1) / g,
               "collective-permute": lambda g: 1}
    out: Counter = Counter()
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        kind = match.group(3).removesuffix("-start")
        if kind in factors:
            out[kind] += round(nbytes(match.group(2)) * factors[kind](_group_size(line, devices)))
    return dict(out)


def buffers_of_shape(hlo_text: str, shapes: set[tuple[int, ...]]) -> Counter:
    """Counts, per opcode, the instructions whose result holds an array of one of `shapes`."""
    out: Counter = Counter()
    for _, result, opcode in instructions(hlo_text):
        if any(shape in shapes for _, shape in arrays(result)):
            out[opcode] += 1
    return out


def schedule_position(hlo_text: str, opcode_pattern: str) -> list[int]:
    """Positions (0-based, in the entry computation's schedule) of matching instructions."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    ops = instructions(entry)
    return [i for i, (_, _, opcode) in enumerate(ops) if re.fullmatch(opcode_pattern, opcode)]
