"""The mesh, the logical-axis rules and the shardings derived from them (8 CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from engram_jax import sharding
from engram_jax.config_base import ConfigError


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(sharding.MeshConfig(model=2))  # data 4 x model 2


def test_mesh_splits_devices_into_data_and_model(mesh):
    assert dict(mesh.shape) == {"data": 4, "model": 2}


def test_mesh_refuses_a_model_axis_that_does_not_divide_the_devices():
    with pytest.raises(ValueError, match="does not divide"):
        sharding.make_mesh(sharding.MeshConfig(model=3))


def test_mesh_config_rejects_a_model_axis_below_one():
    with pytest.raises(ConfigError, match="model"):
        sharding.MeshConfig(model=0)


def test_experts_go_to_the_model_axis_and_the_rest_replicates():
    assert sharding.logical_to_spec(("experts", "embed", "mlp")) == PartitionSpec("model", None, None)
    assert sharding.logical_to_spec(("embed", "vocab")) == PartitionSpec(None, None)
    assert sharding.logical_to_spec(("engram_rows", "engram_dim")) == PartitionSpec(None, None)  # not params


@pytest.mark.parametrize("placement, kind", [("device", "device"), ("host", "pinned_host")])
def test_table_state_splits_rows_over_the_table_axes_in_its_memory_kind(mesh, placement, kind):
    rows = sharding.table_sharding(mesh, ("data", "model"), placement, 2)
    assert rows.spec == PartitionSpec(("data", "model"), None) and rows.memory_kind == kind
    placed = jax.device_put(jnp.zeros((16, 4)), rows)
    assert {s.data.shape for s in placed.addressable_shards} == {(2, 4)}  # 1/8 of the rows each
    assert sharding.table_sharding(mesh, ("model",), placement, 1).spec == PartitionSpec(("model",))


def test_mesh_config_rejects_unknown_table_axes():
    with pytest.raises(ConfigError, match="table_axes"):
        sharding.MeshConfig(table_axes=("rows",))


def test_optimizer_moments_follow_their_parameters(mesh):
    params = {"experts": {"kernel": jnp.zeros((8, 4))}, "dense": {"kernel": jnp.zeros((4, 4))}}
    shardings = sharding.tree_shardings(mesh, {"experts": {"kernel": ("experts", "embed")},
                                               "dense": {"kernel": ("embed", "mlp")}})
    replicated = NamedSharding(mesh, PartitionSpec())
    state = optax.adamw(1e-3).init(params)
    result = sharding.like_params(state, shardings, replicated)
    adam = result[0]
    for moment in (adam.mu, adam.nu):
        assert moment["experts"]["kernel"].spec == PartitionSpec("model", None)
        assert moment["dense"]["kernel"].spec == PartitionSpec(None, None)
    assert adam.count is replicated
    # The shardings place the real state: the experts' moments are split over the model axis.
    placed = jax.device_put(state, result)
    assert placed[0].mu["experts"]["kernel"].addressable_shards[0].data.shape == (4, 4)


def test_global_batch_splits_the_first_axis_over_data(mesh):
    batch = {"inputs": np.arange(8 * 3).reshape(8, 3), "hash_ids": {1: np.zeros((8, 3, 2), np.int32)}}
    arrays = sharding.global_batch(mesh, batch)
    np.testing.assert_array_equal(np.asarray(arrays["inputs"]), batch["inputs"])
    assert arrays["hash_ids"][1].sharding.spec == PartitionSpec("data")
    assert {s.data.shape for s in arrays["inputs"].addressable_shards} == {(2, 3)}
