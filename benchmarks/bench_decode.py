"""Decoding speed of `tiny`: the KV-cached engine against the prefix rerun it replaced,
and host against device tables. Prints one JSON object per part.

Parts (`--parts`, default all):
- `rerun`: one prompt, greedy, 64 and 256 new tokens: tokens/s of `engram_jax.Decoder`
  against the generation `Trained.generate` did before it (`prefix_rerun` below: the
  whole fixed-length buffer through the model for every new token, the newest token's
  window hashed on the host between device calls). Compilation is left out of both.
  Also the cached engine on a batch of 8 prompts.
- `placement`: decode step time with the tables in device against pinned host memory,
  at 1x and 64x tiny's rows, a batch of 8: (time of 65 new tokens - time of 1) / 64,
  placements interleaved, the median of `--repeats`.

    python benchmarks/bench_decode.py [--parts rerun,placement] [--repeats 3]

Weights are random (speed does not depend on them); the end-of-document id is set to
an id the runs are checked not to produce early, so every run makes all its tokens. On
CPU the host and device memories are the same RAM: a host/device ratio near 1 shows
that host placement adds no work, not what a PCIe copy costs on an accelerator.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import configs, model as model_lib, sharding, training
from engram_jax.decode import Decoder
from engram_jax.model import Model
from engram_jax.table import Tables
from engram_jax.table_optim import RowOptimizer

PROMPT = 32  # prompt tokens
BATCH = 8


def tiny(scale: int = 1, placement: str = "device"):
    base = configs.get("tiny")
    engram = base.engram.replace(table_sizes=tuple(s * scale for s in base.engram.table_sizes), placement=placement)
    return base.replace(engram=engram)


class Setup:
    """tiny with random variables, tables and an identity compression."""

    def __init__(self, scale: int = 1, placement: str = "device"):
        self.config = tiny(scale, placement)
        self.variables = model_lib.init_variables(self.config, jax.random.key(0))
        mesh = sharding.make_mesh(sharding.MeshConfig())
        self.tables = Tables(self.config.engram, mesh, RowOptimizer("sgd"))
        self.rows = self.tables.create(jax.random.key(1)).rows
        self.hasher = self.config.engram.make_hasher(np.arange(self.config.vocab_size))
        self.eod = self.config.vocab_size - 1
        self.decoder = Decoder(self.config, self.variables, self.tables, self.rows, self.hasher, self.eod)

    def prompts(self, n: int) -> list[list[int]]:
        rng = np.random.default_rng(0)
        return [[self.eod] + rng.integers(0, self.eod, PROMPT - 1).tolist() for _ in range(n)]

    def cached(self, prompts, new: int) -> tuple[float, int]:
        """Seconds of one warm `Decoder.generate` and the tokens it made."""
        self.decoder.generate(prompts, new)  # compiles (same buckets as the timed call)
        out = self.decoder.generate(prompts, new)
        return out.seconds, sum(len(t) for t in out.tokens)


def prefix_rerun(setup: Setup, prompt: list[int], new: int) -> tuple[float, int]:
    """The generation of `Trained.generate` before the engine (commit d6501b8), greedy:
    a fixed-length buffer rerun whole for each new token. Returns (seconds without the
    compilation, tokens made)."""
    tokens = list(prompt)
    length = len(tokens) + new
    buffer = np.zeros((1, length), np.int32)
    buffer[0, : len(tokens)] = tokens
    hash_ids = {k: np.concatenate([v, np.zeros((1, new, v.shape[-1]), v.dtype)], 1)
                for k, v in setup.hasher(buffer[:, : len(tokens)]).items()}

    def apply(t, h):
        memory, _ = training.lookup(setup.tables, setup.rows, {"hash_ids": h})
        return Model(setup.config).apply(setup.variables, t, memory)

    logits_at = jax.jit(lambda t, h, i: apply(t, h)[0, i])
    jax.block_until_ready(logits_at(buffer, hash_ids, len(tokens) - 1))  # compile
    n = setup.config.engram.max_ngram_size
    start = time.perf_counter()
    made = 0
    for position in range(len(tokens), length):
        token = int(jnp.argmax(logits_at(buffer, hash_ids, position - 1)))
        if token == setup.eod:
            break
        tokens.append(token)
        made += 1
        buffer[0, position] = token
        window = np.asarray(tokens[max(0, position - n + 1): position + 1])[None]
        for layer, ids in setup.hasher(window).items():
            hash_ids[layer][0, position] = ids[0, -1]
    return time.perf_counter() - start, made


def part_rerun(args) -> dict:
    setup = Setup()
    out = {}
    for new in (64, 256):
        prompt = setup.prompts(1)
        rerun_s, rerun_n = prefix_rerun(setup, prompt[0], new)
        cached_s, cached_n = setup.cached(prompt, new)
        batch_s, batch_n = setup.cached(setup.prompts(BATCH), new)
        out[f"new_{new}"] = {
            "prefix_rerun_tokens_per_s": rerun_n / rerun_s, "prefix_rerun_tokens": rerun_n,
            "cached_tokens_per_s": cached_n / cached_s, "cached_tokens": cached_n,
            "speedup": (cached_n / cached_s) / (rerun_n / rerun_s),
            f"cached_batch{BATCH}_tokens_per_s": batch_n / batch_s, f"cached_batch{BATCH}_tokens": batch_n,
        }
    return out


def part_placement(args) -> dict:
    out = {}
    for scale in (1, 64):
        setups = {p: Setup(scale, p) for p in ("device", "host")}
        prompts = setups["device"].prompts(BATCH)
        times = {p: [] for p in setups}
        for s in setups.values():  # compile both buckets first
            s.cached(prompts, 65), s.cached(prompts, 1)
        for _ in range(args.repeats):
            for p, s in setups.items():
                long_s, long_n = s.cached(prompts, 65)
                short_s, _ = s.cached(prompts, 1)
                assert long_n == 65 * BATCH, "a sequence stopped early"
                times[p].append((long_s - short_s) / 64)
        step = {p: statistics.median(t) for p, t in times.items()}
        out[f"rows_{scale}x"] = {"table_rows": sum(setups["device"].config.engram.table_rows(i)
                                                   for i in setups["device"].config.engram.layer_ids),
                                 "device_step_ms": 1e3 * step["device"], "host_step_ms": 1e3 * step["host"],
                                 "host_over_device": step["host"] / step["device"]}
        del setups
    return out


PARTS = {"rerun": part_rerun, "placement": part_placement}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    machine = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {jax.devices()[0].platform}",
               "jax": jax.__version__}
    for name in args.parts.split(","):
        print(json.dumps({"part": name, **machine, **PARTS[name](args)}), flush=True)


if __name__ == "__main__":
    main()
