"""The mesh, the logical-axis rules and the shardings derived from them (8 CPU devices)."""

import json

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
    return sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, expert=2))


def test_mesh_has_data_fsdp_and_expert_axes(mesh):
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2}


@pytest.mark.parametrize("config, shape", [
    (sharding.MeshConfig(), {"data": 8, "fsdp": 1, "expert": 1}),
    (sharding.MeshConfig(expert=4), {"data": 2, "fsdp": 1, "expert": 4}),
    (sharding.MeshConfig(data=1, fsdp=-1, expert=2), {"data": 1, "fsdp": 4, "expert": 2}),
    (sharding.MeshConfig(data=2, fsdp=1, expert=2, dcn_data=2), {"data": 4, "fsdp": 1, "expert": 2}),
])
def test_one_axis_is_inferred_from_the_device_count(config, shape):
    assert config.shape(8) == shape


def test_mesh_refuses_axes_that_do_not_divide_the_devices():
    with pytest.raises(ValueError, match="does not divide"):
        sharding.make_mesh(sharding.MeshConfig(expert=3))
    with pytest.raises(ValueError, match="has 4 devices per slice, but there are 8"):
        sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, expert=1))


@pytest.mark.parametrize("field, value", [("expert", 0), ("fsdp", -2), ("dcn_data", 0), ("device_memory_gb", -1)])
def test_mesh_config_rejects_bad_sizes(field, value):
    with pytest.raises(ConfigError, match=field):
        sharding.MeshConfig(**{field: value})


def test_mesh_config_allows_one_inferred_axis_only():
    with pytest.raises(ConfigError, match="at most one"):
        sharding.MeshConfig(data=-1, fsdp=-1)


def test_weights_split_over_fsdp_experts_over_expert_and_batches_over_every_axis(mesh):
    assert sharding.logical_to_spec(("experts", "embed", "expert_mlp"), None, mesh) == PartitionSpec(
        "expert", "fsdp", None)
    assert sharding.logical_to_spec(("embed", "vocab"), None, mesh) == PartitionSpec("fsdp", None)
    assert sharding.logical_to_spec(("batch", None), None, mesh) == PartitionSpec(("data", "fsdp", "expert"), None)
    assert sharding.logical_to_spec(("engram_rows", "engram_dim"), None, mesh) == PartitionSpec(None, None)


def test_a_dimension_its_axes_do_not_divide_stays_replicated(mesh):
    assert sharding.logical_to_spec(("embed", "experts"), (16, 55), mesh) == PartitionSpec("fsdp", None)
    assert sharding.logical_to_spec(("embed",), (7,), mesh) == PartitionSpec(None)


@pytest.mark.parametrize("placement, kind", [("device", "device"), ("host", "pinned_host")])
def test_table_state_splits_rows_over_the_table_axes_in_its_memory_kind(mesh, placement, kind):
    rows = sharding.table_sharding(mesh, ("data", "fsdp", "expert"), placement, 2)
    assert rows.spec == PartitionSpec(("data", "fsdp", "expert"), None) and rows.memory_kind == kind
    placed = jax.device_put(jnp.zeros((16, 4)), rows)
    assert {s.data.shape for s in placed.addressable_shards} == {(2, 4)}  # 1/8 of the rows each
    assert sharding.table_sharding(mesh, ("expert",), placement, 1).spec == PartitionSpec(("expert",))


def test_mesh_config_rejects_unknown_table_axes():
    with pytest.raises(ConfigError, match="table_axes"):
        sharding.MeshConfig(table_axes=("rows",))


def test_optimizer_moments_follow_their_parameters(mesh):
    params = {"experts": {"kernel": jnp.zeros((8, 4))}, "dense": {"kernel": jnp.zeros((4, 4))}}
    shardings = sharding.tree_shardings(mesh, {"experts": {"kernel": ("experts", "mlp")},
                                               "dense": {"kernel": ("mlp", "mlp")}})
    replicated = NamedSharding(mesh, PartitionSpec())
    state = optax.adamw(1e-3).init(params)
    result = sharding.like_params(state, shardings, replicated)
    adam = result[0]
    for moment in (adam.mu, adam.nu):
        assert moment["experts"]["kernel"].spec == PartitionSpec("expert", None)
        assert moment["dense"]["kernel"].spec == PartitionSpec(None, None)
    assert adam.count is replicated
    # The shardings place the real state: the experts' moments are split over the expert axis.
    placed = jax.device_put(state, result)
    assert placed[0].mu["experts"]["kernel"].addressable_shards[0].data.shape == (4, 4)


def test_global_batch_splits_the_first_axis_over_every_device(mesh):
    batch = {"inputs": np.arange(8 * 3).reshape(8, 3), "hash_ids": {1: np.zeros((8, 3, 2), np.int32)}}
    arrays = sharding.global_batch(mesh, batch)
    np.testing.assert_array_equal(np.asarray(arrays["inputs"]), batch["inputs"])
    assert arrays["hash_ids"][1].sharding.spec == PartitionSpec(("data", "fsdp", "expert"))
    assert {s.data.shape for s in arrays["inputs"].addressable_shards} == {(1, 3)}


class Counting:
    """A data iterator of numbered batches with Grain's get_state()."""

    def __init__(self):
        self.position = 0

    def __next__(self):
        self.position += 1
        return {"inputs": np.full((8, 2), self.position)}

    def get_state(self):
        return {"position": self.position}


def test_prefetch_places_batches_ahead_and_saves_the_state_of_those_handed_out(mesh):
    source = Counting()
    batches = sharding.Prefetch(source, mesh, size=2)
    first = next(batches)
    assert int(first["inputs"][0, 0]) == 1 and first["inputs"].sharding == sharding.batch_sharding(mesh)
    assert source.position == 2  # batch 2 is already on its way to the devices
    assert isinstance(batches.queue[0][1]["inputs"], jax.Array)
    assert json.loads(batches.get_state()) == {"position": 1}  # a resumed run starts at batch 2
    assert [int(next(batches)["inputs"][0, 0]) for _ in range(3)] == [2, 3, 4]
    assert json.loads(batches.get_state()) == {"position": 4}
