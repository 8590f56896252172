"""The pure train step: loss falls, balancing biases move, bf16 and sharded steps agree."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from engram_jax import model, optim, sharding, training
from engram_jax.attention import AttentionConfig
from engram_jax.engram import EngramConfig
from engram_jax.mhc import MHCConfig
from engram_jax.model import ModelConfig
from engram_jax.moe import MoEConfig

CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, num_layers=2, attention=AttentionConfig(num_heads=2, head_dim=16),
    mlp_dim=64, moe=MoEConfig(num_experts=4, num_shared=1, top_k=2, expert_dim=16), dense_layers=1,
    mhc=MHCConfig(branches=2), embed_init_std=0.02,
    engram=EngramConfig(layer_ids=(1,), heads_per_ngram=2, embed_per_ngram=16, table_sizes=(101, 103),
                        pad_id=0, table_init_std=0.02))
OPTIM = optim.OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant")


def batch_of(config, batch=8, seq=16, seed=0):
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq + 1))
    hasher = config.engram.make_hasher(np.arange(config.vocab_size))
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "hash_ids": {k: jnp.asarray(v) for k, v in hasher(tokens[:, :-1]).items()}}


@functools.lru_cache(maxsize=None)
def setup(config):
    """A state with NumPy-drawn parameters (compiling the initialisers is slow on CPU)."""
    shapes = nn.unbox(model.variable_shapes(config))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2 + (len(s.shape) == 1), s.dtype),
                          shapes["params"])
    axes = sharding.logical_axes(model.variable_shapes(config))["params"]
    tx = optim.build_optimizer(OPTIM, axes, total_steps=100)
    state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                moe_bias=jax.tree.map(jnp.zeros_like, shapes["moe_bias"]), opt_state=tx.init(params))
    return state, tx, axes


def steps(config, state_sharding=None, batch_sharding=None):
    state, tx, _ = setup(config)
    train, _ = training.jit_steps(config, tx, optim.schedule(OPTIM, 100), 0.01, state_sharding, batch_sharding)
    return jax.tree.map(jnp.copy, state), train


def test_repeated_steps_lower_the_loss():
    state, train = steps(CONFIG)
    batch = batch_of(CONFIG)
    losses = []
    for _ in range(6):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5
    assert int(state.step) == 6


def test_balancing_bias_moves_against_the_load():
    state, train = steps(CONFIG)
    state, metrics = train(state, batch_of(CONFIG))
    load = np.asarray(metrics["moe_load/block_1"])
    bias = np.asarray(state.moe_bias["block_1"]["moe"]["bias"])
    np.testing.assert_allclose(bias, 0.01 * np.sign(load.mean() - load), atol=1e-7)
    assert metrics["moe_load_max/block_1"] >= 1.0 and "engram_gate/block_1" in metrics


def test_bfloat16_step_tracks_float32():
    config16 = CONFIG.replace(dtype="bfloat16")
    state32, train32 = steps(CONFIG)
    state16, train16 = steps(config16)
    batch = batch_of(CONFIG)
    _, m32 = train32(state32, batch)
    new16, m16 = train16(state16, batch)
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 0.05 * float(m32["loss"])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new16.params))


def test_sharded_step_equals_the_single_device_step():
    assert jax.device_count() == 8
    state, tx, axes = setup(CONFIG)
    mesh = sharding.make_mesh(sharding.MeshConfig(model=2))  # data 4 x model 2
    params = sharding.tree_shardings(mesh, axes)
    table = params["block_1"]["engram"]["table"]["embedding"]
    assert table.spec == PartitionSpec("model", None)  # rows split over the model axis
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sharding = sharding.like_params(state.opt_state, params, replicated)
    mu = opt_sharding[1].inner_states["table"].inner_state[0].mu  # Adam's first moment of the table group
    assert mu["block_1"]["engram"]["table"]["embedding"].spec == PartitionSpec("model", None)
    state_sharding = training.TrainState(
        step=replicated, params=params, moe_bias=jax.tree.map(lambda _: replicated, state.moe_bias),
        opt_state=opt_sharding)
    sharded_state, sharded_train = steps(CONFIG, state_sharding, sharding.batch_sharding(mesh))
    plain_state, plain_train = steps(CONFIG)
    batch = batch_of(CONFIG)
    new_sharded, m_sharded = sharded_train(jax.device_put(sharded_state, state_sharding), batch)
    new_plain, m_plain = plain_train(plain_state, batch)
    # Same loss and gradients; parameters after Adam's first step are not compared: it
    # moves each weight by lr * g / (|g| + eps), which turns last-bit differences of
    # near-zero gradients (summed in another order across devices) into visible ones.
    assert float(m_sharded["loss"]) == pytest.approx(float(m_plain["loss"]), rel=1e-5)
    assert float(m_sharded["grad_norm"]) == pytest.approx(float(m_plain["grad_norm"]), rel=1e-5)
    del new_plain
    assert len(new_sharded.params["block_1"]["engram"]["table"]["embedding"].sharding.device_set) == 8
