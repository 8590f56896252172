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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A state after two steps on data 4 x model 2 (tables over all 8 devices), saved."""
    setup = Setup(optim_config=LAZY, mesh_shape=(4, 2))
    state = setup.init()
    for s in range(2):
        state, _ = setup.train(state, batch_of(CONFIG, seed=s))
    directory = tmp_path_factory.mktemp("ckpt")
    checkpoints = Checkpoints(directory)
    checkpoints.save(2, state, {"model": {}}, force=True)
    checkpoints.wait()
    checkpoints.close()
    return directory, jax.tree.map(np.asarray, state)


def abstract(setup):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        jax.eval_shape(setup.init), setup.sharding)


@pytest.mark.parametrize("mesh_shape, placement", [((1, 1), "device"), ((2, 2), "host"), ((8, 1), "host")])
def test_tables_and_slots_restore_onto_another_device_count_and_placement(saved, mesh_shape, placement):
    directory, state = saved
    config = CONFIG.replace(engram=CONFIG.engram.replace(placement=placement))
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
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored.params), state.params)
    assert int(restored.step) == 2
    restored, _ = setup.train(restored, batch_of(CONFIG, seed=5))  # and it trains on
    assert int(restored.step) == 3


def test_model_restore_reads_rows_without_their_slots(saved):
    directory, state = saved
    setup = Setup(optim_config=LAZY, mesh_shape=(1, 1))
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
