"""The Engram layer: golden parity with DeepSeek's demo, gating, conv, switches, shapes."""

import json
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import table
from engram_jax.convert import engram_params_from_torch
from engram_jax.engram import Engram, EngramConfig
from engram_jax.table import head_offsets

GOLDEN_CONFIG = dict(layer_ids=(1, 3), max_ngram_size=3, heads_per_ngram=4, embed_per_ngram=32,
                     table_sizes=(997, 1499), pad_id=2, seed=0, conv_zero_init=False)

# Runs in a fresh interpreter so that x64 is enabled only there.
FLOAT64_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
sys.path.insert(0, {tests!r})
from test_engram import golden_forward
out, ref = golden_forward({data!r}, jnp.float64)
print(json.dumps({{"dtype": str(out.dtype), "max_abs_err": float(np.abs(np.asarray(out) - ref).max())}}))
"""


def golden_forward(path, dtype):
    data = np.load(path)
    config = EngramConfig(**GOLDEN_CONFIG)
    weights = {k.removeprefix("param/"): data[k] for k in data.files if k.startswith("param/")}
    params, rows = jax.tree.map(lambda x: jnp.asarray(x, dtype), engram_params_from_torch(weights, config, 1))
    hash_ids = config.make_hasher(data["compression_table"])(data["input_ids"])[1]
    memory = table.gather(rows, jnp.asarray(hash_ids), config.head_sizes(1))
    layer = Engram(config, layer_id=1, dtype=dtype, param_dtype=dtype)
    out = layer.apply({"params": params}, jnp.asarray(data["hidden_states"], dtype), memory)
    return out, data["output"]


def test_golden_output_float64(reference_dir):
    script = FLOAT64_SCRIPT.format(tests=str(reference_dir.parent.parent),
                                   data=str(reference_dir / "engram_forward_small.npz"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["dtype"] == "float64"
    assert report["max_abs_err"] < 1e-10


def test_golden_output_float32(reference_dir):
    out, ref = golden_forward(reference_dir / "engram_forward_small.npz", jnp.float32)
    assert out.dtype == jnp.float32
    # Float32 rounding: eps 1.2e-7, |output| up to 4.2, ~100 roundings on each path.
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-5)


class WithTable:
    """An Engram layer with its table beside it (params["table"]), composed as the train
    step composes them: gather the rows of the hash ids, then the layer."""

    def __init__(self, layer: Engram):
        self.layer, self.config, self.layer_id = layer, layer.config, layer.layer_id

    def apply(self, variables, hidden, hash_ids, **kwargs):
        params = dict(variables["params"])
        rows = params.pop("table")
        memory = table.gather(rows, hash_ids, self.config.head_sizes(self.layer_id))
        return self.layer.apply({"params": params}, hidden, memory.astype(self.layer.dtype), **kwargs)


def make(config=None, branches=4, dim=16, batch=2, seq=12, seed=0, dtype=jnp.float32, **overrides):
    config = (config or EngramConfig(layer_ids=(0, 3), max_ngram_size=3, heads_per_ngram=2,
                                     embed_per_ngram=8, table_sizes=(23, 31))).replace(**overrides)
    rng = np.random.default_rng(seed)
    shape = (batch, seq, branches, dim) if branches else (batch, seq, dim)
    hidden = jnp.asarray(rng.normal(size=shape), dtype)
    hasher = config.make_hasher(np.arange(50))
    hash_ids = jnp.asarray(hasher(rng.integers(0, 50, (batch, seq)))[0])
    layer = Engram(config, layer_id=0, dtype=dtype)
    rows = jnp.asarray(rng.normal(size=(config.table_rows(0), config.head_dim)), jnp.float32)
    memory = table.gather(rows, hash_ids, config.head_sizes(0))
    params = nn.unbox(layer.init(jax.random.key(seed), hidden, memory.astype(dtype))["params"])
    return WithTable(layer), {**params, "table": rows}, hidden, hash_ids


def gated_value(layer, params, hidden, hash_ids):
    """alpha_g * (W_V e + b_V), computed from the params, with alpha from the layer."""
    _, state = layer.apply({"params": params}, hidden, hash_ids, mutable=["intermediates"])
    gate = state["intermediates"]["gate"][0]  # [B, T, G]
    sizes = layer.config.head_sizes(layer.layer_id)
    rows = params["table"][hash_ids + head_offsets(sizes)]  # [B, T, H, Dh]
    e = rows.reshape(*hash_ids.shape[:2], -1)
    value = e @ params["kv_kernel"][:, 0] + params["kv_bias"][0]  # [B, T, D]
    return gate[..., None] * value[:, :, None, :]


class EngramLayerTest(chex.TestCase):
    """The layer traced (jit) and eager: same shapes, types and values."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_output_keeps_the_hidden_state_shape_and_type(self):
        layer, params, hidden, hash_ids = make()
        out = self.variant(layer.apply)({"params": params}, hidden, hash_ids)
        chex.assert_shape(out, hidden.shape)
        chex.assert_type(out, jnp.float32)
        chex.assert_tree_all_finite(out)

    @chex.variants(with_jit=True, without_jit=True)
    def test_zero_conv_output_equals_gated_value(self):
        layer, params, hidden, hash_ids = make()
        assert not np.any(params["short_conv"]["kernel"])  # zero-initialised by default
        out = self.variant(layer.apply)({"params": params}, hidden, hash_ids)
        chex.assert_trees_all_close(out, gated_value(layer, params, hidden, hash_ids), rtol=1e-6, atol=1e-6)


def test_nonzero_conv_changes_the_output():
    layer, params, hidden, hash_ids = make(conv_zero_init=False)
    out = layer.apply({"params": params}, hidden, hash_ids)
    assert np.abs(out - gated_value(layer, params, hidden, hash_ids)).max() > 1e-3


def test_table_gradient_is_nonzero_only_on_looked_up_rows():
    layer, params, hidden, hash_ids = make(conv_zero_init=False)
    cotangent = jax.random.normal(jax.random.key(1), hidden.shape)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, hidden, hash_ids) * cotangent)))(params)
    table_grad = np.asarray(grads["table"])
    looked_up = np.unique(np.asarray(hash_ids) + head_offsets(layer.config.head_sizes(0)))
    nonzero = np.flatnonzero(np.any(table_grad != 0, axis=1))
    np.testing.assert_array_equal(nonzero, looked_up)


@pytest.mark.parametrize("branches", [None, 1, 4])
def test_runs_under_jit_and_grad_for_any_branch_count(branches):
    layer, params, hidden, hash_ids = make(branches=branches)
    out = jax.jit(layer.apply)({"params": params}, hidden, hash_ids)
    assert out.shape == hidden.shape and out.dtype == jnp.float32
    grads = jax.jit(jax.grad(lambda p, h: jnp.sum(layer.apply({"params": p}, h, hash_ids) ** 2),
                             argnums=(0, 1)))(params, hidden)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.abs(grads[1]).max() > 0  # the hidden state reaches the output through the gate


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
    layer32, params, hidden, hash_ids = make(conv_zero_init=False)
    layer16 = WithTable(Engram(layer32.config, layer_id=0, dtype=jnp.bfloat16))
    out16 = layer16.apply({"params": params}, hidden.astype(jnp.bfloat16), hash_ids)
    out32 = layer32.apply({"params": params}, hidden, hash_ids)
    assert out16.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, rtol=0.05, atol=0.05)


def test_without_gating_the_output_ignores_the_hidden_state():
    layer, params, hidden, hash_ids = make(gating=False)
    assert "key_norm" not in params and params["kv_kernel"].shape[1] == 1
    a = layer.apply({"params": params}, hidden, hash_ids)
    b = layer.apply({"params": params}, hidden * 3 + 1, hash_ids)
    np.testing.assert_array_equal(a, b)


def test_without_short_conv_the_output_is_the_gated_value():
    layer, params, hidden, hash_ids = make(short_conv=False)
    assert "short_conv" not in params
    out = layer.apply({"params": params}, hidden, hash_ids)
    np.testing.assert_allclose(out, gated_value(layer, params, hidden, hash_ids), rtol=1e-6, atol=1e-6)


def test_single_branch_fusion_takes_one_stream():
    layer, params, hidden, hash_ids = make(branches=None, multi_branch=False)
    assert params["kv_kernel"].shape[1] == 2  # value + one key
    assert layer.apply({"params": params}, hidden, hash_ids).shape == hidden.shape
    with pytest.raises(ValueError, match="multi_branch=False"):
        layer.apply({"params": params}, jnp.stack([hidden] * 4, axis=2), hash_ids)


def test_a_further_ngram_order():
    config = EngramConfig(layer_ids=(0,), max_ngram_size=4, heads_per_ngram=2, embed_per_ngram=8,
                          table_sizes=(23, 31, 37))
    layer, params, hidden, hash_ids = make(config)
    assert hash_ids.shape[-1] == 6 and params["kv_kernel"].shape[0] == 24
    assert np.all(np.isfinite(layer.apply({"params": params}, hidden, hash_ids)))


def test_without_compression_the_hasher_uses_raw_ids():
    config = EngramConfig(layer_ids=(0,), heads_per_ngram=2, embed_per_ngram=8, table_sizes=(23, 31))
    lookup = np.arange(50) // 2
    ids = np.random.default_rng(0).integers(0, 50, (2, 10))
    raw = config.replace(compress_tokens=False).make_hasher(lookup)
    assert raw.num_compressed == 50
    np.testing.assert_array_equal(raw(ids)[0], config.make_hasher(np.arange(50))(ids)[0])
    assert not np.array_equal(raw(ids)[0], config.make_hasher(lookup)(ids)[0])


def test_output_is_causal_in_the_hash_ids():
    layer, params, hidden, hash_ids = make(conv_zero_init=False, seq=16)
    changed = hash_ids.at[:, 10:].set((hash_ids[:, 10:] + 1) % 23)
    a = layer.apply({"params": params}, hidden, hash_ids)
    b = layer.apply({"params": params}, hidden, changed)
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert np.abs(a[:, 10:] - b[:, 10:]).max() > 0


@pytest.mark.parametrize("hidden_shape, memory_shape, message", [
    ((2, 12, 4, 16), (2, 12, 20), "memory must be"),
    ((2, 12, 4, 16), (2, 11, 16), "memory must be"),
    ((2, 12), (2, 12, 16), "hidden must be"),
])
def test_wrong_shapes_are_clear_errors(hidden_shape, memory_shape, message):
    layer, params, _, _ = make()
    del params["table"]
    with pytest.raises(ValueError, match=message):
        layer.layer.apply({"params": params}, jnp.zeros(hidden_shape), jnp.zeros(memory_shape))


def test_hash_ids_of_the_wrong_width_or_type_are_rejected_by_the_lookup():
    layer, params, _, hash_ids = make()
    sizes = layer.config.head_sizes(0)
    with pytest.raises(AssertionError):
        table.gather(params["table"], hash_ids[..., :3], sizes)
    with pytest.raises(AssertionError):
        table.gather(params["table"], hash_ids.astype(jnp.float32), sizes)


def test_the_layer_owns_no_table():
    config = EngramConfig(layer_ids=(0,), heads_per_ngram=2, embed_per_ngram=8, table_sizes=(23, 31))
    hidden, memory = jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, config.memory_dim))
    shapes = jax.eval_shape(lambda: Engram(config, 0).init(jax.random.key(0), hidden, memory))["params"]
    assert set(shapes) == {"kv_kernel", "kv_bias", "key_norm", "query_norm", "short_conv"}
    assert tuple(nn.get_partition_spec(shapes)["kv_kernel"]) == ("engram_memory", "engram_slot", "embed")


def test_conversion_rejects_weights_that_do_not_fit(reference_dir):
    data = np.load(reference_dir / "engram_forward_small.npz")
    weights = {k.removeprefix("param/"): data[k] for k in data.files if k.startswith("param/")}
    config = EngramConfig(**GOLDEN_CONFIG)
    with pytest.raises(ValueError, match="config expects"):
        engram_params_from_torch(weights, config.replace(table_sizes=(997, 1500)), 1)
    del weights["norm1.2.weight"]
    with pytest.raises(ValueError, match="norm1.2.weight"):
        engram_params_from_torch(weights, config, 1)


@pytest.mark.parametrize("gating,short_conv,signed_sqrt,branches", [
    (True, True, True, 4), (True, True, False, 1), (True, False, True, 4), (False, True, True, 4),
    (False, False, True, 1)])
def test_hand_backward_matches_autodiff_of_the_forward(gating, short_conv, signed_sqrt, branches):
    """`_mix`'s custom_vjp (issue 20) against jax.grad of the same forward, float32."""
    from engram_jax import engram as engram_lib

    spec = engram_lib._MixSpec(dtype=jnp.dtype(jnp.float32), gating=gating, signed_sqrt=signed_sqrt,
                               gate_eps=1e-6, short_conv=short_conv, conv_eps=1e-5, dilation=3)
    rng = np.random.default_rng(0)
    b, t, d, g = 2, 13, 8, branches
    kv = jnp.asarray(rng.normal(size=(b, t, 1 + g if gating else 1, d)), jnp.float32)
    hidden = jnp.asarray(rng.normal(size=(b, t, g, d)), jnp.float32)
    params = {"kv_bias": jnp.asarray(rng.normal(size=kv.shape[2:]), jnp.float32)}
    if gating:
        params["key_scale"] = jnp.asarray(1 + 0.3 * rng.normal(size=(g, d)), jnp.float32)
        params["query_scale"] = jnp.asarray(1 + 0.3 * rng.normal(size=(g, d)), jnp.float32)
    if short_conv:
        params["conv_scale"] = jnp.asarray(1 + 0.3 * rng.normal(size=(g, d)), jnp.float32)
        params["conv_kernel"] = jnp.asarray(rng.normal(size=(4, g, d)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(b, t, g, d)), jnp.float32)
    gate_weights = jnp.asarray(rng.normal(size=(b, t, g)), jnp.float32)

    def loss(mix):
        def value(kv, hidden, params):
            y, gate = mix(kv, hidden, params)
            return jnp.sum(y * weights) + (0 if gate is None else jnp.sum(gate * gate_weights))
        return jax.jit(jax.grad(value, argnums=(0, 1, 2)))

    auto = loss(lambda *a: engram_lib._mix_forward(*a, spec)[0])(kv, hidden, params)
    hand = loss(lambda *a: engram_lib._mix(*a, spec))(kv, hidden, params)
    for want, got in zip(jax.tree.leaves(auto), jax.tree.leaves(hand)):
        # Float32 rounding on both paths, relative to the gradient's size.
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                                   atol=2e-5 * float(np.abs(np.asarray(want)).max()))
