"""The train step at scale: the loss in time chunks, per-layer metrics and biases of stacked blocks."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from engram_jax import model, optim, sharding, training
from engram_jax.attention import AttentionConfig
from engram_jax.mhc import MHCConfig
from engram_jax.model import ModelConfig
from engram_jax.moe import MoEConfig
from engram_jax.table import TableState


def head(seed=0, batch=3, seq=10, dim=8, vocab=50):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(batch, seq, dim)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(dim, vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
    return hidden, kernel, targets


def full_loss(hidden, kernel, targets):
    return optax.softmax_cross_entropy_with_integer_labels(hidden @ kernel, targets).mean()


@pytest.mark.parametrize("chunk", [0, 4, 5, 10])  # whole, padded last chunk, exact chunks, one chunk
def test_chunked_loss_is_the_loss_of_the_whole_logits(chunk):
    hidden, kernel, targets = head()
    got = jax.jit(training.chunked_cross_entropy, static_argnums=3)(hidden, kernel, targets, chunk)
    # Sums of the same float32 terms in another order (observed <= 5e-7 at a loss of ~9).
    chex.assert_trees_all_close(got, full_loss(hidden, kernel, targets), rtol=1e-6, atol=0)


@pytest.mark.parametrize("chunk", [4, 5])
def test_chunked_loss_has_the_gradient_of_the_whole_logits(chunk):
    hidden, kernel, targets = head(seed=1)
    got = jax.jit(jax.grad(training.chunked_cross_entropy, argnums=(0, 1)), static_argnums=3)(
        hidden, kernel, targets, chunk)
    expected = jax.grad(full_loss, argnums=(0, 1))(hidden, kernel, targets)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-7)


def test_chunked_loss_never_holds_all_logits():
    """Compiled forward and backward: no [B, T, V] buffer, and far fewer temporaries."""
    hidden, kernel, targets = head(batch=8, seq=256, dim=16, vocab=4096)  # logits 32 MiB
    grad = jax.grad(training.chunked_cross_entropy, argnums=(0, 1))
    text = jax.jit(grad, static_argnums=3).lower(hidden, kernel, targets, 32).compile()
    whole = jax.jit(grad, static_argnums=3).lower(hidden, kernel, targets, 0).compile()
    assert "f32[8,256,4096]" not in text.as_text()
    logits_bytes = 8 * 256 * 4096 * 4
    assert text.memory_analysis().temp_size_in_bytes < logits_bytes / 2 < whole.memory_analysis().temp_size_in_bytes


# ---------------------------------------------------------------- stacked MoE blocks in the train step

CONFIG = ModelConfig(  # blocks 1..3 are identical MoE blocks: one scanned module, blocks_1_3
    vocab_size=64, hidden_size=16, num_layers=4, attention=AttentionConfig(num_heads=2, head_dim=8), mlp_dim=32,
    moe=MoEConfig(num_experts=4, num_shared=1, top_k=2, expert_dim=8), dense_layers=1, mhc=MHCConfig(branches=2),
    engram=None, loss_chunk=4)


@functools.lru_cache(maxsize=None)
def one_step():
    """(state before, state after, metrics) of one train step of CONFIG, bias rate 0.01."""
    shapes = model.variable_shapes(CONFIG)
    tx = optim.build_optimizer(optim.OptimConfig(warmup_steps=0), sharding.logical_axes(shapes)["params"], 10)
    # Parameters drawn with NumPy at init's shapes: compiling the initialisers would take
    # most of this test's time, and any values route tokens.
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) / np.sqrt(max(x.shape, default=1)), x.dtype),
                          nn.unbox(shapes)["params"])
    bias = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nn.unbox(shapes)["moe_bias"])
    state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params, moe_bias=bias,
                                opt_state=tx.init(params), tables=TableState(rows={}, slots={}))
    tokens = np.random.default_rng(0).integers(0, 64, (4, 9))
    batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}
    step = jax.jit(functools.partial(training.train_step, config=CONFIG, tx=tx, tables=None,
                                     lr_schedule=optax.constant_schedule(1e-3), table_lr_multiplier=1.0,
                                     clip_norm=1.0, bias_rate=0.01))
    after, metrics = step(state, batch)
    return state, after, metrics


def test_stacked_blocks_report_metrics_per_layer():
    _, _, metrics = one_step()
    assert CONFIG.block_groups == ((0, 1), (1, 3))
    assert {k for k in metrics if k.startswith("moe_load")} == {
        f"moe_{kind}/block_{i}" for kind in ("load", "load_max") for i in (1, 2, 3)}
    for i in (1, 2, 3):
        chex.assert_shape(metrics[f"moe_load/block_{i}"], (4,))
        assert float(metrics[f"moe_load/block_{i}"].sum()) == pytest.approx(1.0)


def test_each_stacked_layer_balances_its_own_experts():
    before, after, metrics = one_step()
    chex.assert_trees_all_equal(before.moe_bias["blocks_1_3"]["moe"]["bias"], jnp.zeros((3, 4)))
    bias = np.asarray(after.moe_bias["blocks_1_3"]["moe"]["bias"])  # [L, E]
    loads = [np.asarray(metrics[f"moe_load/block_{i}"]) for i in (1, 2, 3)]
    assert len({tuple(load) for load in loads}) > 1  # the layers' loads differ: a mix-up would show
    for layer, load in enumerate(loads):
        np.testing.assert_allclose(bias[layer], 0.01 * np.sign(load.mean() - load), atol=1e-7)
