"""The blocked grouped experts (`moe._blocked_experts`): their hand-written backward, and
that no per-block copy of the expert kernels is ever made."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.moe import MoE, MoEConfig


def layer_and_inputs(implementation, num_experts=6, top_k=2, seed=0):
    config = MoEConfig(num_experts=num_experts, num_shared=0, top_k=top_k, expert_dim=8,
                       implementation=implementation)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, 10, 16)), jnp.float32)
    layer = MoE(config)
    shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), x))
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(s.shape[-2]), jnp.float32),
                          shapes["params"])
    bias = jnp.zeros(num_experts).at[-1].set(-10.0)  # expert E-1 gets no token: an empty group
    return layer, {"params": params, "moe_bias": {"bias": bias}}, x


def gradients(layer, variables, x):
    def loss(params, x):
        y = layer.apply({**variables, "params": params}, x, mutable=["intermediates"])[0]
        return jnp.sum(jnp.sin(y))  # a cotangent that differs per element

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)


@pytest.mark.parametrize("num_experts, top_k", [(6, 2), (4, 1), (5, 5)])
def test_blocked_gradients_equal_dense_gradients(num_experts, top_k):
    blocked, variables, x = layer_and_inputs("blocked", num_experts, top_k)
    dense = MoE(blocked.config.replace(implementation="dense"))
    got, expected = gradients(blocked, variables, x), gradients(dense, variables, x)
    assert float(jnp.abs(expected[0]["w_gate"]).max()) > 0.1
    if top_k < num_experts:  # the empty expert's kernels get exactly nothing
        assert not np.any(np.asarray(got[0]["w_gate"][-1]))
    # Same float32 products summed in other orders (observed <= 1e-6).
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-5)


def test_blocked_gradient_keeps_no_copy_of_the_kernels_per_block():
    """512 tokens x top-2 over 8 experts: 24 blocks of 64 rows. Gathering each block's
    kernels (24 x 512 x 512 floats = 24 MiB per kernel, and as much for each gradient)
    took 117 MiB of temporaries; slicing them in a loop takes the kernels' gradients."""
    layer = MoE(MoEConfig(num_experts=8, num_shared=0, top_k=2, expert_dim=512, implementation="blocked"))
    x = jax.ShapeDtypeStruct((1, 512, 512), jnp.float32)
    variables = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), x))

    def loss(variables, x):
        return jnp.sum(layer.apply(variables, x) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables, x).compile()
    per_block_copy = 24 * 512 * 512 * 4
    assert compiled.memory_analysis().temp_size_in_bytes < 1.5 * per_block_copy  # measured 21.3 MiB
