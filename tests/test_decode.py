"""The decoding engine: cached logits equal a full forward's at every position.

Each setup (attention kind, mHC branches, Engram, table placement) is built once per
module; the prompts in one batch have different lengths, so every check also covers
right padding, per-sequence positions and per-sequence Engram windows.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import decode, hlo, hot_rows, model as model_lib, sharding, table, table_optim
from engram_jax.attention import AttentionConfig
from engram_jax.config_base import ConfigError
from engram_jax.decode import Decoder, SamplingConfig
from engram_jax.engram import EngramConfig
from engram_jax.mhc import MHCConfig
from engram_jax.model import Model, ModelConfig
from engram_jax.moe import MoEConfig

VOCAB = 64
EOD = 63  # never the argmax of these random models' first steps (checked by `finished`)
PROMPTS = [[EOD, 5, 17, 3, 9, 40, 2, 11, 30, 7, 8], [EOD, 12], [EOD, 1, 2, 3, 4, 50]]
NEW = 7
TOLERANCE = 1e-5  # relative to the largest |logit|, float32


def make_config(kind: str, branches: int, engram: bool, placement: str = "device") -> ModelConfig:
    attention = (AttentionConfig(kind="mha", num_heads=4, num_kv_heads=2, head_dim=8) if kind == "mha" else
                 AttentionConfig(kind="mla", num_heads=2, q_lora_rank=8, kv_lora_rank=12, qk_nope_dim=8,
                                 qk_rope_dim=4, v_head_dim=6))
    # Engram at layer 1: blocks 0 and 1 alone, 2..3 a scanned run (its cache scanned too);
    # a conv kernel that is not zero, so its cache matters.
    return ModelConfig(
        vocab_size=VOCAB, hidden_size=16, num_layers=4, attention=attention, mlp_dim=32,
        moe=MoEConfig(num_experts=4, num_shared=1, top_k=2, expert_dim=8), dense_layers=1,
        mhc=MHCConfig(branches=branches),
        engram=EngramConfig(layer_ids=(1,), max_ngram_size=3, heads_per_ngram=2, embed_per_ngram=8,
                            table_sizes=(31, 37), pad_id=0, conv_zero_init=False, placement=placement)
        if engram else None)


def random_variables(config: ModelConfig) -> dict:
    """Variables at init's shapes drawn with NumPy (compiling the initialisers costs ~12 s)."""
    rng = np.random.default_rng(0)

    def draw(x):
        fan_in = x.shape[-2] if x.ndim >= 2 else 1
        return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(fan_in) + (x.ndim == 1), x.dtype)

    return jax.tree.map(draw, nn.unbox(model_lib.variable_shapes(config)))


class Setup:
    def __init__(self, kind, branches, engram, placement="device"):
        self.config = make_config(kind, branches, engram, placement)
        self.variables = random_variables(self.config)
        self.tables = self.rows = self.hasher = None
        if engram:
            mesh = sharding.make_mesh(sharding.MeshConfig())  # the 8 test devices: rows split 8 ways
            self.tables = table.Tables(self.config.engram, mesh, table_optim.RowOptimizer("sgd"))
            self.rows = self.tables.create(jax.random.key(3)).rows
            self.hasher = self.config.engram.make_hasher(np.arange(VOCAB) % 48)  # a real compression
        self.decoder = Decoder(self.config, self.variables, self.tables, self.rows, self.hasher, EOD)

        self._forward = jax.jit(lambda tokens, memory: Model(self.config).apply(self.variables, tokens, memory))

    def full_logits(self, sequences: list[list[int]], shift_window: bool = False) -> np.ndarray:
        """The model on whole sequences at once, rows read by a plain gather: [B, T, V].

        Sequences are right-padded (causal: nothing earlier changes). shift_window: hash
        each position with the window one token earlier (a mistake the checks must catch).
        """
        tokens = np.full((len(sequences), max(map(len, sequences))), EOD, np.int32)
        for b, seq in enumerate(sequences):
            tokens[b, : len(seq)] = seq
        memory = {}
        if self.hasher is not None:
            for layer, ids in self.hasher(tokens).items():
                if shift_window:
                    ids = np.concatenate([ids[:, :1], ids[:, :-1]], 1)
                rows = jnp.asarray(np.asarray(self.rows[table.layer_key(layer)]))
                memory[layer] = table.gather(rows, jnp.asarray(ids), self.config.engram.head_sizes(layer))
        return np.asarray(self._forward(jnp.asarray(tokens), memory))


# MHA and MLA with Engram, one each on host and device tables, with and without mHC;
# one without Engram (its attention path is the same as with it).
SETUPS = {
    "mha-gqa-engram-host": ("mha", 1, True, "host"),
    "mla-mhc-engram-device": ("mla", 2, True, "device"),
    "mha-mhc-no-engram": ("mha", 2, False),
}


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request):
    return Setup(*SETUPS[request.param])


@pytest.fixture(scope="module")
def greedy(setup):
    return setup.decoder.generate(PROMPTS, NEW, return_logits=True)


def _relative(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_cached_logits_equal_full_forward_at_every_position(setup, greedy):
    full = setup.full_logits([p + t for p, t in zip(PROMPTS, greedy.tokens)])  # [B, T, V]
    for b, prompt in enumerate(PROMPTS):
        new = greedy.tokens[b]
        assert len(new) == NEW and not greedy.finished[b]
        n = len(prompt)
        assert _relative(greedy.prompt_logits[b, :n], full[b, :n]) < TOLERANCE, f"prefill of prompt {b}"
        # New token i was drawn from the logits at position n - 1 + i (prefill, then the loop).
        assert _relative(greedy.logits[b], full[b, n - 1: n - 1 + NEW]) < TOLERANCE, f"decode of prompt {b}"
        np.testing.assert_array_equal(np.argmax(full[b, n - 1: n - 1 + NEW], -1), new)


def test_an_off_by_one_hash_window_would_be_caught(setup, greedy):
    if setup.hasher is None:
        pytest.skip("no Engram")
    shifted = setup.full_logits([p + t for p, t in zip(PROMPTS, greedy.tokens)], shift_window=True)
    for b, prompt in enumerate(PROMPTS):
        n = len(prompt)
        assert _relative(greedy.logits[b], shifted[b, n - 1: n - 1 + NEW]) > 100 * TOLERANCE


def test_one_decode_program_per_batch_and_cache_bucket(setup, greedy):
    # Other prompt lengths and counts in the same buckets (batch 4, prompt 16, cache 64): no new program.
    again = setup.decoder.generate([[EOD, 3, 4], [EOD], [EOD, 9, 9, 9, 9]], 5, return_logits=True)
    assert [len(t) for t in again.tokens] == [5, 5, 5] and again.steps == 5
    assert setup.decoder._loop_jit._cache_size() == 1
    assert setup.decoder._prefill_jit._cache_size() == 1


def test_each_sequence_stops_at_its_end_of_document(setup, greedy):
    free = greedy.tokens
    # A token that some prompt first generates mid-way becomes the end-of-document id.
    stop = next(t for seq in free for i, t in enumerate(seq) if i >= 2 and t not in seq[:i])
    cut = {b: free[b].index(stop) if stop in free[b] else NEW for b in range(len(PROMPTS))}
    assert any(2 <= c < NEW for c in cut.values())
    stopping = setup.decoder.generate(PROMPTS, NEW, return_logits=True, eod_id=stop)
    for b in range(len(PROMPTS)):  # each stops at its own first `stop`, the others run on
        assert stopping.tokens[b] == free[b][: cut[b]] and stopping.finished[b] == (cut[b] < NEW)
    assert stopping.steps == max(min(c + 1, NEW) for c in cut.values())


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.3, 0.15]] * 512))  # [B, V]
    key = jax.random.key(0)
    greedy = decode.sample(logits, key, SamplingConfig())
    assert np.all(np.asarray(greedy) == 1)
    drawn = np.asarray(decode.sample(logits, key, SamplingConfig(temperature=1.0)))
    assert set(drawn) == {0, 1, 2, 3}
    top_k = np.asarray(decode.sample(logits, key, SamplingConfig(temperature=1.0, top_k=2)))
    assert set(top_k) == {1, 2}
    top_p = np.asarray(decode.sample(logits, key, SamplingConfig(temperature=1.0, top_p=0.9)))
    assert set(top_p) == {1, 2, 3}  # 0.5 + 0.3 < 0.9: the third most likely is kept, the fourth not
    assert set(np.asarray(decode.sample(logits, key, SamplingConfig(temperature=1.0, top_p=0.4)))) == {1}
    # The fractions follow the renormalised probabilities (0.5 : 0.3 among the top 2).
    assert abs(np.mean(top_k == 1) - 0.5 / 0.8) < 0.07


def test_bad_input_is_named():
    s = Setup("mha", 1, False)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        s.decoder.generate(PROMPTS, 0)
    with pytest.raises(ValueError, match="longer than the cache"):
        s.decoder.generate([[EOD] * 60], 8, cache_length=64)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.decoder.generate([[EOD, VOCAB]], 2)
    with pytest.raises(ValueError, match="empty"):
        s.decoder.generate([[EOD], []], 2)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(temperature=1.0, top_p=0.0)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=1.5)


def test_hot_rows_serve_hits_and_change_no_logit(setup, greedy):
    if setup.tables is None or not setup.tables.host:
        pytest.skip("the hot-row cache is for host tables")
    engram = setup.config.engram
    sequences = [p + t for p, t in zip(PROMPTS, greedy.tokens)]
    counts = hot_rows.count_rows(setup.hasher, [np.asarray(s) for s in sequences], engram)
    hot = hot_rows.HotRows.build(counts, setup.rows, engram, k=24)
    # The lookup alone: equal to the engine's, with hits on a good share of the reads.
    tokens = np.asarray([s[:12] for s in sequences if len(s) >= 12], np.int32)
    ids = {layer: jnp.asarray(v) for layer, v in setup.hasher(tokens).items()}
    want, _ = jax.jit(setup.tables.lookup)(setup.rows, ids)
    lookup = jax.jit(lambda r, h, i: h.lookup(setup.tables, r, i))
    got, reads = lookup(setup.rows, hot, ids)
    for layer in engram.layer_ids:
        np.testing.assert_array_equal(np.asarray(got[layer]), np.asarray(want[layer]))
        rows = hot_rows.global_rows(engram, layer, np.asarray(ids[layer]))
        assert 0.3 < np.isin(rows, np.asarray(hot.ids[table.layer_key(layer)])).mean() < 1
    # The misses are read with buckets sized for them: fewer rows than the engine's lookup.
    full = len(ids) * setup.tables.rows_read(ids[1].size)
    assert hot.miss_share < 1 and int(reads["fallback"]) == 0 and 0 < int(reads["table_rows"]) < full
    # ... in the compiled program: each device gathers shards x C table rows, C the cache's.
    rows = setup.tables.rows_read(ids[1].size, hot.capacity(setup.tables, ids[1].size)) // setup.tables.devices
    text = lookup.lower(setup.rows, hot, ids).compile().as_text()
    gathered = {shape[0] for _, result, op in hlo.instructions(text) if op == "gather"
                for _, shape in hlo.arrays(result) if shape[-1] == engram.head_dim}
    assert rows in gathered and rows < setup.tables.rows_read(ids[1].size) // setup.tables.devices, gathered
    # Misses that overflow a tight read are read again with full buckets: same numbers, counted.
    tight = hot_rows.HotRows.build(counts, setup.rows, engram, k=1, miss_share=1e-3)  # C = 2 ids per bucket
    ids = {layer: jnp.asarray(v) for layer, v in setup.hasher(np.concatenate(sequences)[None]).items()}
    want, _ = jax.jit(setup.tables.lookup)(setup.rows, ids)
    got, reads = lookup(setup.rows, tight, ids)
    for layer in engram.layer_ids:
        np.testing.assert_array_equal(np.asarray(got[layer]), np.asarray(want[layer]))
    assert int(reads["fallback"]) == 1 and int(reads["table_rows"]) > len(ids) * setup.tables.rows_read(ids[1].size)
    # Through the decoder: the same tokens and logits, fewer table rows read.
    out = Decoder(setup.config, setup.variables, setup.tables, setup.rows, setup.hasher, EOD,
                  hot_rows=hot).generate(PROMPTS, NEW, return_logits=True)
    assert out.tokens == greedy.tokens
    assert _relative(out.logits, greedy.logits) < TOLERANCE
    assert 0 < out.table_rows_read < greedy.table_rows_read and greedy.hot_fallbacks == 0


def test_a_hot_row_count_larger_than_the_table_is_named():
    config = make_config("mha", 1, True)
    counts = {1: np.ones(config.engram.table_rows(1), np.int64)}
    rows = {table.layer_key(1): np.zeros((config.engram.table_rows(1), config.engram.head_dim), np.float32)}
    with pytest.raises(ValueError, match="the hot-row count 1,000 is larger than layer 1's table of 152 rows"):
        hot_rows.HotRows.build(counts, rows, config.engram, k=1000)


def test_an_off_by_one_position_would_be_caught(setup, greedy):
    if setup.hasher is not None:
        pytest.skip("checked on the setup without Engram (the cheapest to compile)")
    d = setup.decoder
    tokens = np.zeros((4, 16), np.int32)  # the batch and prompt buckets of `greedy`: no new prefill
    for b, prompt in enumerate(PROMPTS):
        tokens[b, : len(prompt)] = prompt
    lengths = np.asarray([len(p) for p in PROMPTS] + [1], np.int32)
    first, _, _, cache, context, _ = d._prefill_jit(d.variables, d.rows, None, None, tokens, lengths,
                                                 jax.random.fold_in(jax.random.key(0), 0), length=64,
                                                 sampling=SamplingConfig())
    step = jax.jit(d._step)
    for shift, close in ((0, True), (1, False)):  # the first token fed at its position, or one slot later
        logits, *_ = step(d.variables, d.rows, None, None, first, jnp.asarray(lengths + shift), context, cache)
        error = _relative(np.asarray(logits)[:3], greedy.logits[:, 1])
        assert (error < TOLERANCE) if close else (error > 100 * TOLERANCE), (shift, error)
