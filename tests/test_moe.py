"""DeepSeekMoE: routing, the balancing bias, shared experts, grouped == dense, sizes.

The layer tests run both traced and eager (`chex.variants`).
"""

import itertools
from functools import partial

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P

from engram_jax import hlo, sharding
from engram_jax.config_base import ConfigError
from engram_jax.mlp import MLP
from engram_jax.moe import MoE, MoEConfig, route, update_bias

DIM = 16


def make(batch=2, seq=6, dim=DIM, seed=0, dtype=jnp.float32, **overrides):
    """A tiny layer, variables {"params", "moe_bias"} and an input.

    Params are drawn here with numpy (std 1/sqrt(fan-in)) at the shapes init gives:
    compiling the initializers for every test's shapes would dominate the run time.
    """
    config = MoEConfig(num_experts=6, num_shared=1, top_k=2, expert_dim=8).replace(**overrides)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, seq, dim)), jnp.float32)
    layer = MoE(config, dtype=dtype)
    shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.key(seed), x))
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(s.shape[-2]), jnp.float32),
                          shapes["params"])
    return layer, {"params": params, "moe_bias": {"bias": jnp.zeros(config.num_experts)}}, x


def apply_with_load(layer, variables, x):
    """(output [B, T, D], expert_load [E])."""
    out, state = layer.apply(variables, x, mutable=["intermediates"])
    return out, state["intermediates"]["expert_load"][0]


forward = jax.jit(apply_with_load, static_argnums=0)  # compiled once per layer and shapes


def np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


def np_swiglu(x, w_gate, w_up, w_down):
    g = x @ w_gate
    return (g * np_sigmoid(g) * (x @ w_up)) @ w_down


def hand_scores(variables, x):
    """sigmoid(x W_r) in float64, [N, E]."""
    tokens = np.asarray(x, np.float64).reshape(-1, x.shape[-1])  # [N, D]
    return np_sigmoid(tokens @ np.asarray(variables["params"]["router"]))


GROUPED_CASES = [(f"{impl}_{e}_experts_top_{k}", impl, e, k)
                 for impl, (e, k) in itertools.product(["ragged", "blocked"], [(4, 1), (8, 2), (6, 3), (5, 5)])]


class MoELayerTest(chex.TestCase):
    """Routing and layer tests, each run under jit and eagerly."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_routing_weights_are_normalised_chosen_scores(self):
        _, variables, x = make(num_experts=6, top_k=3)
        scores = hand_scores(variables, x)  # [N, E]
        weights, experts = self.variant(partial(route, top_k=3, route_scale=2.5))(
            jnp.asarray(scores, jnp.float32), jnp.zeros(6))
        chex.assert_shape([weights, experts], (scores.shape[0], 3))
        weights, experts = np.asarray(weights), np.asarray(experts)
        assert (weights >= 0).all()
        chex.assert_trees_all_close(weights.sum(-1), np.full(scores.shape[0], 2.5), rtol=1e-6, atol=0)
        # Exactly top_k distinct experts, the best three by score (no ties in random data).
        top3 = np.argsort(-scores, axis=-1)[:, :3]
        chex.assert_trees_all_equal(experts, top3.astype(experts.dtype))
        chosen = np.take_along_axis(scores, top3, -1)
        chex.assert_trees_all_close(weights, 2.5 * chosen / chosen.sum(-1, keepdims=True), rtol=1e-6, atol=0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_output_matches_numpy_reference(self):
        layer, variables, x = make(route_scale=2.5)
        p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
        xs = np.asarray(x, np.float64).reshape(-1, DIM)
        scores = hand_scores(variables, x)
        expected = np_swiglu(xs, p["shared"]["w_gate"], p["shared"]["w_up"], p["shared"]["w_down"])
        for n, s in enumerate(scores):
            chosen = np.argsort(-s)[:2]
            for e in chosen:
                expert = np_swiglu(xs[n], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
                expected[n] += 2.5 * s[e] / s[chosen].sum() * expert
        out, load = self.variant(partial(apply_with_load, layer))(variables, x)
        chex.assert_shape(out, x.shape)
        chex.assert_type([out, load], jnp.float32)
        # Float32 rounding over sums of 8 and 16 terms, |output| up to ~3.
        chex.assert_trees_all_close(out.reshape(-1, DIM), expected, rtol=0, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bias_decides_choice_but_not_weights(self):
        scores = jax.random.uniform(jax.random.key(0), (64, 6))
        bias = jnp.zeros(6).at[3].set(10.0)  # sigmoid scores are < 1: expert 3 always wins
        weights, experts = self.variant(partial(route, top_k=2, route_scale=1.0))(scores, bias)
        chex.assert_trees_all_equal(experts[:, 0], jnp.full(64, 3, experts.dtype))
        chosen = jnp.take_along_axis(scores, experts, -1)
        expected = chosen / chosen.sum(-1, keepdims=True)  # the raw scores: no bias
        chex.assert_trees_all_close(weights, expected, rtol=1e-6, atol=0)

        # The same through the layer's "moe_bias" collection: expert 3 takes one slot of every token.
        layer, variables, x = make()
        _, load = self.variant(partial(apply_with_load, layer))({**variables, "moe_bias": {"bias": bias}}, x)
        assert float(load[3]) == 0.5

    @chex.variants(with_jit=True, without_jit=True)
    def test_shared_experts_always_on(self):
        layer, variables, x = make(num_shared=2)
        params = dict(variables["params"])
        for name in ("w_gate", "w_up", "w_down"):
            params[name] = jnp.zeros_like(params[name])
        out, _ = self.variant(partial(apply_with_load, layer))({**variables, "params": params}, x)
        shared = MLP(2 * 8).apply({"params": params["shared"]}, x)
        assert float(jnp.abs(shared).max()) > 0.1
        chex.assert_trees_all_equal(out, shared)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*GROUPED_CASES)
    def test_grouped_equals_dense(self, implementation, num_experts, top_k):
        layer, variables, x = make(num_experts=num_experts, top_k=top_k, num_shared=0, seq=10,
                                   implementation=implementation)
        # Expert E-1 gets no tokens: an empty group in ragged_dot (unless top_k == E).
        variables["moe_bias"]["bias"] = variables["moe_bias"]["bias"].at[-1].set(-10.0)
        grouped, load = self.variant(partial(apply_with_load, layer))(variables, x)
        dense, _ = forward(MoE(layer.config.replace(implementation="dense")), variables, x)
        if top_k < num_experts:
            assert float(load[-1]) == 0.0
        assert float(jnp.abs(dense).max()) > 0.1
        # Same float32 products, summed in a different order: a few ulps of values up to ~4
        # (observed max difference 3.6e-7).
        chex.assert_trees_all_close(grouped, dense, rtol=0, atol=2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_expert_load_sums_to_one(self):
        layer, variables, x = make(num_experts=6, top_k=2)
        _, load = self.variant(partial(apply_with_load, layer))(variables, x)
        chex.assert_shape(load, (6,))
        chex.assert_type(load, jnp.float32)
        chex.assert_trees_all_close(load.sum(), 1.0, rtol=1e-6, atol=0)
        # Each of the 2 * 6 tokens sends 2 slots: loads are multiples of 1/24.
        chex.assert_trees_all_close(load * 24, jnp.round(load * 24), rtol=1e-7, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_grad_reaches_router_not_bias(self):
        layer, variables, x = make()

        def grads(params, bias):
            loss = lambda p, b: jnp.sum(layer.apply({"params": p, "moe_bias": {"bias": b}}, x) ** 2)  # noqa: E731
            return jax.grad(loss, argnums=(0, 1))(params, bias)

        g_params, g_bias = self.variant(grads)(variables["params"], variables["moe_bias"]["bias"])
        chex.assert_trees_all_equal_shapes_and_dtypes(g_params, variables["params"])
        chex.assert_tree_all_finite(g_params)
        assert float(jnp.abs(g_params["router"]).max()) > 1e-3
        chex.assert_trees_all_equal(g_bias, jnp.zeros_like(g_bias))


def test_bias_updates_balance_skewed_load():
    num_experts = 8
    rng = np.random.default_rng(0)
    u = rng.normal(size=DIM)
    u /= np.linalg.norm(u)
    layer, variables, _ = make(num_experts=num_experts, top_k=2, num_shared=0, expert_dim=4)
    x = jnp.asarray(rng.normal(size=(4, 64, DIM)) + 2 * u, jnp.float32)  # tokens share a direction u
    router = rng.normal(size=(DIM, num_experts)) * 0.3
    router[:, :2] += u[:, None]  # experts 0 and 1 score high on every token
    params = {**variables["params"], "router": jnp.asarray(router, jnp.float32)}
    # 1e-2 rather than V3's 1e-3 so that 300 steps suffice (the bias moves 0.01 per step).
    rate = 1e-2

    @jax.jit
    def simulate(bias):
        def step(bias, _):
            _, load = forward(layer, {"params": params, "moe_bias": {"bias": bias}}, x)
            return update_bias(bias, load, rate), load

        return jax.lax.scan(step, bias, None, length=300)

    _, loads = simulate(jnp.zeros(num_experts))
    loads = np.asarray(loads)  # [steps, E]
    cv = loads.std(-1) / loads.mean(-1)
    ratio = loads.max(-1) / loads.min(-1)
    # Observed: step 0 cv 1.07, max/min 21.6; last 50 steps cv <= 0.06, max/min <= 1.23.
    assert cv[0] > 0.8 and ratio[0] > 10
    assert cv[-50:].max() < 0.15 and ratio[-50:].max() < 1.5


def test_update_bias_raises_underloaded():
    load = jnp.asarray([0.5, 0.25, 0.25, 0.0])
    new = update_bias(jnp.ones(4), load, 0.1)
    chex.assert_trees_all_close(new, jnp.asarray([0.9, 1.0, 1.0, 1.1]), rtol=1e-6, atol=0)


def test_num_params_matches_init():
    layer, _, x = make(num_experts=6, num_shared=2, top_k=2, expert_dim=8)
    variables = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), x))
    assert variables["moe_bias"]["bias"].shape == (6,)
    count = sum(a.size for a in jax.tree.leaves(variables["params"]))
    assert count == layer.config.num_params(DIM) == DIM * 6 + 6 * 3 * DIM * 8 + 3 * DIM * 16


def test_active_params_and_flops():
    config = MoEConfig(num_experts=6, num_shared=2, top_k=2, expert_dim=8)
    assert config.active_params(DIM) == DIM * 6 + (2 + 2) * 3 * DIM * 8
    assert config.flops_per_token(DIM) == 2 * config.active_params(DIM)


def test_params_carry_logical_axes():
    layer, _, x = make()
    specs = nn.get_partition_spec(jax.eval_shape(layer.init, jax.random.key(0), x))["params"]
    assert specs["router"] == P("embed", "experts")
    assert specs["w_gate"] == specs["w_up"] == P("experts", "embed", "expert_mlp")
    assert specs["w_down"] == P("experts", "expert_mlp", "embed")
    assert specs["shared"]["w_gate"] == P("embed", "mlp")


def test_bfloat16_runs_and_tracks_float32():
    layer, variables, x = make()
    ref, _ = forward(layer, variables, x)
    out, _ = forward(MoE(layer.config, dtype=jnp.bfloat16), variables, x)
    chex.assert_type(out, jnp.bfloat16)
    # The router stays float32, so the same experts are chosen; bfloat16 keeps 8
    # significant bits (2^-8 = 0.004 relative per rounding), |output| here up to ~3
    # (observed max error 0.02).
    chex.assert_trees_all_close(out.astype(jnp.float32), ref, rtol=0, atol=0.1)


@pytest.mark.parametrize("field,value", [
    ("top_k", 7), ("top_k", 0), ("num_experts", 0), ("num_shared", -1), ("expert_dim", 0),
    ("route_scale", 0.0), ("bias_update_rate", -1e-3), ("implementation", "sparse"), ("capacity_factor", -1.0),
])
def test_bad_config_names_field(field, value):
    with pytest.raises(ConfigError, match=rf"MoEConfig\.{field}"):
        MoEConfig(num_experts=6).replace(**{field: value})


def test_bad_input_raises():
    layer, variables, x = make()
    with pytest.raises(ValueError, match=r"MoE: x must be a floating \[B, T, D\]"):
        layer.apply(variables, x[0])


# ---------------------------------------------------------------- expert parallelism (8 CPU devices)


def ep_mesh(data, fsdp, expert):
    return sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, expert=expert),
                              jax.devices()[: data * fsdp * expert])


def with_mesh(layer, variables, mesh):
    """The layer on `mesh`, and its variables with expert kernels padded as it stores them
    (padding experts drawn at random: they must never be used)."""
    parallel = MoE(layer.config, mesh=mesh)
    stored = layer.config.padded_experts(sharding.axis_size(mesh, sharding.EXPERT))
    rng = np.random.default_rng(7)

    def pad(name, w):
        if name not in ("w_gate", "w_up", "w_down") or stored == w.shape[0]:
            return w
        extra = rng.normal(size=(stored - w.shape[0], *w.shape[1:])) * 1e3
        return jnp.concatenate([w, jnp.asarray(extra, w.dtype)])

    params = {k: pad(k, v) for k, v in variables["params"].items()}
    return parallel, {**variables, "params": params}


def apply_with_drops(layer, variables, x):
    out, state = layer.apply(variables, x, mutable=["intermediates"])
    inter = state["intermediates"]
    return out, inter["expert_load"][0], inter["moe_dropped"][0]


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 2, 4), (1, 1, 8)])
def test_expert_parallel_equals_one_device_when_nothing_is_dropped(mesh_shape):
    layer, variables, x = make(batch=16, num_experts=7, capacity_factor=0.0)  # 7 experts: padded on 2, 4, 8
    parallel, padded = with_mesh(layer, variables, ep_mesh(*mesh_shape))
    ref, ref_load = forward(layer, variables, x)
    out, load, dropped = jax.jit(apply_with_drops, static_argnums=0)(parallel, padded, x)
    assert int(dropped) == 0
    chex.assert_trees_all_close(out, ref, rtol=0, atol=1e-5)
    chex.assert_trees_all_close(load, ref_load, rtol=0, atol=0)  # global counts, not one device's

    def loss(layer, v):
        return jnp.sum(layer.apply(v, x, mutable=["intermediates"])[0] ** 2)

    g_ref = jax.jit(jax.grad(partial(loss, layer)))(variables)["params"]
    g = jax.jit(jax.grad(partial(loss, parallel)))(padded)["params"]
    for name in ("w_gate", "w_up", "w_down"):
        assert not np.any(np.asarray(g[name][7:]))  # padding experts receive nothing
        g[name] = g[name][:7]
    chex.assert_trees_all_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_experts_are_stored_padded_to_the_expert_axis():
    layer = MoE(MoEConfig(num_experts=55, expert_dim=8), mesh=ep_mesh(1, 1, 8))
    shapes = jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((1, 2, DIM)))
    assert nn.unbox(shapes)["params"]["w_gate"].shape == (56, DIM, 8)
    assert nn.unbox(shapes)["params"]["router"].shape == (DIM, 55)  # no column: never routed to
    assert MoEConfig(num_experts=55).padded_experts(4) == 56 and MoEConfig(num_experts=55).padded_experts(1) == 55


def expected_with_drops(layer, variables, x, devices, expert_axis, capacity):
    """NumPy: each device's copies beyond `capacity` per destination dropped."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    xs = np.asarray(x, np.float64).reshape(-1, DIM)
    scores = hand_scores(variables, x)
    cfg = layer.config
    local = cfg.padded_experts(expert_axis) // expert_axis
    out = np_swiglu(xs, p["shared"]["w_gate"], p["shared"]["w_up"], p["shared"]["w_down"])
    dropped = 0
    for shard in np.split(np.arange(len(xs)), devices):
        filled = np.zeros(expert_axis, int)
        for n in shard:
            chosen = np.argsort(-scores[n])[: cfg.top_k]
            for e in chosen:  # in slot order, as the layer fills buckets
                if filled[e // local] == capacity:
                    dropped += 1
                    continue
                filled[e // local] += 1
                w = scores[n, e] / scores[n, chosen].sum()
                out[n] += w * np_swiglu(xs[n], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
    return out, dropped


def test_full_buckets_drop_copies_and_count_them():
    layer, variables, x = make(batch=16, num_experts=8, capacity_factor=0.5)
    parallel, padded = with_mesh(layer, variables, ep_mesh(2, 1, 4))
    out, _, dropped = jax.jit(apply_with_drops, static_argnums=0)(parallel, padded, x)
    capacity = layer.config.capacity(16 * 6 // 8 * 2, 4)  # N_l K copies per device, 4 destinations
    assert capacity == 3
    expected, expected_dropped = expected_with_drops(layer, variables, x, 8, 4, capacity)
    assert int(dropped) == expected_dropped > 0
    chex.assert_trees_all_close(out.reshape(-1, DIM), expected, rtol=0, atol=1e-5)


def compiled_moe_hlo(mesh, batch, expert_parallel=True, seq=8):
    """The HLO of one MoE layer's forward and backward, batch split over every device."""
    layer = MoE(MoEConfig(num_experts=7, num_shared=0, top_k=2, expert_dim=8), mesh=mesh if expert_parallel else None)
    boxed = jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((1, seq, DIM)))
    shardings = sharding.tree_shardings(mesh, sharding.logical_axes(boxed), nn.unbox(boxed))
    variables = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), nn.unbox(boxed),
                             shardings)
    x = jax.ShapeDtypeStruct((batch, seq, DIM), jnp.float32, sharding=sharding.batch_sharding(mesh))
    grad = jax.grad(lambda v, x: jnp.sum(layer.apply(v, x, mutable=["intermediates"])[0] ** 2))
    return jax.jit(grad).lower(variables, x).compile().as_text()


def test_compiled_expert_parallel_layer_exchanges_local_tokens_all_to_all():
    text = compiled_moe_hlo(ep_mesh(2, 1, 4), batch=32)
    moved = hlo.collective_bytes(text)
    assert moved["all-to-all"] > 0
    assert "all-gather" not in moved  # no token copies or expert kernels gathered
    # What the all-to-alls move depends on the tokens per device: 32 over 8 devices
    # moves as much as 16 over 4, and twice as much as 16 over 8.
    same_local = hlo.collective_bytes(compiled_moe_hlo(ep_mesh(1, 1, 4), batch=16))
    half_local = hlo.collective_bytes(compiled_moe_hlo(ep_mesh(2, 1, 4), batch=16))
    assert same_local["all-to-all"] == moved["all-to-all"] == 2 * half_local["all-to-all"]
    # With fsdp, kernels are gathered inside the layer and their gradients reduce-scattered.
    assert "reduce-scatter" in hlo.collective_bytes(compiled_moe_hlo(ep_mesh(1, 2, 4), batch=32))
    # GSPMD's MoE, for contrast, gathers over the global batch.
    assert "all-gather" in hlo.collective_bytes(compiled_moe_hlo(ep_mesh(2, 1, 4), 32, expert_parallel=False))
