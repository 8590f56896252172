"""Decoding speed of `tiny`: the KV-cached engine against the prefix rerun it replaced,
and host against device tables. Prints one JSON object per part.

Parts (`--parts`, default all):
- `rerun`: one prompt, greedy, 64 and 256 new tokens (`--new-tokens`): tokens/s of `engram_jax.Decoder`
  against the generation `Trained.generate` did before it (`prefix_rerun` below: the
  whole fixed-length buffer through the model for every new token, the newest token's
  window hashed on the host between device calls). Compilation is left out of both.
  Also the cached engine on a batch of 8 prompts.
- `placement`: decode step time with the tables in device against pinned host memory,
  at 1x and 64x tiny's rows, a batch of 8: (time of 65 new tokens - time of 1) / 64,
  placements interleaved, the median of `--repeats`.

- `hot_rows`: the hot-row cache on real text (the corpus and tokenizer of `tiny`'s run):
  rows counted over the first 2M tokens of the training split, measured on the first
  200k of the validation split: the share of row reads the top K rows serve, and the
  distinct rows per generated token a batch of 8 reads from host memory with and
  without the cache, for K from 64 to 65,536; plotted to `--plot`. Beside them, what
  the compiled decode-step lookup (`HotRows.lookup`, host tables) gathers per token
  over 512 steps of the 8 sequences (its static reads: the misses' bucket, plus the
  full read of a step whose misses overflowed), and how many steps fell back.

- `workload`: the paper's serving workload (Table 4: prompts of lengths uniform over
  [100, 1024]) scaled to this machine: 16 prompts of lengths uniform over [16, 128],
  64 new tokens each, in one batch; tokens/s with device and with host tables
  (interleaved, median of `--repeats`).
- `schedule`: where the host-table reads sit in the compiled decode loop's schedule
  (host tables, batch 8): their positions among the loop body's instructions against
  those of block 0 (before the first Engram layer) and of the first Engram block.

    python benchmarks/bench_decode.py [--parts rerun,placement,hot_rows,schedule] [--repeats 3] [--plot hot_rows.png]

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
ENGINE_STEPS = 512  # decode steps of real text whose compiled lookups the hot_rows part counts


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
    for new in (int(n) for n in args.new_tokens.split(",")):
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


def part_hot_rows(args) -> dict:
    from engram_jax import data, hot_rows
    from engram_jax.compression import compress_tokenizer
    from train.run import run_preset

    run = run_preset("tiny")
    engram = run.model.engram
    tokenizer = data.load_tokenizer(run.data)
    hasher = engram.make_hasher(compress_tokenizer(tokenizer, run.data.cache_root).lookup)
    train = data.tokenize_split(run.data, tokenizer, "train", limit=2_000_000)
    valid = data.tokenize_split(run.data, tokenizer, "validation", limit=200_000)
    chunks = lambda ids: [ids[i: i + 65_536] for i in range(0, ids.size, 65_536)]  # noqa: E731
    calibration = hot_rows.count_rows(hasher, chunks(train), engram)
    evaluation = hot_rows.count_rows(hasher, chunks(valid), engram)
    batch = valid[: valid.size // BATCH * BATCH].reshape(BATCH, -1)[:, :4096]  # 8 sequences being generated
    without = hot_rows.host_rows_read(hasher, batch, engram, None, BATCH)
    sizes = [64, 256, 1024, 4096, 16_384, 65_536]
    rows = {i: engram.table_rows(i) for i in engram.layer_ids}
    # The engine's own reads: the decode step's lookup (hot.lookup, compiled) fed each step's
    # ids of the 8 sequences, host tables; rows it gathers, fallbacks, and its output
    # against the plain lookup's.
    tables = Tables(engram.replace(placement="host", lookup_capacity_factor=0.0),
                    sharding.make_mesh(sharding.MeshConfig()), RowOptimizer("sgd"))
    state_rows = tables.create(jax.random.key(1)).rows
    step_ids = {i: v[:, :ENGINE_STEPS] for i, v in hasher(batch[:, :ENGINE_STEPS]).items()}  # [B, T, H]
    plain = jax.jit(lambda r, i: tables.lookup(r, i)[0])
    engine_lookup = jax.jit(lambda r, h, i: h.lookup(tables, r, i))
    per_step = len(engram.layer_ids) * tables.rows_read(BATCH * engram.num_heads)

    def engine_reads(cache) -> dict:
        read = fallbacks = 0
        for t in range(ENGINE_STEPS):
            ids = {i: jnp.asarray(v[:, t: t + 1]) for i, v in step_ids.items()}
            memory, reads = engine_lookup(state_rows, cache, ids)
            read, fallbacks = read + int(reads["table_rows"]), fallbacks + int(reads["fallback"])
            if t % 64 == 0:  # the cache changes no number
                want = plain(state_rows, ids)
                assert all(np.array_equal(np.asarray(memory[i]), np.asarray(want[i])) for i in want)
        return {"engine_rows_per_token": read / (ENGINE_STEPS * BATCH), "engine_fallback_steps": fallbacks}

    table = []
    for k in sizes:
        hot = {i: np.argsort(-calibration[i], kind="stable")[:k] for i in engram.layer_ids}
        cache = hot_rows.HotRows.build(calibration, state_rows, engram, k)
        table.append({"k": k, "share_of_table": {i: k / rows[i] for i in rows},
                      "hit_rate": hot_rows.hit_rate(evaluation, calibration, k),
                      "host_rows_per_token": hot_rows.host_rows_read(hasher, batch, engram, hot, BATCH),
                      "miss_share": cache.miss_share, **engine_reads(cache)})
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for i in engram.layer_ids:
            ax.plot(sizes, [t["hit_rate"][i] for t in table], marker="o", label=f"layer {i} ({rows[i]:,} rows)")
        ax.set_xscale("log")
        ax.set_xlabel("hot rows K per layer")
        ax.set_ylabel("share of row reads served")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("tiny: hot rows from 2M training tokens, hits on validation")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return {"table_rows": rows, "head_dim": engram.head_dim, "calibration_tokens": int(train.size),
            "evaluation_tokens": int(valid.size), "host_rows_per_token_without_cache": without,
            "engine_rows_per_token_without_cache": per_step / BATCH, "engine_steps": ENGINE_STEPS,
            "bytes_per_row": engram.head_dim * 4, "by_k": table}


def part_schedule(args) -> dict:
    import re

    from engram_jax.decode import SamplingConfig

    setup = Setup(1, "host")
    d = setup.decoder
    prompts = setup.prompts(BATCH)
    tokens, lengths = np.asarray(prompts, np.int32), np.full(BATCH, PROMPT, np.int32)
    first, first_logits, _, cache, context = d._prefill_jit(
        d.variables, d.rows, None, d.hasher, tokens, lengths, jax.random.key(0), length=128, sampling=SamplingConfig())
    text = d._loop_jit.lower(d.variables, d.rows, None, d.hasher, first, first_logits, lengths, np.ones(BATCH, bool),
                             context, cache, jax.random.key(0), np.int32(8), np.int32(setup.eod),
                             sampling=SamplingConfig(), return_logits=False).compile().as_text()
    # Computations, by name; the ones whose instructions compute in host memory.
    bodies = dict(re.findall(r"\n(%?[\w.\-]+) \([^\n]*\{\n(.*?)\n\}", text, flags=re.S))
    on_host = {name.lstrip("%") for name, body in bodies.items() if '_xla_compute_type="host"' in body}
    # The decode step: the largest computation that runs block 0 and block 1 (the loop body).
    step = max((body for body in bodies.values() if "block_0/" in body and "block_1/" in body), key=len)
    ops = step.splitlines()

    def where(pattern):
        return [i for i, line in enumerate(ops) if re.search(pattern, line)]

    host = [i for i, line in enumerate(ops) if any(f"calls=%{c}," in line or f"calls=%{c} " in line or
                                                   line.endswith(f"calls=%{c}") for c in on_host)
            or '_xla_compute_type="host"' in line]
    first_engram = setup.config.engram.layer_ids[0]
    # Attention's and Engram's own instructions (the rest of a block's may be hoisted anywhere).
    spans = {f"block_{i}_attention": where(rf'op_name="[^"]*Model/block_{i}/[^"]*attention/')
             for i in range(setup.config.num_layers)}
    spans[f"block_{first_engram}_engram"] = where(rf'op_name="[^"]*Model/block_{first_engram}/engram/')
    return {"loop_body_instructions": len(ops), "host_table_reads": host, "first_engram_block": first_engram,
            **{k: [v[0], v[-1]] if v else None for k, v in spans.items()},
            "note": "XLA:CPU: host and device memory are one RAM, so no host-to-device copy instruction exists"}


def part_workload(args) -> dict:
    rng = np.random.default_rng(1)
    setups = {p: Setup(1, p) for p in ("device", "host")}
    eod = setups["device"].eod
    lengths = rng.integers(16, 129, 16)
    prompts = [[eod] + rng.integers(0, eod, n - 1).tolist() for n in lengths]
    rates = {p: [] for p in setups}
    for s in setups.values():
        s.decoder.generate(prompts, 64)  # compile
    for _ in range(args.repeats):
        for p, s in setups.items():
            out = s.decoder.generate(prompts, 64)
            rates[p].append(sum(len(t) for t in out.tokens) / out.seconds)
    rate = {p: statistics.median(r) for p, r in rates.items()}
    return {"prompts": len(prompts), "prompt_lengths": [int(n) for n in lengths], "new_tokens": 64,
            "device_tokens_per_s": rate["device"], "host_tokens_per_s": rate["host"],
            "host_over_device_time": rate["device"] / rate["host"]}


PARTS = {"workload": part_workload, "rerun": part_rerun, "placement": part_placement, "hot_rows": part_hot_rows, "schedule": part_schedule}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", default="64,256", help="the rerun part's lengths")
    parser.add_argument("--plot", default="benchmarks/hot_rows.png", help="the hot_rows part's plot ('' for none)")
    args = parser.parse_args()
    machine = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {jax.devices()[0].platform}",
               "jax": jax.__version__}
    for name in args.parts.split(","):
        print(json.dumps({"part": name, **machine, **PARTS[name](args)}), flush=True)


if __name__ == "__main__":
    main()
