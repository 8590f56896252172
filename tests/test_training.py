"""The pure train step: loss falls, biases move, tables train sparsely on any mesh and placement."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from engram_jax import configs, hlo, model, optim, sharding, table, training
from engram_jax.attention import AttentionConfig
from engram_jax.engram import EngramConfig
from engram_jax.mhc import MHCConfig
from engram_jax.model import ModelConfig
from engram_jax.moe import MoEConfig
from engram_jax.table import Tables

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


def mesh_of(shape):
    """A data x fsdp x expert mesh over the first prod(shape) devices."""
    data, fsdp, expert = shape
    return sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, expert=expert),
                              jax.devices()[: data * fsdp * expert])


class Setup:
    """A model, its table engine on a mesh, shardings and jitted steps.

    `expert_parallel`: the model gets the mesh (MoE in shard_map); False leaves the
    MoE to GSPMD, as one program over the global batch.
    """

    def __init__(self, config=CONFIG, optim_config=OPTIM, mesh_shape=(1, 1, 1), shard_axes=(), seed=0, hasher=None,
                 expert_parallel=True):
        self.config, self.mesh = config, mesh_of(mesh_shape)
        model_mesh = self.mesh if expert_parallel else None
        self.tables = Tables(config.engram, self.mesh, optim.table_optimizer(optim_config), shard_axes=shard_axes)
        shapes = nn.unbox(model.variable_shapes(config, model_mesh))
        axes = sharding.logical_axes(model.variable_shapes(config, model_mesh))["params"]
        self.tx = optim.build_optimizer(optim_config, axes, total_steps=100)
        rng = jax.random.key(seed)
        abstract = training.StateInit(config, self.tx, self.tables, rng, model_mesh).abstract()
        params = sharding.tree_shardings(self.mesh, axes, shapes["params"])
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.sharding = training.TrainState(
            step=replicated, params=params, moe_bias=jax.tree.map(lambda _: replicated, abstract.moe_bias),
            opt_state=sharding.like_params(abstract.opt_state, params, replicated), tables=self.tables.shardings())
        self.init = training.StateInit(config, self.tx, self.tables, rng, model_mesh, self.sharding)
        self.train, self.evaluate = training.jit_steps(
            config, self.tx, self.tables, optim.schedule(optim_config, 100), 0.01,
            table_lr_multiplier=optim_config.table_lr_multiplier, clip_norm=optim_config.clip_norm,
            state_sharding=self.sharding, batch_sharding=sharding.batch_sharding(self.mesh), hasher=hasher,
            mesh=model_mesh)

    def compile(self, batch: int, seq: int):
        """The train step compiled for a [batch, seq] batch, from abstract arrays only."""
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             self.init.abstract(), self.sharding)
        rows = sharding.batch_sharding(self.mesh)
        data = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows),
                            jax.eval_shape(lambda: batch_of(self.config, batch=batch, seq=seq)))
        return self.train.lower(state, data).compile()

    def losses(self, batches):
        state, out = self.init(), []
        for batch in batches:
            state, metrics = self.train(state, batch)
            out.append(float(metrics["loss"]))
        return state, out


@functools.lru_cache(maxsize=None)
def single():
    return Setup()


def test_repeated_steps_lower_the_loss():
    setup = single()
    state, losses = setup.losses([batch_of(CONFIG)] * 6)
    assert losses[-1] < losses[0] - 0.5
    assert int(state.step) == 6


def test_balancing_bias_moves_against_the_load():
    setup = single()
    state, metrics = setup.train(setup.init(), batch_of(CONFIG))
    load = np.asarray(metrics["moe_load/block_1"])
    bias = np.asarray(state.moe_bias["block_1"]["moe"]["bias"])
    np.testing.assert_allclose(bias, 0.01 * np.sign(load.mean() - load), atol=1e-7)
    assert metrics["moe_load_max/block_1"] >= 1.0 and "engram_gate/block_1" in metrics


def test_lookup_metrics_report_drops_and_the_fetched_share():
    setup = single()
    batch = batch_of(CONFIG)
    _, metrics = setup.train(setup.init(), batch)
    ids = np.asarray(setup.tables.global_ids(batch["hash_ids"])[1])
    assert int(metrics["engram_dropped/1"]) == int(metrics["engram_dropped_ids/1"]) == 0
    assert float(metrics["engram_fetched/1"]) == pytest.approx(len(np.unique(ids)) / ids.size)


def test_compiled_init_of_host_tables_has_no_table_sized_device_temporaries():
    """Tables in host memory are made there: the init's device program does not grow with them."""
    temps = []
    for scale in (1, 4):
        config = CONFIG.replace(engram=CONFIG.engram.replace(placement="host", table_sizes=(1009 * scale, 1013 * scale)))
        setup = Setup(config, mesh_shape=(8, 1, 1))
        compiled = setup.init.dense.lower(setup.init.model_rng).compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
        state = setup.init()
        assert {x.sharding.memory_kind for x in jax.tree.leaves(state.tables)} == {"pinned_host"}
    assert temps[1] <= temps[0]


def test_bfloat16_step_tracks_float32():
    config16 = CONFIG.replace(dtype="bfloat16")
    batch = batch_of(CONFIG)
    _, (loss32,) = single().losses([batch])
    state16, (loss16,) = Setup(config16).losses([batch])
    assert abs(loss16 - loss32) < 0.05 * loss32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state16.params))


def test_clipping_scales_backbone_and_tables_by_one_global_norm():
    tight = OPTIM.replace(clip_norm=1e-3, table_algorithm="sgd", algorithm="adamw")
    setup = Setup(optim_config=tight)
    state = setup.init()
    before = np.asarray(state.tables.rows["layer_1"])  # the step donates the state
    new, metrics = setup.train(state, batch_of(CONFIG))
    norm = float(metrics["grad_norm"])
    assert norm > 1e-3
    # SGD on the table moves rows by lr * g * clip / norm: the largest move is bounded by lr * clip.
    moved = np.abs(np.asarray(new.tables.rows["layer_1"]) - before)
    table_lr = tight.learning_rate * tight.table_lr_multiplier
    assert 0 < moved.max() <= table_lr * 1e-3 * (1 + 1e-5)


def test_hashing_in_the_step_gives_the_losses_of_hashing_in_the_pipeline():
    config = CONFIG.replace(engram=CONFIG.engram.replace(hash_on_device=True))
    hasher = config.engram.make_hasher(np.arange(config.vocab_size)).on_device()
    batches = [batch_of(CONFIG, seed=s) for s in range(4)]
    tokens_only = [{**b, "hash_ids": {}} for b in batches]
    _, from_pipeline = Setup(mesh_shape=(2, 2, 2)).losses(batches)
    _, in_step = Setup(config, mesh_shape=(2, 2, 2), hasher=hasher).losses(tokens_only)
    assert in_step == from_pipeline


# ---------------------------------------------------------------- sparse tables against dense ones


def dense_reference(config, optim_config, batches):
    """The model with plain table parameters: jax.grad through a dense gather, SGD on the tables."""
    setup = Setup(config, optim_config, expert_parallel=False)
    state = setup.init()
    lr = optim.schedule(optim_config, 100)
    sizes = {i: config.engram.head_sizes(i) for i in config.engram.layer_ids}

    @jax.jit
    def step(state, batch):
        def loss(params, rows):
            memory = {i: table.gather(rows[table.layer_key(i)], batch["hash_ids"][i], sizes[i])
                      for i in sizes}
            return training.forward(config, params, state.moe_bias, batch, memory)

        (value, inter), (g_params, g_rows) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            state.params, state.tables.rows)
        updates, opt_state = setup.tx.update(g_params, state.opt_state, state.params)
        table_lr = optim_config.table_lr_multiplier * lr(state.step)
        rows = jax.tree.map(lambda r, g: r - table_lr * g, state.tables.rows, g_rows)
        loads = training._module_values(inter, "expert_load")
        bias = {k: {"moe": {"bias": state.moe_bias[k]["moe"]["bias"] + 0.01 * jnp.sign(
            loads[(k, "moe")].mean() - loads[(k, "moe")])}} for k in state.moe_bias}
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state, moe_bias=bias, tables=state.tables.replace(rows=rows)), value

    losses = []
    for batch in batches:
        state, value = step(state, batch)
        losses.append(float(value))
    return state, losses


def test_sparse_sgd_equals_dense_sgd_exactly_over_ten_steps_of_tiny():
    config = configs.get("tiny")
    # The tables' learning rate is 2 x 0.0625 = 0.125, a power of two: lr * g is exact, so a
    # fused multiply-add cannot round differently from a separate multiply and subtract.
    sgd = optim.OptimConfig(algorithm="adamw", learning_rate=0.0625, warmup_steps=0, schedule="constant",
                            clip_norm=0.0, table_algorithm="sgd", table_lr_multiplier=2.0)
    batches = [batch_of(config, batch=4, seq=32, seed=s) for s in range(10)]
    sparse_state, sparse_losses = Setup(config, sgd, expert_parallel=False).losses(batches)
    dense_state, dense_losses = dense_reference(config, sgd, batches)
    assert sparse_losses == dense_losses
    chex.assert_trees_all_equal(sparse_state.tables.rows, dense_state.tables.rows)
    chex.assert_trees_all_equal(sparse_state.params, dense_state.params)


# ---------------------------------------------------------------- meshes and placements


# Devices add sums in other orders, so the runs differ in their last bits; at a large
# learning rate Adam's first step moves a row by +-lr whatever the size of its gradient,
# which amplifies that, hence lr 1e-3. The MoE routes the same top-k here (no near-ties
# in these 20 steps); a tie broken differently would show as a jump.
LAZY_SLOW = OPTIM.replace(table_algorithm="lazy_adam", learning_rate=1e-3)
NO_DROPS = CONFIG.replace(moe=CONFIG.moe.replace(capacity_factor=0.0))


@functools.lru_cache(maxsize=None)
def one_device_losses() -> list[float]:
    """Twenty steps of NO_DROPS on one device, the reference for every mesh."""
    return Setup(NO_DROPS, LAZY_SLOW, expert_parallel=False).losses(twenty_batches())[1]


def twenty_batches():
    return [batch_of(NO_DROPS, seed=s) for s in range(20)]


@pytest.mark.parametrize("mesh_shape, shard_axes", [((8, 1, 1), ()), ((2, 2, 2), ("expert",)), ((1, 2, 4), ())])
def test_one_device_and_eight_give_the_same_losses_for_twenty_steps(mesh_shape, shard_axes):
    state, eight = Setup(NO_DROPS, LAZY_SLOW, mesh_shape=mesh_shape, shard_axes=shard_axes).losses(twenty_batches())
    assert len(state.tables.rows["layer_1"].sharding.device_set) == 8
    np.testing.assert_allclose(eight, one_device_losses(), rtol=1e-4)


def test_host_and_device_placement_give_the_same_losses_for_thirty_steps():
    batches = [batch_of(CONFIG, seed=s) for s in range(30)]
    lazy = OPTIM.replace(table_algorithm="lazy_adam")
    device_state, on_device = Setup(optim_config=lazy, mesh_shape=(2, 2, 2)).losses(batches)
    host = Setup(CONFIG.replace(engram=CONFIG.engram.replace(placement="host")), lazy, mesh_shape=(2, 2, 2))
    host_state, on_host = host.losses(batches)
    assert {x.sharding.memory_kind for x in jax.tree.leaves(host_state.tables)} == {"pinned_host"}
    np.testing.assert_allclose(on_host, on_device, rtol=1e-6)
    chex.assert_trees_all_close(jax.tree.map(np.asarray, host_state.tables.rows),
                                jax.tree.map(np.asarray, device_state.tables.rows), atol=1e-6)


# ---------------------------------------------------------------- the compiled train step of tiny


@functools.lru_cache(maxsize=None)
def compiled_tiny(rows_scale: int, placement: str):
    """tiny's train step compiled for data 2 x fsdp 2 x expert 2, tables scaled by `rows_scale`."""
    base = configs.get("tiny")
    engram = base.engram.replace(table_sizes=tuple(s * rows_scale for s in base.engram.table_sizes),
                                 placement=placement)
    config = base.replace(engram=engram)
    setup = Setup(config, OPTIM.replace(table_algorithm="lazy_adam"), mesh_shape=(2, 2, 2))
    return setup, setup.compile(batch=16, seq=128)


@pytest.mark.parametrize("placement", ["device", "host"])
def test_compiled_step_traffic_and_temporaries_do_not_grow_with_the_tables(placement):
    _, small = compiled_tiny(1, placement)
    _, big = compiled_tiny(4, placement)
    assert hlo.collective_bytes(small.as_text()) == hlo.collective_bytes(big.as_text())
    assert small.memory_analysis().temp_size_in_bytes == big.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("placement", ["device", "host"])
def test_compiled_step_has_no_table_shaped_buffer_but_the_tables_and_slots(placement):
    setup, compiled = compiled_tiny(4, placement)
    shapes = {s for layout in setup.tables.layouts.values()
              for s in ((layout.rows_per_shard, layout.dim), (layout.rows_per_shard,))}
    ops = hlo.buffers_of_shape(compiled.as_text(), shapes)
    assert set(ops) <= {"parameter", "fusion", "scatter", "get-tuple-element", "tuple", "bitcast"}, ops
    for line in compiled.as_text().splitlines():
        result = line.split("=", 1)[1].strip().split(" ")[0] if " = " in line else ""
        if " fusion(" in line and any(f"[{','.join(map(str, s))}]" in result for s in shapes):
            assert "scatter" in line, line  # the only table-shaped fusions are the in-place row updates


def test_compiled_host_step_keeps_tables_and_slots_in_pinned_host():
    _, compiled = compiled_tiny(1, "host")
    state_in, state_out = compiled.input_shardings[0][0], compiled.output_shardings[0]
    for state in (state_in, state_out):
        assert {s.memory_kind for s in jax.tree.leaves(state.tables)} == {"pinned_host"}
        assert {s.memory_kind for s in jax.tree.leaves(state.params)} == {"device"}


@functools.lru_cache(maxsize=None)
def compiled_step(mesh_shape):
    """The train step of CONFIG for a [16, 16] batch, compiled for `mesh_shape`."""
    return Setup(CONFIG, OPTIM, mesh_shape=mesh_shape).compile(batch=16, seq=16)


def test_fsdp_splits_the_state_and_moves_weights_not_the_batch():
    replicated, split = compiled_step((8, 1, 1)), compiled_step((1, 8, 1))
    # Parameters and moments split 8 ways (tables are split over all 8 devices in both).
    assert split.memory_analysis().argument_size_in_bytes < replicated.memory_analysis().argument_size_in_bytes / 4
    moved = hlo.collective_bytes(split.as_text())
    assert moved.get("all-gather", 0) > 0 and moved.get("reduce-scatter", 0) > 0  # ZeRO-3: gather, reduce-scatter
    # No collective carries activations of the global batch [16, 16, ...] (each device keeps its rows).
    for _, result, opcode in hlo.instructions(split.as_text()):
        if opcode.removesuffix("-start") in hlo.COLLECTIVES:
            assert not any(shape[:2] == (16, 16) for _, shape in hlo.arrays(result)), (opcode, result)
