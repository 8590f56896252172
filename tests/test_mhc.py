"""mHC: Sinkhorn, the maps' initialisation and dynamics, read/write/expand/reduce, config.

The layer tests (maps, Sinkhorn, read/write, gradients) run both traced and eager
(`chex.variants`).
"""

import math
from functools import partial

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.config_base import ConfigError
from engram_jax.mhc import HyperConnection, MHCConfig, expand, read, reduce, sinkhorn, write

B, T, G, D = 2, 3, 4, 8
# Static maps chosen in mhc.py: h_pre = 1/G, h_post = 1, h_res = Sinkhorn(4 I), whose
# diagonal is e^4 / (e^4 + G - 1) and off-diagonal 1 / (e^4 + G - 1).
DIAG, OFF = math.exp(4) / (math.exp(4) + G - 1), 1 / (math.exp(4) + G - 1)


def make(config=None, dtype=jnp.float32, seed=0, x=None):
    config = config or MHCConfig(branches=G)
    hc = HyperConnection(config, dtype=dtype)
    if x is None:
        x = jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, config.branches, D)), dtype)
    params = nn.unbox(jax.jit(hc.init)(jax.random.key(seed), x)["params"])
    return hc, params, x


def maps(hc, params, x):
    return jax.jit(hc.apply)({"params": params}, x)


def sums(p):
    return np.asarray(p.sum(-1)), np.asarray(p.sum(-2))


def test_sinkhorn_large_row_and_column_offsets_are_safe():
    # Offsets of +-50 per row and column leave the Sinkhorn limit unchanged; a plain exp
    # overflows here and a max-subtracted exp underflows a whole column to 0 / 0 = NaN.
    rng = np.random.default_rng(1)
    core = rng.normal(size=(64, G, G))
    offsets = rng.uniform(-50, 50, (64, G, 1)) + rng.uniform(-50, 50, (64, 1, G))
    p = sinkhorn(jnp.asarray(core + offsets, jnp.float32), 20)
    assert np.all(np.isfinite(np.asarray(p)))
    rows, cols = sums(p)
    np.testing.assert_allclose(rows, 1, atol=1e-3)
    np.testing.assert_allclose(cols, 1, atol=1e-3)
    assert np.all(np.asarray(p) > 0)
    chex.assert_trees_all_close(p, sinkhorn(jnp.asarray(core, jnp.float32), 20), rtol=1e-7, atol=1e-5)


def test_sinkhorn_extreme_random_logits_stay_finite():
    # Independent +-50 logits: 20 iterations do not converge the columns (the paper's
    # Fig. 8 shows columns off by 0.04 too), but the result stays finite, rows sum to 1.
    logits = jnp.asarray(np.random.default_rng(2).choice([-50.0, 50.0], (256, G, G)), jnp.float32)
    p = np.asarray(sinkhorn(logits, 20))
    assert np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(p.sum(-1), 1, atol=1e-3)


def reference_maps(params, x, eps=1e-6, iters=20):
    """Eq. 7-9 in numpy float64: RMSNorm of vec(X), then the three projections."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    flat = np.asarray(x, np.float64).reshape(B, T, G * D)
    normed = flat / np.sqrt(np.mean(flat**2, -1, keepdims=True) + eps) * p["norm_scale"]
    proj = normed @ p["phi"]
    gate = np.concatenate([np.full(G, p["alpha_pre"]), np.full(G, p["alpha_post"]), np.full(G * G, p["alpha_res"])])
    logits = proj * gate + p["bias"]
    m = np.exp(logits[..., 2 * G:].reshape(B, T, G, G))
    for _ in range(iters):
        m = m / m.sum(-2, keepdims=True)
        m = m / m.sum(-1, keepdims=True)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    return sigmoid(logits[..., :G]), 2 * sigmoid(logits[..., G:2 * G]), m


def sublayer(h):
    return jnp.tanh(h) * 2.0


def test_single_branch_is_a_plain_residual():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(B, T, 1, D)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    ones = jnp.ones((B, T, 1), jnp.float32)
    chex.assert_trees_all_equal(read(ones, x), x[:, :, 0])
    out = write(x, ones[..., None], ones, y)
    chex.assert_shape(out, (B, T, 1, D))
    chex.assert_trees_all_equal(out[:, :, 0], x[:, :, 0] + y)
    assert MHCConfig(branches=1).num_params(D) == 0
    with pytest.raises(ValueError, match="branches = 1"):
        HyperConnection(MHCConfig(branches=1)).init(jax.random.key(0), x)


def test_expand_reduce_and_read_of_copies():
    e = jnp.asarray(np.random.default_rng(6).normal(size=(B, T, D)), jnp.float32)
    x = expand(e, G)
    chex.assert_shape(x, (B, T, G, D))
    chex.assert_trees_all_close(reduce(x), G * e, rtol=1e-6, atol=0)
    h_pre = jnp.asarray(np.random.default_rng(7).uniform(0, 1, (B, T, G)), jnp.float32)
    s = np.asarray(h_pre.sum(-1))[..., None]
    chex.assert_trees_all_close(read(h_pre, x), s * np.asarray(e), rtol=1e-5, atol=1e-6)


def test_write_with_identity_adds_y_to_every_branch():
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(B, T, G, D)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    out = write(x, jnp.broadcast_to(jnp.eye(G), (B, T, G, G)), jnp.ones((B, T, G)), y)
    chex.assert_trees_all_equal(out, x + y[:, :, None, :])


def test_bfloat16_stream():
    hc, params, x32 = make()
    x = x32.astype(jnp.bfloat16)
    hc16 = HyperConnection(hc.config, dtype=jnp.bfloat16)
    h_pre, h_post, h_res = maps(hc16, params, x)
    chex.assert_type([h_pre, h_post, h_res], jnp.float32)
    # bf16 rounding (eps 2^-8) of x and phi moves the dynamic logits (scale 0.01) by < 1e-3.
    chex.assert_trees_all_close((h_pre, h_post, h_res), maps(hc, params, x32), rtol=1e-7, atol=1e-3)
    y = jnp.ones((B, T, D), jnp.bfloat16)
    chex.assert_type([read(h_pre, x), write(x, h_res, h_post, y), reduce(x)], jnp.bfloat16)



class MHCLayerTest(chex.TestCase):
    """Tests of the maps, Sinkhorn and read/write, each run under jit and eagerly."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_sinkhorn_doubly_stochastic_and_positive(self):
        logits = jnp.asarray(np.random.default_rng(0).normal(size=(64, G, G)), jnp.float32)
        p = self.variant(partial(sinkhorn, iters=20))(logits)
        chex.assert_shape(p, (64, G, G))
        chex.assert_type(p, jnp.float32)
        rows, cols = sums(p)
        chex.assert_trees_all_close((rows, cols), (np.ones((64, G)),) * 2, rtol=1e-7, atol=1e-3)
        assert np.all(np.asarray(p) > 0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_zero_gate_gives_the_static_maps(self):
        hc, params, x = make(MHCConfig(branches=G, gate_init=0.0))
        h_pre, h_post, h_res = self.variant(hc.apply)({"params": params}, x)
        expected = np.broadcast_to(OFF + (DIAG - OFF) * np.eye(G), (B, T, G, G))
        chex.assert_trees_all_close((h_pre, h_post, h_res), (np.full((B, T, G), 1 / G), np.ones((B, T, G)), expected),
                                    rtol=1e-7, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_init_maps_near_static_with_shapes_and_float32(self):
        hc, params, x = make()
        h_pre, h_post, h_res = self.variant(hc.apply)({"params": params}, x)
        chex.assert_shape([h_pre, h_post, h_res], [(B, T, G), (B, T, G), (B, T, G, G)])
        chex.assert_type([h_pre, h_post, h_res], jnp.float32)
        # Dynamic logits are 0.01 * (x' phi), x' phi ~ N(0, 1): |logit shift| < 0.05, and the
        # maps' slopes are <= 0.5, so every entry moves by less than 0.03.
        static = (np.full((B, T, G), 1 / G), np.ones((B, T, G)),
                  np.broadcast_to(OFF + (DIAG - OFF) * np.eye(G), (B, T, G, G)))
        chex.assert_trees_all_close((h_pre, h_post, h_res), static, rtol=1e-7, atol=0.03)

    @chex.variants(with_jit=True, without_jit=True)
    def test_maps_depend_on_the_input(self):
        hc, params, x = make()
        apply = self.variant(hc.apply)
        static = apply({"params": jax.tree.map(jnp.asarray, {**params, "alpha_pre": 0.0, "alpha_post": 0.0,
                                                              "alpha_res": 0.0})}, x)
        dynamic = apply({"params": params}, x)
        for s, d in zip(static, dynamic):
            assert np.abs(np.asarray(d) - np.asarray(s)).max() > 1e-4
            # Different tokens get different maps.
            assert np.abs(np.asarray(d[0, 0]) - np.asarray(d[1, 2])).max() > 1e-4

    @chex.variants(with_jit=True, without_jit=True)
    def test_maps_match_the_paper_equations(self):
        hc, params, x = make()
        rng = np.random.default_rng(10)
        # Trained-looking values: a non-unit norm weight and gates far from their init.
        params = {**params, "norm_scale": jnp.asarray(rng.uniform(0.5, 1.5, G * D), jnp.float32),
                  "alpha_pre": jnp.float32(0.7), "alpha_post": jnp.float32(-0.4), "alpha_res": jnp.float32(1.3)}
        got = self.variant(hc.apply)({"params": params}, x)
        chex.assert_trees_all_close(got, reference_maps(params, x), rtol=1e-7, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_random_phi_breaks_branch_symmetry(self):
        e = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, D)), jnp.float32)
        x = expand(e, G)
        hc, params, _ = make(x=x)

        def step(params):
            h_pre, h_post, h_res = hc.apply({"params": params}, x)
            return write(x, h_res, h_post, sublayer(read(h_pre, x)))

        spread = lambda out: float(np.abs(np.asarray(out) - np.asarray(out[:, :, :1])).max())  # noqa: E731
        # With phi = 0 any doubly stochastic h_res keeps identical copies identical.
        step = self.variant(step)
        assert spread(step({**params, "phi": jnp.zeros_like(params["phi"])})) < 1e-6
        assert spread(step(params)) > 1e-4

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients_reach_every_parameter(self):
        hc, params, x = make()
        weights = jnp.asarray(np.random.default_rng(4).normal(size=(B, T, G, D)), jnp.float32)

        def loss(params):
            h_pre, h_post, h_res = hc.apply({"params": params}, x)
            return jnp.sum(weights * write(x, h_res, h_post, sublayer(read(h_pre, x))))

        grads = self.variant(jax.grad(loss))(params)
        assert set(grads) == {"norm_scale", "phi", "bias", "alpha_pre", "alpha_post", "alpha_res"}
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
        chex.assert_tree_all_finite(grads)
        for name, g in grads.items():
            assert np.abs(np.asarray(g)).max() > 1e-6, name

    @chex.variants(with_jit=True, without_jit=True)
    def test_read_and_write_follow_the_paper_index_order(self):
        # Output branch i = sum_j h_res[i, j] x[j] + h_post[i] y: rows make outputs (eq. 3).
        rng = np.random.default_rng(9)
        x, y = rng.normal(size=(B, T, G, D)), rng.normal(size=(B, T, D))
        h_pre, h_post, h_res = rng.uniform(size=(B, T, G)), rng.uniform(size=(B, T, G)), rng.uniform(size=(B, T, G, G))
        want_write = np.zeros_like(x)
        for i in range(G):
            want_write[:, :, i] = h_post[:, :, i, None] * y
            for j in range(G):
                want_write[:, :, i] += h_res[:, :, i, j, None] * x[:, :, j]
        want_read = sum(h_pre[:, :, j, None] * x[:, :, j] for j in range(G))
        f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        got_write = self.variant(write)(f32(x), f32(h_res), f32(h_post), f32(y))
        got_read = self.variant(read)(f32(h_pre), f32(x))
        chex.assert_shape([got_write, got_read], [(B, T, G, D), (B, T, D)])
        chex.assert_trees_all_close((got_write, got_read), (want_write, want_read), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("branches, dim", [(4, 8), (2, 16), (3, 5)])
def test_num_params_matches_init(branches, dim):
    config = MHCConfig(branches=branches)
    x = jnp.zeros((1, 2, branches, dim), jnp.float32)
    params = jax.eval_shape(HyperConnection(config).init, jax.random.key(0), x)["params"]
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nn.unbox(params)))
    assert config.num_params(dim) == count


@pytest.mark.parametrize("field, value", [("branches", 0), ("sinkhorn_iters", 0), ("gate_init", -0.1),
                                          ("gate_init", float("nan")), ("norm_eps", 0.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"MHCConfig.{field}"):
        MHCConfig(**{field: value})


def test_wrong_shapes_raise():
    hc, params, x = make()
    with pytest.raises(ValueError, match="HyperConnection: x must be"):
        hc.apply({"params": params}, x[:, :, :2])
    with pytest.raises(ValueError, match="read: need"):
        read(jnp.ones((B, T, G + 1)), x)
    with pytest.raises(ValueError, match="write: for x"):
        write(x, jnp.ones((B, T, G, G)), jnp.ones((B, T, G)), jnp.ones((B, T, D + 1)))
