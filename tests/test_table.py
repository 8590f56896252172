"""The table engine: sharded lookup, gradients at the owners, row optimizers, placement."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh

from engram_jax import hlo, table, table_optim
from engram_jax.engram import EngramConfig
from engram_jax.table import Tables, layer_key

CONFIG = EngramConfig(layer_ids=(1, 3), max_ngram_size=3, heads_per_ngram=2, embed_per_ngram=8,
                      table_sizes=(101, 103), pad_id=0, table_init_std=0.5)


def mesh_of(shape, names=("data", "model")):
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


def engine(shape=(4, 2), algorithm="sgd", shard_axes=(), config=CONFIG, **overrides):
    return Tables(config.replace(**overrides), mesh_of(shape), table_optim.RowOptimizer(algorithm),
                  shard_axes=shard_axes)


def random_ids(config=CONFIG, batch=8, seq=16, seed=0, vocab=40):
    hasher = config.make_hasher(np.arange(vocab))
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch, seq))
    return {k: jnp.asarray(v) for k, v in hasher(tokens).items()}


def init(tables, seed=0):
    return tables.create(jax.random.key(seed))


def dense_rows(state, tables):
    return {i: np.asarray(state.rows[layer_key(i)]) for i in tables.layouts}


# ---------------------------------------------------------------- layout and lookup


@pytest.mark.parametrize("shape, shard_axes", [((1, 1), ()), ((8, 1), ()), ((4, 2), ()), ((2, 4), ()),
                                               ((4, 2), ("model",)), ((3, 1), ())])
def test_lookup_returns_the_rows_of_a_plain_gather(shape, shard_axes):
    tables = engine(shape, shard_axes=shard_axes)
    state = init(tables)
    ids = random_ids()
    memory, stats = jax.jit(tables.lookup)(state.rows, ids)
    for i in CONFIG.layer_ids:
        expected = table.gather(state.rows[layer_key(i)], ids[i], CONFIG.head_sizes(i))
        chex.assert_shape(memory[i], (8, 16, CONFIG.memory_dim))
        chex.assert_trees_all_equal(memory[i], expected)
        assert int(stats[f"engram_dropped/{i}"]) == 0


def test_created_rows_depend_on_the_key_alone_not_on_mesh_or_placement():
    made = {}
    for shape, placement in (((1, 1), "device"), ((8, 1), "host"), ((3, 1), "device")):
        tables = engine(shape, "lazy_adam", placement=placement, table_dtype="bfloat16")
        state = init(tables, seed=7)
        kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state)}
        assert kinds == {"pinned_host" if placement == "host" else "device"}
        made[shape] = {i: np.asarray(r)[: tables.layouts[int(k.split("_")[1])].rows] for i, (k, r) in
                       enumerate(sorted(state.rows.items()))}
        assert not any(np.asarray(v).any() for v in jax.tree.leaves(state.slots))
    chex.assert_trees_all_equal(made[(1, 1)], made[(8, 1)], made[(3, 1)])
    layout = engine((1, 1)).layouts[3]
    rows = table.init_rows(table._seed_words(jax.random.key(7)), 3, 100, 180, layout, CONFIG.table_init_std)
    np.testing.assert_array_equal(made[(1, 1)][1][100:180], rows.astype(jnp.bfloat16))
    assert not np.array_equal(init(engine((1, 1)), seed=8).rows[layer_key(3)], made[(1, 1)][1])


def test_any_row_count_fits_any_device_count_and_padding_rows_are_zero():
    tables = engine((8, 1))
    assert any(layout.rows % 8 for layout in tables.layouts.values())  # rows are sums of primes
    for i, layout in tables.layouts.items():
        assert layout.padded_rows == 8 * layout.rows_per_shard >= layout.rows
    state = init(tables)
    for i, layout in tables.layouts.items():
        rows = np.asarray(state.rows[layer_key(i)])
        assert rows.shape == (layout.padded_rows, CONFIG.head_dim)
        assert np.all(rows[layout.rows:] == 0) and np.all(rows[: layout.rows].std(axis=1) > 0)


def test_rows_are_split_over_every_device_by_default():
    tables = engine((4, 2))
    state = init(tables)
    rows = state.rows[layer_key(1)]
    assert len(rows.sharding.device_set) == 8
    shard_rows = {s.data.shape[0] for s in rows.addressable_shards}
    assert shard_rows == {tables.layouts[1].rows_per_shard}


def test_a_table_too_large_for_int32_rows_is_rejected():
    with pytest.raises(ValueError, match="2\\*\\*31"):
        table.TableLayout((2**30, 2**30 + 7), 4, 1)


def test_unique_ids_are_fetched_once_per_device():
    tables = engine((8, 1))
    state = init(tables)
    ids = random_ids(batch=8, seq=32, vocab=5)  # a small vocabulary repeats n-grams
    _, stats = jax.jit(tables.lookup)(state.rows, ids)
    for i, layout in tables.layouts.items():
        flat = np.asarray(tables.global_ids(ids)[i]).reshape(8, -1)  # one row of ids per device
        expected = sum(len(np.unique(f)) for f in flat)
        assert int(stats[f"engram_unique/{i}"]) == expected < flat.size


BIG = CONFIG.replace(table_sizes=(4001, 4003))  # ids are mostly distinct: about 64 per bucket


@functools.lru_cache(maxsize=None)
def overflowing():
    """Buckets of the minimum size (64) on 8 shards, for ids that overflow them."""
    tables = engine((8, 1), config=BIG, lookup_capacity_factor=0.01)
    return tables, init(tables), random_ids(BIG, batch=8, seq=128, vocab=4000)


def lost_heads(tables, state, ids, memory, layer=1):
    """[B, T, H] which heads' parts of the memory vectors are not the plain gather's."""
    expected = table.gather(state.rows[layer_key(layer)], ids[layer], BIG.head_sizes(layer))
    dim = BIG.head_dim
    got, want = np.asarray(memory[layer]).reshape(-1, dim), np.asarray(expected).reshape(-1, dim)
    wrong = np.any(got != want, axis=1)
    assert np.all(got[wrong] == 0)  # a dropped head reads zeros
    return wrong.reshape(ids[layer].shape)


def test_full_buckets_drop_visibly_counting_positions_and_ids():
    tables, state, ids = overflowing()
    memory, stats = jax.jit(tables.lookup)(state.rows, ids)
    lost = lost_heads(tables, state, ids, memory)
    assert lost.any()
    # Token positions whose memory vector lost any head; distinct ids at least one per lost
    # (id, device) pair's worth, never more than the lost heads.
    assert int(stats["engram_dropped/1"]) == int(lost.any(axis=-1).sum())
    assert 0 < int(stats["engram_dropped_ids/1"]) <= int(lost.sum())
    exact = engine((8, 1), config=BIG, lookup_capacity_factor=0.0)
    memory, stats = jax.jit(exact.lookup)(init(exact).rows, ids)
    assert int(stats["engram_dropped/1"]) == int(stats["engram_dropped_ids/1"]) == 0
    chex.assert_trees_all_equal(memory[1], table.gather(init(exact).rows[layer_key(1)], ids[1], BIG.head_sizes(1)))


def test_dropped_ids_spread_over_each_shard_and_change_with_the_salt():
    tables, state, ids = overflowing()
    layout = tables.layouts[1]
    global_rows = np.asarray(ids[1]) + table.head_offsets(BIG.head_sizes(1))
    dropped = {}
    for salt in (0, 1):
        memory, _ = jax.jit(tables.lookup)(state.rows, ids, salt=salt)
        dropped[salt] = set(global_rows[lost_heads(tables, state, ids, memory)].tolist())
    where = np.array([(r % layout.rows_per_shard) / layout.rows_per_shard for r in dropped[0]])
    # Bucket places by id dropped the top of every shard (median 0.95); by salted hash,
    # the dropped rows are spread like the ids asked for.
    assert len(where) > 50 and 0.35 < np.median(where) < 0.65 and (where < 0.25).mean() > 0.1
    assert dropped[0] != dropped[1]


def test_pushed_gradients_skip_the_rows_their_lookup_dropped():
    tables, state, ids = overflowing()
    g = {i: jnp.ones((*ids[i].shape[:2], BIG.memory_dim)) for i in ids}

    def step(state):
        memory, _ = tables.lookup(state.rows, ids, salt=3)
        return tables.apply(state, tables.push(ids, g, salt=3), 0.1, 0), memory

    new, memory = jax.jit(step)(state)
    lost = lost_heads(tables, state, ids, memory)
    rows = np.asarray(ids[1]) + table.head_offsets(BIG.head_sizes(1))
    moved = np.any(np.asarray(new.rows[layer_key(1)]) != np.asarray(state.rows[layer_key(1)]), axis=1)
    assert moved[rows[~lost]].all()  # every row read was updated
    only_dropped = set(rows[lost].tolist()) - set(rows[~lost].tolist())  # rows no device received
    assert only_dropped and not moved[sorted(only_dropped)].any()


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("bfloat16", 2)])
def test_rows_travel_in_the_tables_dtype(dtype, itemsize):
    tables = engine((8, 1), config=BIG, table_dtype=dtype)
    ids = {i: jax.ShapeDtypeStruct((8, 128, 4), jnp.int32) for i in BIG.layer_ids}
    compiled = jax.jit(lambda rows, ids: tables.lookup(rows, ids)[0]).lower(
        tables.abstract_state().rows, ids).compile()
    capacity = tables.capacity(8 * 128 * 4 // 8)
    per_layer = 8 * capacity * 4 + 8 * capacity * BIG.head_dim * itemsize  # ids (int32) out, rows back
    assert hlo.collective_bytes(compiled.as_text())["all-to-all"] == len(BIG.layer_ids) * per_layer

# ---------------------------------------------------------------- gradients and optimizers


def pushed_dense(tables, pushed, layer):
    """The dense table gradient reassembled from the owners' slots (shard by shard)."""
    layout = tables.layouts[layer]
    rows = np.asarray(pushed[layer].rows).reshape(layout.shards, -1)
    grads = np.asarray(pushed[layer].grads).reshape(layout.shards, rows.shape[1], -1)
    dense = np.zeros((layout.padded_rows, layout.dim), np.float32)
    for shard in range(layout.shards):
        valid = rows[shard] < layout.rows_per_shard
        assert len(np.unique(rows[shard][valid])) == valid.sum()  # each row once per owner
        dense[shard * layout.rows_per_shard + rows[shard][valid]] += grads[shard][valid]
    return dense


@pytest.mark.parametrize("shape, shard_axes", [((1, 1), ()), ((4, 2), ()), ((4, 2), ("model",))])
def test_pushed_gradients_are_the_dense_table_gradient_summed_once_per_row(shape, shard_axes):
    tables = engine(shape, shard_axes=shard_axes)
    state = init(tables)
    ids = random_ids(vocab=6)  # many repeated ids
    rng = np.random.default_rng(1)
    g = {i: jnp.asarray(rng.normal(size=(8, 16, CONFIG.memory_dim)), jnp.float32) for i in CONFIG.layer_ids}
    pushed = jax.jit(tables.push)(ids, g)

    def loss(rows):  # <g, gather(rows)>: its gradient is the scatter-add of g onto the rows
        return sum(jnp.sum(g[i] * table.gather(rows[layer_key(i)], ids[i], CONFIG.head_sizes(i)))
                   for i in CONFIG.layer_ids)

    dense = jax.grad(loss)(jax.tree.map(np.asarray, state.rows))
    for i in CONFIG.layer_ids:
        np.testing.assert_allclose(pushed_dense(tables, pushed, i), dense[layer_key(i)], rtol=1e-5, atol=1e-5)
    assert float(tables.squared_norm(pushed)) == pytest.approx(
        sum(float(np.sum(v**2)) for v in dense.values()), rel=1e-5)


def step_fn(tables):
    def step(state, ids, g, lr, step):
        return tables.apply(state, tables.push(ids, g), lr, step)

    return jax.jit(step, out_shardings=tables.shardings(), donate_argnums=0)


def grads_for(ids, seed):
    rng = np.random.default_rng(seed)
    return {i: jnp.asarray(rng.normal(size=(*ids[i].shape[:2], CONFIG.memory_dim)), jnp.float32) for i in ids}


def test_sparse_sgd_equals_dense_sgd_exactly_on_one_device():
    tables = engine((1, 1), "sgd")
    state = init(tables)
    dense = jax.tree.map(np.asarray, state.rows)
    update = step_fn(tables)
    for s in range(5):
        # lr a power of 2: lr * g is exact, so a fused multiply-add cannot round differently.
        ids, lr = random_ids(seed=s, vocab=8), 0.125

        def loss(rows, g=grads_for(ids, s)):
            return sum(jnp.sum(g[i] * table.gather(rows[layer_key(i)], ids[i], CONFIG.head_sizes(i)))
                       for i in CONFIG.layer_ids)

        dense = jax.jit(lambda rows, loss=loss: jax.tree.map(lambda r, gr: r - lr * gr, rows, jax.grad(loss)(rows)))(
            dense)
        state = update(state, ids, grads_for(ids, s), lr, s)
    chex.assert_trees_all_equal(state.rows, dense)


def test_lazy_adam_leaves_untouched_rows_and_slots_bit_identical():
    tables = engine((4, 2), "lazy_adam")
    state = init(tables)
    before = jax.tree.map(np.asarray, state)
    ids = random_ids(batch=2, seq=4)
    state = step_fn(tables)(state, ids, grads_for(ids, 0), 0.1, 0)
    for i, layout in tables.layouts.items():
        key = layer_key(i)
        touched = np.zeros(layout.padded_rows, bool)
        touched[np.asarray(tables.global_ids(ids)[i]).ravel()] = True
        assert 0 < touched.sum() < layout.rows
        rows, count = np.asarray(state.rows[key]), np.asarray(state.slots[key]["count"])
        np.testing.assert_array_equal(rows[~touched], before.rows[key][~touched])
        for slot in ("m", "v", "count"):
            np.testing.assert_array_equal(np.asarray(state.slots[key][slot])[~touched],
                                          before.slots[key][slot][~touched])
        assert np.all(count[touched] == 1) and np.all(np.any(rows[touched] != before.rows[key][touched], axis=1))


def numpy_lazy_adam(rows, m, v, count, ids, dense_grad, lr, b1=0.9, b2=0.95, eps=1e-8):
    touched = np.unique(ids)
    g = dense_grad[touched]
    count = count.copy()
    count[touched] += 1
    c = count[touched][:, None].astype(np.float64)
    m, v, rows = m.copy(), v.copy(), rows.copy()
    m[touched] = b1 * m[touched] + (1 - b1) * g
    v[touched] = b2 * v[touched] + (1 - b2) * g**2
    rows[touched] -= lr * (m[touched] / (1 - b1**c)) / (np.sqrt(v[touched] / (1 - b2**c)) + eps)
    return rows, m, v, count


def dense_grad_of(tables, ids, g, layer):
    layout = tables.layouts[layer]
    dense = np.zeros((layout.padded_rows, layout.dim))
    np.add.at(dense, np.asarray(tables.global_ids(ids)[layer]).ravel(),
              np.asarray(g[layer], np.float64).reshape(-1, layout.dim))
    return dense


def test_lazy_adam_matches_a_numpy_reference_over_steps():
    tables = engine((4, 2), "lazy_adam")
    state = init(tables)
    key = layer_key(1)
    ref = [np.asarray(state.rows[key], np.float64), np.zeros((tables.layouts[1].padded_rows, 4)),
           np.zeros((tables.layouts[1].padded_rows, 4)), np.zeros(tables.layouts[1].padded_rows, np.int64)]
    update = step_fn(tables)
    for s in range(4):
        ids = random_ids(batch=2, seq=8, seed=s, vocab=10)
        g = grads_for(ids, s)
        ref = numpy_lazy_adam(*ref, np.asarray(tables.global_ids(ids)[1]).ravel(), dense_grad_of(tables, ids, g, 1), 0.05)
        state = update(state, ids, g, 0.05, s)
    np.testing.assert_allclose(np.asarray(state.rows[key]), ref[0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.slots[key]["count"]), ref[3])


def test_rowwise_adagrad_matches_a_numpy_reference():
    tables = engine((2, 4), "adagrad")
    state = init(tables)
    key = layer_key(3)
    rows = np.asarray(state.rows[key], np.float64)
    acc = np.zeros(rows.shape[0])
    update = step_fn(tables)
    for s in range(3):
        ids = random_ids(batch=2, seq=8, seed=s, vocab=10)
        g = grads_for(ids, s)
        dense = dense_grad_of(tables, ids, g, 3)
        touched = np.unique(np.asarray(tables.global_ids(ids)[3]))
        acc[touched] += np.mean(dense[touched] ** 2, axis=1)
        rows[touched] -= 0.1 * dense[touched] / (np.sqrt(acc[touched])[:, None] + 1e-8)
        state = update(state, ids, g, 0.1, s)
    np.testing.assert_allclose(np.asarray(state.rows[key]), rows, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.slots[key]["accumulator"]), acc, rtol=1e-5)
    assert state.slots[key]["accumulator"].shape == (tables.layouts[3].padded_rows,)  # one scalar per row


def test_dense_adam_equals_optax_adam_on_the_table():
    tables = engine((4, 2), "adam")
    state = init(tables)
    key = layer_key(1)
    tx = optax.adam(0.05, b1=0.9, b2=0.95, eps=1e-8)
    rows = jnp.asarray(np.asarray(state.rows[key]))
    opt = tx.init(rows)
    update = step_fn(tables)
    for s in range(3):
        ids = random_ids(batch=2, seq=8, seed=s, vocab=10)
        g = grads_for(ids, s)
        u, opt = tx.update(jnp.asarray(dense_grad_of(tables, ids, g, 1), jnp.float32), opt)
        rows = rows + u
        state = update(state, ids, g, 0.05, s)
    np.testing.assert_allclose(np.asarray(state.rows[key]), rows, rtol=0, atol=1e-5)


def test_lazy_adam_equals_dense_adam_when_every_row_is_touched():
    small = EngramConfig(layer_ids=(0,), max_ngram_size=2, heads_per_ngram=1, embed_per_ngram=4,
                         table_sizes=(2,), pad_id=0)  # one head of 3 rows
    ids = {0: jnp.asarray(np.tile(np.arange(3), (4, 2))[..., None], jnp.int32)}  # [4, 6, 1]: every row
    results = []
    for algorithm in ("lazy_adam", "adam"):
        tables = engine((4, 2), algorithm, config=small)
        state, update = init(tables), step_fn(tables)
        for s in range(3):
            g = {0: jnp.asarray(np.random.default_rng(s).normal(size=(4, 6, 4)), jnp.float32)}
            state = update(state, ids, g, 0.1, s)
        results.append(np.asarray(state.rows["layer_0"])[:3])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_duplicates_are_summed_in_batch_order_like_the_dense_scatter_add():
    rng = np.random.default_rng(0)
    segments = jnp.asarray(rng.integers(0, 5, 64), jnp.int32)
    values = jnp.asarray(rng.normal(size=(64, 3)) * 10.0 ** rng.integers(-4, 4, (64, 1)), jnp.float32)
    dense = jnp.zeros((6, 3)).at[segments].add(values)  # what jax.grad of a gather builds
    chex.assert_trees_all_equal(table.segment_sum(segments, values, 6), dense)


def test_row_updates_are_reproducible():
    tables = engine((4, 2), "lazy_adam")
    ids = random_ids(vocab=5)
    g = grads_for(ids, 0)
    runs = [jax.tree.map(np.asarray, step_fn(tables)(init(tables), ids, g, 0.1, 0)) for _ in range(2)]
    chex.assert_trees_all_equal(runs[0], runs[1])


def test_bfloat16_rows_store_half_and_update_in_float32():
    tables = engine((4, 2), "lazy_adam", table_dtype="bfloat16")
    state = init(tables)
    assert state.rows[layer_key(1)].dtype == jnp.bfloat16 and state.slots[layer_key(1)]["m"].dtype == jnp.bfloat16
    ids = random_ids()
    new = step_fn(tables)(state, ids, grads_for(ids, 0), 0.01, 0)
    assert new.rows[layer_key(1)].dtype == jnp.bfloat16
    f32 = engine((4, 2), "lazy_adam")
    ref = step_fn(f32)(init(f32), ids, grads_for(ids, 0), 0.01, 0)
    np.testing.assert_allclose(np.asarray(new.rows[layer_key(1)], np.float32), np.asarray(ref.rows[layer_key(1)]),
                               atol=0.02)


# ---------------------------------------------------------------- host placement


def test_host_tables_live_in_pinned_host_memory_and_match_device_tables():
    ids = random_ids()
    out = {}
    for placement in ("device", "host"):
        tables = engine((4, 2), "lazy_adam", placement=placement)
        state = init(tables)
        kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state)}
        assert kinds == {"pinned_host" if placement == "host" else "device"}
        state = step_fn(tables)(state, ids, grads_for(ids, 0), 0.1, 0)
        assert {x.sharding.memory_kind for x in jax.tree.leaves(state)} == kinds
        memory, _ = jax.jit(tables.lookup)(state.rows, ids)
        out[placement] = (jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, memory))
    chex.assert_trees_all_equal(out["device"], out["host"])


def test_dense_adam_on_host_tables_is_refused():
    with pytest.raises(ValueError, match="placement=host"):
        engine((4, 2), "adam", placement="host")


@functools.lru_cache(maxsize=None)
def _compiled_update(placement: str, scale: int):
    config = CONFIG.replace(table_sizes=(101 * scale, 103 * scale), placement=placement)
    tables = Tables(config, mesh_of((4, 2)), table_optim.RowOptimizer("lazy_adam"))
    abstract = tables.abstract_state()
    ids = {i: jax.ShapeDtypeStruct((8, 12, 4), jnp.int32) for i in CONFIG.layer_ids}
    g = {i: jax.ShapeDtypeStruct((8, 12, CONFIG.memory_dim), jnp.float32) for i in CONFIG.layer_ids}

    def step(state, ids, g):  # as in training, the gradient depends on the rows read
        memory, _ = tables.lookup(state.rows, ids)
        g = {i: g[i] * memory[i] for i in g}
        return tables.apply(state, tables.push(ids, g), 0.1, 0), memory

    compiled = jax.jit(step, out_shardings=(tables.shardings(), None), donate_argnums=0).lower(
        abstract, ids, g).compile()
    return tables, compiled


def test_compiled_host_step_keeps_tables_and_slots_in_pinned_host():
    tables, compiled = _compiled_update("host", 1)
    state_in = compiled.input_shardings[0][0]
    state_out = compiled.output_shardings[0]
    assert {s.memory_kind for s in jax.tree.leaves(state_in)} == {"pinned_host"}
    assert {s.memory_kind for s in jax.tree.leaves(state_out)} == {"pinned_host"}
    assert "S(5)" in compiled.as_text()  # host memory space in the partitioned HLO


@pytest.mark.parametrize("placement", ["device", "host"])
def test_compiled_lookup_and_update_cost_does_not_grow_with_the_table(placement):
    small_tables, small = _compiled_update(placement, 1)
    big_tables, big = _compiled_update(placement, 4)
    traffic = hlo.collective_bytes(small.as_text())
    assert traffic == hlo.collective_bytes(big.as_text()) and set(traffic) == {"all-to-all"}
    assert small.memory_analysis().temp_size_in_bytes == big.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("placement", ["device", "host"])
def test_no_buffer_but_the_tables_and_slots_has_a_table_shape(placement):
    tables, compiled = _compiled_update(placement, 4)
    shapes = {s for layout in tables.layouts.values()
              for s in ((layout.rows_per_shard, layout.dim), (layout.rows_per_shard,))}
    ops = hlo.buffers_of_shape(compiled.as_text(), shapes)
    # Parameters in, the in-place row scatters (aliased to them), tuple plumbing out.
    assert set(ops) <= {"parameter", "scatter", "fusion", "get-tuple-element", "tuple", "bitcast"}, ops
    fusions = [line for line in compiled.as_text().splitlines() if " fusion(" in line
               and any(f"[{','.join(map(str, s))}]" in line.split("=")[1].split(" ")[1] for s in shapes)]
    assert all("scatter" in line for line in fusions), fusions
