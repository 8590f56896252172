"""Batched, KV-cached generation with Engram read through the table engine.

    engine = Decoder(model_config, variables, tables, rows, hasher, eod_id)
    out = engine.generate([[eod, 17, 4], [eod, 9]], max_new_tokens=64,
                          sampling=SamplingConfig(temperature=0.8, top_p=0.95))
    out.tokens      # per prompt: the new ids, up to (not including) the end-of-document id

Two jitted programs per call, no host round trip per token:

1. **Prefill** (one compilation per (batch, prompt-bucket, cache-length)): the prompts,
   right-padded to a bucket of P tokens, run through `Model` with an empty cache at
   positions 0..P-1; every layer writes its keys (MHA/GQA: rotated keys and values;
   MLA: the latent c_kv and the shared rotary key) and its Engram short-conv inputs at
   their positions. The first new token of prompt b is sampled from the logits at its
   last position L_b - 1. Padding past L_b writes slots >= L_b, which each sequence
   overwrites with its own token before any query can see them (a query at position p
   sees slots <= p only).
2. **Decode loop** (one compilation per (batch, cache-length) bucket): a
   `lax.while_loop` that feeds each sequence's newest token at its own position,
   hashes the Engram window from it and the N - 1 tokens before it
   (`DeviceHasher.step`, carried context), reads the rows through `Tables.lookup`
   (device or host placement, the training engine), runs one cached step of the model
   and samples. A sequence that samples the end-of-document id is done; the loop ends
   when every sequence is done or max_new_tokens are out.

The rows of a step are looked up at the start of the step, before the blocks; the
blocks ahead of the first Engram layer do not depend on them, so a scheduler is free to
overlap the copy from host memory with them. Where XLA:CPU puts them is in
benchmarks/RESULTS.md (after block 0); on an accelerator it is not measured.

Shapes: B batch, P prompt bucket, S cache length (slots), V vocabulary, H hash heads.
mHC needs no decoding state (its maps read only the current token's stream); MoE
routes each token alone.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import model as model_lib
from engram_jax.config_base import Config
from engram_jax.hashing_device import DeviceHasher
from engram_jax.model import Model, ModelConfig

# Smallest prompt bucket and cache length: below these, rounding up to a power of two
# would compile a new program for every few tokens of prompt.
_MIN_PROMPT_BUCKET = 16
_MIN_CACHE = 64


@dataclasses.dataclass(frozen=True)
class SamplingConfig(Config):
    """How the next token is chosen from the logits.

    Attributes:
      temperature: 0 is greedy (argmax); else logits are divided by it and sampled.
      top_k: keep the k most likely tokens (0: all).
      top_p: keep the smallest set of most likely tokens whose probability reaches
        top_p (nucleus sampling; 1: all). In (0, 1].
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> None:
        self.check(self.temperature >= 0, "temperature", "must be >= 0 (0 is greedy)")
        self.check(self.top_k >= 0, "top_k", "must be >= 0 (0 keeps every token)")
        self.check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")


def sample(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next tokens int32 [B] from float logits [B, V]."""
    chex.assert_rank(logits, 2)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] most likely first
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        kept = jnp.where(before < sampling.top_p, ordered, jnp.inf)  # the most likely always stays
        threshold = jnp.min(kept, axis=-1, keepdims=True)  # [B, 1]
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
    """What `Decoder.generate` returns, one entry per prompt.

    Attributes:
      tokens: the new ids of each prompt, up to and not including the end-of-document id.
      finished: whether the prompt's generation ended with the end-of-document id.
      steps: new-token positions filled for the batch: 1 (the prefill's token) plus the
        decode loop's iterations.
      seconds: wall time of the call, from the host's prompts to the host's new ids
        (compilation included when the call compiled a program: `Decoder.programs`).
      logits: with `return_logits`, float32 [B, M, V]: row b, column i is the
        distribution new token i of prompt b was drawn from (M = max_new_tokens; rows
        past a prompt's end hold what the loop computed for its padding).
      prompt_logits: with `return_logits`, float32 [B, P, V] of the prefill (position
        t predicts token t + 1; positions past a prompt's length are padding).
      table_rows_read: row slots the compiled programs gathered from the Engram tables
        (host memory with host placement), prefill and decode, over layers and the
        batch bucket: bytes = this x the row width x the table's itemsize.
      hot_fallbacks: programs (the prefill, decode steps) whose hot-row misses did not
        fit the cache's table read and were read again with full buckets.
    """

    tokens: list[list[int]]
    finished: list[bool]
    steps: int
    seconds: float
    logits: np.ndarray | None = None
    prompt_logits: np.ndarray | None = None
    table_rows_read: int = 0
    hot_fallbacks: int = 0


def _bucket(n: int, smallest: int) -> int:
    """The smallest power of two >= max(n, smallest)."""
    return max(smallest, 1 << max(0, n - 1).bit_length())


class Decoder:
    """Generates from a trained model: KV-cached, batched, Engram rows from `tables`.

    Args:
      config: the model config.
      variables: the model's variables (`params`, and `moe_bias` with MoE).
      tables: the table engine (`table.Tables`) with Engram, else None. Its placement
        (device or host memory) decides where rows are read; lookups never drop ids
        (the engine is rebuilt with `lookup_capacity_factor=0` if needed).
      rows: `TableState.rows` of the tables ({} without Engram).
      hasher: the run's `NgramHasher` (or its `DeviceHasher`) with Engram, else None.
      eod_id: the end-of-document id: a sequence that samples it stops.
      hot_rows: a `hot_rows.HotRows` cache: hits read from it (device memory), only the
        misses through `tables`; None reads every row through `tables`.
      engram_off: Engram layer ids whose output is zeroed (`Model.engram_off`).
    """

    def __init__(self, config: ModelConfig, variables: dict, tables=None, rows=None, hasher=None,
                 eod_id: int = 0, hot_rows=None, engram_off: tuple[int, ...] = ()):
        if (config.engram is None) != (tables is None) or (config.engram is None) != (hasher is None):
            raise ValueError("a model with Engram needs its tables and hasher, one without needs neither")
        if tables is not None and tables.config.lookup_capacity_factor != 0:
            from engram_jax.table import Tables  # a table engine that never drops an id

            tables = Tables(dataclasses.replace(tables.config, lookup_capacity_factor=0.0), tables.mesh,
                            tables.optimizer, tables.shard_axes)
        self.config, self.variables, self.tables = config, variables, tables
        self.rows = rows if rows is not None else {}
        self.hasher = hasher if hasher is None or isinstance(hasher, DeviceHasher) else hasher.on_device()
        self.eod_id = eod_id
        self.hot_rows = hot_rows
        self._model = Model(config, engram_off=tuple(engram_off))

    # ------------------------------------------------------------------ pieces

    def empty_cache(self, batch: int, length: int) -> dict:
        """A zero cache (`model.cache_shapes`) for `batch` sequences of `length` slots."""
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), model_lib.cache_shapes(self.config, batch, length))

    def _memory(self, rows, hot, hash_ids: dict) -> tuple[dict, jax.Array, jax.Array]:
        """`{layer: [B, T, H]}` hash ids -> (`{layer: [B, T, d_mem]}` rows via the table
        engine and the hot-row cache `hot`, when there is one; row slots gathered from
        the tables; 1 if the hot-row cache's misses did not fit its read)."""
        if self.tables is None:
            return {}, jnp.int32(0), jnp.int32(0)
        if hot is not None:
            memory, reads = hot.lookup(self.tables, rows, hash_ids, jnp.float32)
            return memory, reads["table_rows"], reads["fallback"]
        memory, _ = self.tables.lookup(rows, hash_ids, jnp.float32)
        slots = next(iter(hash_ids.values())).size
        return memory, jnp.int32(len(hash_ids) * self.tables.rows_read(slots)), jnp.int32(0)

    def _prefill(self, variables, rows, hot, hasher, tokens, lengths, key, *, length: int, sampling: SamplingConfig):
        """Prompts [B, P] (right-padded), lengths [B] -> (first new tokens [B], their logits
        [B, V], the prefill's logits [B, P, V], cache, Engram context [B, N - 1], reads
        [2]: table row slots gathered and hot-row fallbacks)."""
        b, p = tokens.shape
        hash_ids = hasher(tokens) if hasher is not None else {}  # {layer: [B, P, H]}
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))  # [B, P]
        memory, read, fallback = self._memory(rows, hot, hash_ids)
        logits, cache = self._model.apply(variables, tokens, memory, positions=positions,
                                          cache=self.empty_cache(b, length))  # [B, P, V]
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
        context = None
        if hasher is not None:  # raw ids of positions L_b - N + 1 .. L_b - 1, pad-filled before 0
            lead = hasher.max_ngram_size - 1
            padded = jnp.concatenate([jnp.full((b, lead), hasher.pad_id, jnp.int32), tokens], 1)  # [B, N - 1 + P]
            context = jnp.take_along_axis(padded, lengths[:, None] + jnp.arange(lead)[None], axis=1)  # [B, N - 1]
        return sample(last, key, sampling), last, logits, cache, context, jnp.stack([read, fallback])

    def _step(self, variables, rows, hot, hasher, token, position, context, cache):
        """One cached step: token [B] at position [B] -> (logits [B, V], cache, context,
        reads [2]: table row slots gathered, hot-row fallback)."""
        hash_ids = {}
        if hasher is not None:
            step_ids, context = hasher.step(context, token)  # {layer: [B, H]}
            hash_ids = {layer: ids[:, None] for layer, ids in step_ids.items()}  # [B, 1, H]
        memory, read, fallback = self._memory(rows, hot, hash_ids)
        logits, cache = self._model.apply(variables, token[:, None], memory,
                                          positions=position[:, None], cache=cache)  # [B, 1, V]
        return logits[:, 0], cache, context, jnp.stack([read, fallback])

    def _loop(self, variables, rows, hot, hasher, first, first_logits, lengths, active, context, cache, key,
              max_new_tokens, eod_id, *, sampling: SamplingConfig, return_logits: bool):
        """The decode loop from the first new tokens [B]: (tokens [B, S], steps, logits,
        reads [2] summed over the steps)."""
        b = first.shape[0]
        s = self._cache_length(cache)
        out = jnp.zeros((b, s), jnp.int32).at[:, 0].set(first)  # [B, S]; at most S new tokens
        kept = (jnp.zeros((b, s, self.config.vocab_size), jnp.float32).at[:, 0].set(first_logits)
                if return_logits else jnp.zeros((), jnp.float32))
        done = (first == eod_id) | ~active

        def cond(state):
            i, _, _, done, *_ = state
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(state):
            i, token, position, done, context, cache, out, kept, reads = state
            logits, cache, context, read = self._step(variables, rows, hot, hasher, token, position, context, cache)
            nxt = jnp.where(done, eod_id, sample(logits, jax.random.fold_in(key, i), sampling))
            out = out.at[:, i].set(nxt)
            if return_logits:
                kept = kept.at[:, i].set(logits)
            return i + 1, nxt, position + 1, done | (nxt == eod_id), context, cache, out, kept, reads + read

        state = (jnp.int32(1), first, lengths, done, context, cache, out, kept, jnp.zeros((2,), jnp.int32))
        steps, *_, out, kept, reads = jax.lax.while_loop(cond, body, state)
        return out, steps, kept, reads

    @staticmethod
    def _cache_length(cache: dict) -> int:
        """S, from any attention cache array ([B, S, ...], or [L, B, S, ...] when stacked)."""
        for name, module in cache.items():
            leaf = jax.tree.leaves(module["attention"])[0]
            return leaf.shape[2] if name.startswith("blocks_") else leaf.shape[1]
        raise ValueError("empty cache")

    def programs(self) -> int:
        """How many prefill and decode programs have been compiled (one per bucket)."""
        return self._prefill_jit._cache_size() + self._loop_jit._cache_size()

    @functools.cached_property
    def _prefill_jit(self):
        return jax.jit(self._prefill, static_argnames=("length", "sampling"))

    @functools.cached_property
    def _loop_jit(self):
        return jax.jit(self._loop, static_argnames=("sampling", "return_logits"))

    # ------------------------------------------------------------------ generate

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0, cache_length: int | None = None,
                 return_logits: bool = False, eod_id: int | None = None) -> Generation:
        """Continues each prompt by up to `max_new_tokens` ids, all prompts at once.

        Args:
          prompts: raw token ids per prompt (each non-empty; training starts documents
            after an end-of-document id, so a prompt usually starts with one).
          max_new_tokens: at most this many new ids per prompt, >= 1.
          sampling: greedy, temperature, top-k, top-p.
          seed: the PRNG seed of sampling (step i of the loop uses fold_in(key, i)).
          cache_length: S, slots per sequence; None: the smallest power of two (>= 64)
            that holds the longest prompt and its new tokens. Programs compile once per
            (batch bucket, S) and prompt bucket.
          return_logits: also return the logits (for tests; [B, S, V] more memory).
          eod_id: the id that ends a sequence; None: the decoder's (a runtime value:
            changing it compiles nothing).

        Returns:
          A `Generation`.

        Raises:
          ValueError: an empty prompt, max_new_tokens < 1, a prompt (with its new tokens)
            longer than the cache, or an id outside the vocabulary (one line).
        """
        start = time.perf_counter()
        if not prompts:
            raise ValueError("no prompts to generate from")
        eod_id = self.eod_id if eod_id is None else eod_id
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0 <= eod_id < self.config.vocab_size:
            raise ValueError(f"eod_id {eod_id} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} is empty")
        bad = [t for p in prompts for t in p if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        need = max(lengths) + max_new_tokens - 1  # slots up to the last fed token's position
        length = cache_length or _bucket(need, _MIN_CACHE)
        if need > length:
            raise ValueError(f"a prompt of {max(lengths)} tokens and {max_new_tokens} new tokens need a cache of "
                             f"{need} slots, longer than the cache's {length}")
        if max_new_tokens > length:
            raise ValueError(f"max_new_tokens {max_new_tokens} is more than the cache's {length} slots")
        b = _bucket(len(prompts), 1)  # batch bucket: padding rows are inactive
        p = min(_bucket(max(lengths), _MIN_PROMPT_BUCKET), length)
        tokens = np.zeros((b, p), np.int32)
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)] = prompt
        padded_lengths = np.asarray(lengths + [1] * (b - len(prompts)), np.int32)
        active = np.arange(b) < len(prompts)
        key = jax.random.key(seed)
        first, first_logits, prompt_logits, cache, context, prefill_reads = self._prefill_jit(
            self.variables, self.rows, self.hot_rows, self.hasher, tokens, padded_lengths, jax.random.fold_in(key, 0),
            length=length, sampling=sampling)
        out, steps, kept, reads = self._loop_jit(
            self.variables, self.rows, self.hot_rows, self.hasher, first, first_logits, padded_lengths, active, context,
            cache, key, np.int32(max_new_tokens), np.int32(eod_id), sampling=sampling, return_logits=return_logits)
        out, steps = np.asarray(out), int(steps)
        table_rows, fallbacks = (np.asarray(prefill_reads) + np.asarray(reads)).tolist()
        new, finished = [], []
        for row in out[: len(prompts), :steps]:
            ends = np.flatnonzero(row == eod_id)
            new.append(row[: ends[0]].tolist() if ends.size else row.tolist())
            finished.append(bool(ends.size))
        logits = np.asarray(kept)[: len(prompts), :max_new_tokens] if return_logits else None
        return Generation(new, finished, steps, time.perf_counter() - start, logits,
                          np.asarray(prompt_logits)[: len(prompts)] if return_logits else None,
                          table_rows, fallbacks)
