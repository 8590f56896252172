"""The backbone: causality, mHC = plain residual at M = 1, jit + grad, accounting."""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import model as model_lib
from engram_jax import table
from engram_jax.attention import Attention, AttentionConfig
from engram_jax.engram import EngramConfig
from engram_jax.mhc import MHCConfig
from engram_jax.mlp import MLP
from engram_jax.model import Block, Model, ModelConfig
from engram_jax.moe import MoEConfig


def tiny_config(branches=4, engram=True, **overrides) -> ModelConfig:
    return ModelConfig(
        vocab_size=64, hidden_size=16, num_layers=3,
        attention=AttentionConfig(num_heads=2, head_dim=8), mlp_dim=32,
        moe=MoEConfig(num_experts=4, num_shared=1, top_k=2, expert_dim=8), dense_layers=1,
        mhc=MHCConfig(branches=branches),
        engram=EngramConfig(layer_ids=(0, 2), max_ngram_size=3, heads_per_ngram=2, embed_per_ngram=8,
                            table_sizes=(31, 37), pad_id=0, conv_zero_init=False) if engram else None,
    ).replace(**overrides)


def inputs(config, tokens):
    """Tokens and the memory vectors of their hash ids, read from NumPy-drawn tables."""
    memory = {}
    if config.engram is not None:
        e = config.engram
        hasher = e.make_hasher(np.arange(config.vocab_size))
        rng = np.random.default_rng(1)
        for layer, ids in hasher(np.asarray(tokens)).items():
            rows = jnp.asarray(rng.normal(size=(e.table_rows(layer), e.head_dim)), jnp.float32)
            memory[layer] = table.gather(rows, jnp.asarray(ids), e.head_sizes(layer))
    return jnp.asarray(tokens), memory


@functools.lru_cache(maxsize=None)
def variables(config):
    """Random variables at init's shapes, drawn with NumPy.

    Compiling the initialisers takes ~12 s per config on 2 CPU cores; these tests check
    structure (causality, gradients, residuals), which holds for any values. Training
    tests exercise the real init.
    """
    rng = np.random.default_rng(0)

    def draw(x):
        fan_in = x.shape[0] if x.ndim >= 2 else 1
        return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(fan_in) + (x.ndim == 1), x.dtype)

    return jax.tree.map(draw, nn.unbox(model_lib.variable_shapes(config)))


@functools.lru_cache(maxsize=None)
def apply_fn(config):
    return jax.jit(lambda v, t, h: Model(config).apply(v, t, h))


@pytest.mark.parametrize("branches, engram", [(1, True), (4, True), (4, False)])
def test_changing_a_future_token_never_changes_earlier_logits(branches, engram):
    config = tiny_config(branches, engram)
    tokens = np.random.default_rng(0).integers(1, 64, (2, 12))
    changed = tokens.copy()
    changed[:, 7] = (changed[:, 7] + 5) % 64
    a = apply_fn(config)(variables(config), *inputs(config, tokens))
    b = apply_fn(config)(variables(config), *inputs(config, changed))
    chex.assert_shape([a, b], (2, 12, 64))
    chex.assert_type([a, b], jnp.float32)
    chex.assert_trees_all_equal(a[:, :7], b[:, :7])
    assert np.abs(a[:, 7:] - b[:, 7:]).max() > 0


@pytest.mark.parametrize("branches, engram", [(1, False), (1, True), (4, False), (4, True)])
def test_runs_under_jit_and_grad_with_finite_gradients(branches, engram):
    config = tiny_config(branches, engram)
    tokens, memory = inputs(config, np.random.default_rng(1).integers(0, 64, (2, 8)))
    v = variables(config)

    def loss(params):
        logits = Model(config).apply({**v, "params": params}, tokens, memory)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = jax.jit(jax.grad(loss))(v["params"])
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, v["params"])
    chex.assert_tree_all_finite(grads)
    leaves = jax.tree.leaves(grads)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) > 0.9 * len(leaves)


@pytest.mark.parametrize("branches, kind, engram", [(4, "mha", False), (1, "mla", False), (4, "mha", True)])
def test_a_packed_document_has_the_logits_of_that_document_alone(branches, kind, engram):
    """Attention is masked to each document and positions restart. Engram reads across the
    boundary by design (n-grams, short conv), so the Engram case drops the conv and gives
    the document alone the memory of its packed positions."""
    config = tiny_config(branches, engram)
    if kind == "mla":
        config = config.replace(attention=AttentionConfig(kind="mla", num_heads=2, kv_lora_rank=8, qk_nope_dim=8,
                                                          qk_rope_dim=4, v_head_dim=8))
    if engram:
        config = config.replace(engram=config.engram.replace(short_conv=False))
    tokens = np.random.default_rng(2).integers(1, 64, (2, 12))
    tokens[:, 5] = 0  # document 1 = columns 0..4, document 2 = columns 5..11 (opened by its EOD)
    tokens, memory = inputs(config, tokens)
    # One compiled shape for all three runs: the document alone is put first in a row
    # (causal: its 7 logits do not see the 5 columns after it), with one segment.
    apply = jax.jit(lambda t, h, s, p: Model(config).apply(variables(config), t, h, s, p))
    one_segment, in_order = np.zeros((2, 12), np.int32), np.tile(np.arange(12, dtype=np.int32), (2, 1))
    segment_ids = np.tile(np.int32([0] * 5 + [1] * 7), (2, 1))  # [B, T]
    positions = np.tile(np.int32([*range(5), *range(7)]), (2, 1))  # [B, T]
    packed = apply(tokens, memory, segment_ids, positions)
    first = lambda a: jnp.roll(a, -5, axis=1)  # noqa: E731  (columns 5..11 first)
    alone = apply(first(tokens), {k: first(m) for k, m in memory.items()}, one_segment, in_order)[:, :7]
    chex.assert_shape(packed, (2, 12, 64))
    # Float32 rounding of the same sums in another order; measured <= 3.1e-6 at |logits| <= 5.2.
    chex.assert_trees_all_close(packed[:, 5:], alone, rtol=0, atol=2e-5)
    unmasked = apply(tokens, memory, one_segment, in_order)  # one document: it reads document 1
    assert np.abs(unmasked[:, 5:] - alone).max() > 1e-2
    # With the mask, RoPE's relative scores hide the positions; without it, restarting
    # them moves document 1 relative to document 2, so the positions reach attention.
    restarted = apply(tokens, memory, one_segment, positions)
    assert np.abs(restarted[:, 5:] - unmasked[:, 5:]).max() > 1e-2


def test_segment_ids_must_match_the_tokens():
    config = tiny_config(engram=False)
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"segment_ids must be an integer array shaped like tokens \(1, 4\)"):
        Model(config).apply(variables(config), tokens, None, jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"positions must be an integer array"):
        Model(config).apply(variables(config), tokens, None, None, jnp.zeros((1, 4)))


def test_single_branch_block_is_a_plain_prenorm_residual_block():
    config = tiny_config(branches=1, engram=False, moe=None)
    x = jax.random.normal(jax.random.key(1), (2, 6, 1, 16))
    block = Block(config, layer=1)
    params = nn.unbox(block.init(jax.random.key(2), x, None))["params"]
    out = block.apply({"params": params}, x, None)

    def rms(v, scale):
        return v * jax.lax.rsqrt(jnp.mean(v * v, -1, keepdims=True) + config.norm_eps) * scale

    h = x[:, :, 0]
    h = h + Attention(config.attention).apply({"params": params["attention"]},
                                              rms(h, params["attention_norm"]["scale"]))
    h = h + MLP(config.mlp_dim).apply({"params": params["mlp"]}, rms(h, params["ffn_norm"]["scale"]))
    chex.assert_shape(out, x.shape)
    chex.assert_trees_all_close(out[:, :, 0], h, rtol=1e-5, atol=1e-5)
    assert not any("hc" in k for k in params)  # no mHC maps at M = 1


def test_single_branch_fusion_ablation_runs_through_mhc_maps():
    config = tiny_config(branches=4)
    config = config.replace(engram=config.engram.replace(multi_branch=False))
    assert "engram_hc" in variables(config)["params"]["block_0"]
    logits = apply_fn(config)(variables(config), *inputs(config, np.ones((1, 5), np.int64)))
    chex.assert_shape(logits, (1, 5, 64))
    chex.assert_tree_all_finite(logits)


def test_missing_memory_is_a_clear_error():
    config = tiny_config()
    with pytest.raises(ValueError, match=r"memory lacks Engram layers \[2\]"):
        Model(config).apply(variables(config), jnp.zeros((1, 4), jnp.int32),
                            {0: jnp.zeros((1, 4, config.engram.memory_dim))})


def test_count_params_matches_the_allocated_model():
    config = tiny_config()
    allocated = sum(x.size for x in jax.tree.leaves(variables(config)["params"]))
    count = model_lib.count_params(config)
    assert count.engram == sum(config.engram.table_rows(i) for i in (0, 2)) * config.engram.head_dim
    assert count.total == allocated + count.engram  # the tables live beside the params
    assert count.engram_layers + count.engram == model_lib.engram_params(config)
    # Activated: all but the embedding, the idle routed experts and the unread table rows.
    routed = 2 * 4 * 3 * 16 * 8
    assert count.activated == count.total - 64 * 16 - routed // 2 - (count.engram - 2 * 16)


def test_flops_per_token_agree_with_the_compiled_forward():
    config = tiny_config(branches=4, moe=None, hidden_size=64, attention=AttentionConfig(num_heads=4, head_dim=16))
    seq = 32
    tokens, memory = inputs(config, np.zeros((4, seq), np.int64))
    compiled = apply_fn(config).lower(variables(config), tokens, memory).compile()
    measured = compiled.cost_analysis()["flops"] / (4 * seq)
    assert 0.8 < model_lib.flops_per_token(config, seq) / measured < 1.25


def test_sparsity_allocation_recovers_engram_27b():
    from engram_jax import configs

    config = configs.get("engram-27b")
    count = model_lib.count_params(config)
    backbone_total = count.total - count.embedding - count.lm_head
    backbone_active = count.activated - count.lm_head
    experts, rows = model_lib.allocate_sparsity(config, backbone_total, backbone_active, count.rho)
    assert experts == 55
    assert abs(rows - 2_262_400) / 2_262_400 < 0.01
    experts, rows = model_lib.allocate_sparsity(config, backbone_total, backbone_active, 1.0)
    assert rows == 0 and experts == 55 + math.floor(count.engram / (29 * model_lib.expert_params(config)) + 0.5)


def test_invalid_model_config_names_the_field():
    from engram_jax.config_base import ConfigError

    with pytest.raises(ConfigError, match="engram"):
        tiny_config(num_layers=2)  # Engram at layer 2 of a 2-layer model
    with pytest.raises(ConfigError, match="dtype"):
        tiny_config(dtype="float16")


# ---------------------------------------------------------------- scanned blocks, remat, the LM head


def scanned_config(**overrides) -> ModelConfig:
    """Four blocks: 0 dense, 1 Engram + MoE, then the MoE blocks 2..3 that nn.scan stacks."""
    config = tiny_config(num_layers=4)
    return config.replace(engram=config.engram.replace(layer_ids=(1,)), **overrides)


def stacked(tree: dict, first: int, count: int) -> dict:
    """Unrolled variables (block_i) -> those of the scanned module of blocks first..first+count-1."""
    blocks = [tree[f"block_{i}"] for i in range(first, first + count)]
    rest = {k: v for k, v in tree.items() if k not in {f"block_{i}" for i in range(first, first + count)}}
    return {**rest, model_lib.group_name(first, count): jax.tree.map(lambda *x: jnp.stack(x), *blocks)}


def test_runs_of_identical_blocks_without_engram_are_stacked():
    from engram_jax import configs

    assert scanned_config().block_groups == ((0, 1), (1, 1), (2, 2))
    assert scanned_config(scan_layers=False).block_groups == tuple((i, 1) for i in range(4))
    assert configs.get("engram-27b").block_groups == ((0, 1), (1, 1), (2, 13), (15, 1), (16, 14))
    assert model_lib.layers_of("blocks_2_4") == [2, 3, 4] and model_lib.layers_of("block_1") == [1]
    shapes = nn.unbox(model_lib.variable_shapes(scanned_config()))
    chex.assert_shape(shapes["params"]["blocks_2_3"]["moe"]["w_gate"], (2, 4, 16, 8))  # [L, E, D, F]
    chex.assert_shape(shapes["moe_bias"]["blocks_2_3"]["moe"]["bias"], (2, 4))  # [L, E]


def test_scanned_blocks_compute_what_unrolled_blocks_compute():
    unrolled = scanned_config(scan_layers=False)
    v = variables(unrolled)
    scanned_v = {k: stacked(v[k], 2, 2) for k in ("params", "moe_bias")}
    tokens, memory = inputs(unrolled, np.random.default_rng(3).integers(0, 64, (2, 8)))
    expected = apply_fn(unrolled)(v, tokens, memory)
    got = apply_fn(scanned_config())(scanned_v, tokens, memory)
    assert "block_2" not in scanned_v["params"]
    # The same float32 operations, compiled inside and outside a loop: a few ulps.
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)  # the remat="none" reference is shared by two cases
def gradients(config):
    """Gradients of a loss with respect to the parameters and the memory vectors."""
    tokens, memory = inputs(config, np.random.default_rng(4).integers(0, 64, (2, 8)))
    v = variables(config.replace(remat="none"))

    def loss(params, memory):
        logits = Model(config).apply({**v, "params": params}, tokens, memory)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(v["params"], memory)


@pytest.mark.parametrize("scan, remat", [(True, "full"), (True, "save_dots"), (False, "full")])
def test_remat_recomputes_the_same_gradients(scan, remat):
    config = scanned_config(scan_layers=scan)
    # The same float32 operations, fused and summed in other orders: measured <= 3.8e-6.
    chex.assert_trees_all_close(gradients(config.replace(remat=remat)), gradients(config), rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def grad_temporaries(config) -> int:
    """Temporary bytes of the compiled gradient of a loss over a [16, 128] batch."""
    tokens = jax.ShapeDtypeStruct((16, 128), jnp.int32)
    memory = {i: jax.ShapeDtypeStruct((16, 128, config.engram.memory_dim), jnp.float32)
              for i in config.engram.layer_ids}
    v = nn.unbox(model_lib.variable_shapes(config))

    def loss(variables, tokens, memory):
        logits = Model(config).apply(variables, tokens, memory)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    compiled = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(v, tokens, memory).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("scan", [True, False])
def test_full_remat_keeps_far_fewer_activations(scan):
    """Unrolled blocks too: on XLA:CPU a plain jax.checkpoint there saves nothing (its
    recomputation is merged back into the forward), hence `model._tied_checkpoint`."""
    config = scanned_config(scan_layers=scan)
    # Measured: 0.49 scanned, 0.58 unrolled (four blocks' inputs are kept); nn.remat's
    # plain jax.checkpoint measured 0.93 on `small` unrolled.
    assert grad_temporaries(config.replace(remat="full")) < 0.7 * grad_temporaries(config)


def test_invalid_remat_policy_names_the_choices():
    from engram_jax.config_base import ConfigError

    with pytest.raises(ConfigError, match="remat = 'some'.*none, full, save_dots"):
        tiny_config(remat="some")


@pytest.mark.parametrize("tie", [False, True])
def test_hidden_states_and_head_kernel_give_the_logits(tie):
    config = tiny_config(tie_embeddings=tie)
    tokens, memory = inputs(config, np.random.default_rng(5).integers(0, 64, (2, 6)))
    hidden, kernel = Model(config).apply(variables(config), tokens, memory, return_hidden=True)
    chex.assert_shape([hidden, kernel], [(2, 6, 16), (16, 64)])
    logits = Model(config).apply(variables(config), tokens, memory)
    chex.assert_trees_all_equal(model_lib.logits_of(hidden, kernel), logits)


def test_count_params_is_the_same_scanned_or_unrolled():
    scanned, unrolled = model_lib.count_params(scanned_config()), model_lib.count_params(
        scanned_config(scan_layers=False))
    assert scanned == unrolled
    assert scanned.routed_experts == 3 * 4 * 3 * 16 * 8  # MoE layers 1..3, E = 4, 3 D F each
