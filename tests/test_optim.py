"""Optimizers: the backbone's from logical axes, Muon's RMS, the tables' row optimizer, clipping."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import configs, model, sharding
from engram_jax.config_base import ConfigError
from engram_jax.optim import (OptimConfig, build_optimizer, clip_scale, is_matrix, muon_dimensions, schedule,
                               table_optimizer)

AXES = {"kernel": ("embed", "mlp"), "scale": ("embed",)}


def one_update(config, params, grads):
    tx = build_optimizer(config, AXES, total_steps=100)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_matrices_are_decayed_and_vectors_are_not():
    config = OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant", clip_norm=0.0,
                         weight_decay=0.1, eps=1e-12)
    params = {k: jnp.full((4, 3) if len(a) == 2 else (3,), 2.0) for k, a in AXES.items()}
    grads = jax.tree.map(jnp.ones_like, params)
    updates = one_update(config, params, grads)
    # Adam's first step moves each weight by lr * g / |g| = lr; decoupled decay adds lr * wd * w.
    np.testing.assert_allclose(updates["kernel"], -1e-2 - 1e-2 * 0.1 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["scale"], -1e-2, rtol=1e-6)


def test_tables_are_not_parameters_of_the_optax_optimizer():
    config = configs.get("tiny")
    axes = sharding.logical_axes(model.variable_shapes(config))["params"]
    names = {names for names in jax.tree.leaves(axes, is_leaf=sharding.is_axes)}
    assert ("engram_rows", "engram_dim") not in names


def test_table_optimizer_follows_the_config():
    row = table_optimizer(OptimConfig(table_algorithm="adagrad", eps=1e-6, table_weight_decay=0.01))
    assert (row.algorithm, row.eps, row.weight_decay) == ("adagrad", 1e-6, 0.01)
    assert table_optimizer(OptimConfig()).algorithm == "lazy_adam"  # the default
    with pytest.raises(ConfigError, match="table_algorithm"):
        OptimConfig(table_algorithm="adafactor")


@pytest.mark.parametrize("shape", [(2560, 1536), (64, 512), (300, 40)])
def test_muon_update_rms_is_a_fifth_of_the_learning_rate_whatever_the_shape(shape):
    lr = 1e-2
    tx = build_optimizer(OptimConfig(algorithm="muon", learning_rate=lr, warmup_steps=0, schedule="constant",
                                     weight_decay=0.0), {"w": ("embed", "mlp")}, 10)
    params = {"w": jnp.zeros(shape)}
    grads = {"w": jax.random.normal(jax.random.key(0), shape)}
    updates, _ = tx.update(grads, tx.init(params), params)
    rms = float(jnp.sqrt(jnp.mean(updates["w"] ** 2)))
    # Moonlight's RMS matching (AdamW's ~0.2); five Newton-Schulz steps leave singular
    # values in about [0.7, 1.1], hence "about".
    assert rms == pytest.approx(0.2 * lr, rel=0.25)


def test_muon_without_rms_matching_shrinks_with_the_matrix():
    tx = build_optimizer(OptimConfig(algorithm="muon", learning_rate=1.0, warmup_steps=0, schedule="constant",
                                     weight_decay=0.0, muon_rms=0.0), {"w": ("embed", "mlp")}, 10)
    params = {"w": jnp.zeros((2560, 1536))}
    updates, _ = tx.update({"w": jax.random.normal(jax.random.key(0), (2560, 1536))}, tx.init(params), params)
    assert float(jnp.sqrt(jnp.mean(updates["w"] ** 2))) < 0.05  # about 1 / sqrt(2560) of the rate


@pytest.mark.parametrize("names, reduction, output", [
    (("embed", "heads", "head_dim"), (0,), (1, 2)),
    (("heads", "head_dim", "embed"), (0, 1), 2),
    (("experts", "embed", "expert_mlp"), 1, (2,)),
    (("experts", "expert_mlp", "embed"), (1,), 2),
    (("engram_memory", "engram_slot", "embed"), 0, (1, 2)),
])
def test_muon_sees_kernels_as_input_by_output_matrices(names, reduction, output):
    dims = muon_dimensions(names)
    as_tuple = lambda x: tuple(np.atleast_1d(x))  # noqa: E731
    assert as_tuple(dims.reduction_axis) == as_tuple(reduction)
    assert as_tuple(dims.output_axis) == as_tuple(output)


@pytest.mark.parametrize("names, reduction, output", [
    (("layers", "embed", "heads", "head_dim"), (1,), (2, 3)),
    (("layers", "experts", "embed", "expert_mlp"), 2, (3,)),
    (("layers", "experts", "expert_mlp", "embed"), (2,), 3),
])
def test_muon_sees_stacked_layers_and_experts_as_batches_of_matrices(names, reduction, output):
    dims = muon_dimensions(names)
    as_tuple = lambda x: tuple(np.atleast_1d(x))  # noqa: E731
    assert as_tuple(dims.reduction_axis) == as_tuple(reduction)
    assert as_tuple(dims.output_axis) == as_tuple(output)


def test_stacked_vectors_are_neither_muon_matrices_nor_decayed():
    assert muon_dimensions(("layers", "embed")) is None
    assert not is_matrix(("layers", "embed")) and not is_matrix(("layers", "experts", "embed"))
    assert is_matrix(("layers", "embed", "mlp")) and is_matrix(("embed", "mlp"))


def test_muon_updates_stacked_layers_as_each_layer_alone():
    """Stacked [L, E, D, F] kernels get, layer by layer, the update Muon gives one [E, D, F]
    kernel (and a plain matrix beside them is unaffected by the stacking)."""
    config = OptimConfig(algorithm="muon", learning_rate=1e-2, warmup_steps=0, schedule="constant")
    rng = np.random.default_rng(0)
    draw = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    params = {"w": draw(3, 4, 16, 8), "norm": draw(3, 16), "v": draw(16, 8)}
    grads = jax.tree.map(lambda p: draw(*p.shape), params)
    stacked_axes = {"w": ("layers", "experts", "embed", "expert_mlp"), "norm": ("layers", "embed"),
                    "v": ("embed", "mlp")}
    tx = build_optimizer(config, stacked_axes, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_equal_shapes(updates, params)
    one_axes = {"w": ("experts", "embed", "expert_mlp"), "norm": ("embed",), "v": ("embed", "mlp")}
    one = build_optimizer(config, one_axes, 10)
    for layer in range(3):
        p = {"w": params["w"][layer], "norm": params["norm"][layer], "v": params["v"]}
        g = {"w": grads["w"][layer], "norm": grads["norm"][layer], "v": grads["v"]}
        expected, _ = one.update(g, one.init(p), p)
        chex.assert_trees_all_close(updates["w"][layer], expected["w"], rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_close(updates["norm"][layer], expected["norm"], rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_close(updates["v"], expected["v"], rtol=1e-5, atol=1e-7)


def test_muon_updates_runs_of_stacked_blocks_of_different_lengths():
    """engram-27b scans 13 and 14 blocks: each run is its own group of layers."""
    config = OptimConfig(algorithm="muon", learning_rate=1e-2, warmup_steps=0, schedule="constant")
    axes = {"blocks_2_4": {"kernel": ("layers", "embed", "mlp")}, "blocks_6_7": {"kernel": ("layers", "embed", "mlp")}}
    params = {"blocks_2_4": {"kernel": jnp.ones((3, 16, 8))}, "blocks_6_7": {"kernel": jnp.ones((2, 16, 8))}}
    tx = build_optimizer(config, axes, 10)
    updates, _ = tx.update(params, tx.init(params), params)
    chex.assert_trees_all_equal_shapes(updates, params)


@pytest.mark.parametrize("names", [("embed",), ("vocab", "embed"), ("embed", "vocab")])
def test_vectors_and_vocabulary_stay_with_adam(names):
    assert muon_dimensions(names) is None


def test_muon_updates_a_model():
    config = configs.get("tiny")
    shapes = model.variable_shapes(config)
    axes = sharding.logical_axes(shapes)["params"]
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype) * 0.1, jax.tree.map(
        lambda x: x.value if hasattr(x, "value") else x, shapes["params"], is_leaf=lambda x: hasattr(x, "value")))
    tx = build_optimizer(OptimConfig(algorithm="muon"), axes, total_steps=10)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_warmup_then_step_decay():
    lr = schedule(OptimConfig(learning_rate=1.0, warmup_steps=10, schedule="step"), total_steps=100)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(50)) == pytest.approx(1.0)
    assert float(lr(85)) == pytest.approx(0.316)
    assert float(lr(95)) == pytest.approx(0.1)


def test_cosine_ends_at_the_floor():
    lr = schedule(OptimConfig(learning_rate=2.0, warmup_steps=0, min_lr_ratio=0.1), total_steps=50)
    assert float(lr(0)) == pytest.approx(2.0) and float(lr(50)) == pytest.approx(0.2)


def test_clip_scale_caps_the_global_norm():
    assert float(clip_scale(jnp.float32(4.0), 1.0)) == pytest.approx(0.25)
    assert float(clip_scale(jnp.float32(0.5), 1.0)) == 1.0
    assert float(clip_scale(jnp.float32(100.0), 0.0)) == 1.0  # 0 disables clipping
