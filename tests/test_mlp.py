"""The SwiGLU MLP: equation, parameters and their axes, dtypes, input checks."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from engram_jax.mlp import MLP, mlp_params


def make(hidden_dim=24, dim=16, seed=0, dtype=jnp.float32):
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, 5, dim)), jnp.float32)
    layer = MLP(hidden_dim, dtype=dtype)
    variables = layer.init(jax.random.key(seed), x)
    return layer, variables, x


def silu(z):
    return z / (1 + np.exp(-z))


def test_output_is_swiglu():
    layer, variables, x = make()
    p = jax.tree.map(np.asarray, nn.unbox(variables)["params"])
    xs = np.asarray(x, np.float64)
    expected = (silu(xs @ p["w_gate"]) * (xs @ p["w_up"])) @ p["w_down"]
    out = layer.apply(variables, x)
    chex.assert_shape(out, x.shape)
    chex.assert_type(out, jnp.float32)
    # Float32 rounding over sums of 16 and 24 terms of size ~1.
    chex.assert_trees_all_close(out, expected, rtol=0, atol=1e-5)


def test_params_have_no_biases_and_logical_axes():
    _, variables, _ = make(hidden_dim=24, dim=16)
    specs = nn.get_partition_spec(variables)["params"]
    assert specs == {"w_gate": P("embed", "mlp"), "w_up": P("embed", "mlp"), "w_down": P("mlp", "embed")}
    params = nn.unbox(variables)["params"]
    assert set(params) == {"w_gate", "w_up", "w_down"}  # no biases
    chex.assert_shape([params["w_gate"], params["w_up"], params["w_down"]], [(16, 24), (16, 24), (24, 16)])


def test_mlp_params_counts_init():
    _, variables, _ = make(hidden_dim=24, dim=16)
    count = sum(a.size for a in jax.tree.leaves(nn.unbox(variables)["params"]))
    assert count == mlp_params(16, 24) == 3 * 16 * 24


def test_bfloat16_runs_and_tracks_float32():
    layer, variables, x = make()
    ref = layer.apply(variables, x)
    out = MLP(24, dtype=jnp.bfloat16).apply(variables, x)
    chex.assert_type(out, jnp.bfloat16)
    # bfloat16 keeps 8 significant bits (relative error 2^-8 = 0.004 per rounding);
    # |output| here is at most ~3 (observed max error 0.01).
    chex.assert_trees_all_close(out.astype(jnp.float32), ref, rtol=0, atol=0.1)


def test_bad_input_raises():
    layer, variables, x = make()
    with pytest.raises(ValueError, match="MLP: x must be a floating"):
        layer.apply(variables, x.astype(jnp.int32))
