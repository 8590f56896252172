"""Orbax checkpoints of the train state: tables restore onto other meshes and placements."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from engram_jax.checkpoint import CheckpointError, Checkpoints
from test_training import CONFIG, OPTIM, Setup, batch_of

LAZY = OPTIM.replace(table_algorithm="lazy_adam")
ROWS = CONFIG.engram.table_rows(1)
# Five experts: stored as 8 on an expert axis of 4, 6 on 2, 5 on one device.
EP_CONFIG = CONFIG.replace(moe=CONFIG.moe.replace(num_experts=5, capacity_factor=0.0))
EXPERTS = EP_CONFIG.moe.num_experts


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A state after two steps on data 2 x expert 4 (tables over all 8 devices), saved,
    and the loss of a third step taken there."""
    setup = Setup(EP_CONFIG, LAZY, mesh_shape=(2, 1, 4))
    state = setup.init()
    for s in range(2):
        state, _ = setup.train(state, batch_of(CONFIG, seed=s))
    directory = tmp_path_factory.mktemp("ckpt")
    checkpoints = Checkpoints(directory)
    checkpoints.save(2, state, {"model": {}}, force=True)
    checkpoints.wait()
    checkpoints.close()
    kept = jax.tree.map(np.asarray, state)
    _, metrics = setup.train(state, batch_of(CONFIG, seed=5))
    return directory, kept, float(metrics["loss"])


def abstract(setup):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        setup.init.abstract(), setup.sharding)


def real_experts(tree):
    """`tree` with expert kernels (and their moments) cut to the real experts: the
    padding experts differ by mesh."""
    def cut(path, x):
        keys = {getattr(k, "key", None) for k in path}
        x = np.asarray(x)
        return x[:EXPERTS] if keys & {"w_gate", "w_up", "w_down"} and "moe" in keys else x

    return jax.tree_util.tree_map_with_path(cut, tree)


@pytest.mark.parametrize("mesh_shape, placement", [((4, 1, 2), "host"), ((1, 1, 1), "device")])
def test_the_state_restores_onto_another_mesh_and_placement_and_trains_on(saved, mesh_shape, placement):
    directory, state, next_loss = saved
    config = EP_CONFIG.replace(engram=CONFIG.engram.replace(placement=placement))
    setup = Setup(config, LAZY, mesh_shape=mesh_shape)
    restored = Checkpoints(directory).restore(abstract(setup))
    rows = restored.tables.rows["layer_1"]
    assert rows.shape[0] == setup.tables.layouts[1].padded_rows  # the padding of the new shard count
    assert {x.sharding.memory_kind for x in jax.tree.leaves(restored.tables)} == {
        "pinned_host" if placement == "host" else "device"}
    np.testing.assert_array_equal(np.asarray(rows)[:ROWS], state.tables.rows["layer_1"][:ROWS])
    assert not np.any(np.asarray(rows)[ROWS:])  # padding rows stay zero
    for name, slot in restored.tables.slots["layer_1"].items():
        np.testing.assert_array_equal(np.asarray(slot)[:ROWS], state.tables.slots["layer_1"][name][:ROWS])
    stored = setup.config.moe.padded_experts(mesh_shape[2])
    assert restored.params["block_1"]["moe"]["w_gate"].shape[0] == stored
    chex.assert_trees_all_equal(real_experts(restored.params), real_experts(state.params))
    chex.assert_trees_all_equal(real_experts(restored.opt_state), real_experts(state.opt_state))
    assert int(restored.step) == 2
    restored, metrics = setup.train(restored, batch_of(CONFIG, seed=5))  # and it trains on, as before
    assert int(restored.step) == 3
    np.testing.assert_allclose(float(metrics["loss"]), next_loss, rtol=1e-5)


def test_model_restore_reads_rows_without_their_slots(saved):
    directory, state, _ = saved
    setup = Setup(EP_CONFIG, LAZY)
    target = abstract(setup)
    variables = Checkpoints(directory, read_only=True).restore_model(
        {"params": target.params, "moe_bias": target.moe_bias, "tables": target.tables.rows})
    assert set(variables) == {"params", "moe_bias", "tables"}
    np.testing.assert_array_equal(np.asarray(variables["tables"]["layer_1"])[:ROWS],
                                  state.tables.rows["layer_1"][:ROWS])


def test_a_checkpoint_whose_table_was_a_parameter_is_a_clear_error(tmp_path):
    old = {"params": {"block_1": {"engram": {"table": {"embedding": jnp.zeros((ROWS, 4))}}}}, "moe_bias": {}}
    manager = ocp.CheckpointManager(tmp_path)
    manager.save(1, args=ocp.args.Composite(model=ocp.args.StandardSave(old),
                                            opt=ocp.args.StandardSave({"count": jnp.zeros(())})))
    manager.wait_until_finished()
    manager.close()
    setup = Setup(optim_config=LAZY)
    with pytest.raises(CheckpointError, match="Engram tables were model parameters") as err:
        Checkpoints(tmp_path).restore(abstract(setup))
    assert "\n" not in str(err.value)
