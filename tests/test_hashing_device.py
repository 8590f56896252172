"""DeviceHasher (`NgramHasher.on_device()`): bit-equal to the host hasher, traced and eager."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from engram_jax import configs
from engram_jax.hashing import NgramHasher, layer_multipliers


def random_case(case: int):
    """Hasher `case` of a grid over N 2..5, K 1..8 and table sizes 2..1e8, with random ids [B, T].

    Odd cases put negative padding markers (-1, -3) among the ids; every case has rows
    that start with the pad id, and a random seed, pad id and lookup.
    """
    rng = np.random.default_rng(case)
    vocab = int(rng.integers(2, 3000))
    lookup = rng.integers(0, int(rng.integers(1, vocab + 1)), vocab)
    n_max, heads = 2 + case % 4, (1, 8, 3, 7, 2, 5, 8, 4)[case % 8]
    scale = 10 ** (1 + case % 8)
    sizes = [int(s) for s in rng.integers(2, scale + 3, n_max - 1)]
    layers = [int(i) for i in rng.choice(40, int(rng.integers(1, 4)), replace=False)]
    pad_id = int(rng.integers(0, vocab))
    hasher = NgramHasher(lookup, max_ngram_size=n_max, heads_per_ngram=heads, table_sizes=sizes, layer_ids=layers,
                         pad_id=pad_id, seed=int(rng.integers(0, 100_000)))
    ids = rng.integers(0, vocab, (int(rng.integers(1, 4)), int(rng.integers(1, 40))))
    ids[:, : int(rng.integers(0, 3))] = pad_id
    if case % 2:
        ids[rng.random(ids.shape) < 0.2] = -1
        ids[0, -1] = -3
    return hasher, ids.astype(np.int32)


def assert_matches_host(got, hasher: NgramHasher, ids) -> None:
    want = hasher(np.asarray(ids))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, got), want, strict=True)


class DeviceHasherTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*range(8))
    def test_matches_host_on_random_configs(self, seed):
        hasher, ids = random_case(seed)
        assert_matches_host(self.variant(hasher.on_device())(ids), hasher, ids)

    @chex.variants(with_jit=True, without_jit=True)
    def test_v41_flash_layout(self):
        config = configs.engram("deepseek-v4.1-flash")  # N = 4, K = 8, 16,000,000 base rows per order
        rng = np.random.default_rng(0)
        hasher = config.make_hasher(rng.permutation(np.arange(129_280) % 99_092))
        ids = rng.integers(0, 129_280, (2, 64)).astype(np.int32)
        ids[1, :20] = config.pad_id  # a row that starts with pads
        got = self.variant(hasher.on_device())(ids)
        chex.assert_shape(list(got.values()), (2, 64, 24))
        assert_matches_host(got, hasher, ids)

    @chex.variants(with_jit=True, without_jit=True)
    def test_step_equals_the_full_function_at_every_position(self):
        hasher, _ = random_case(3)
        ids = np.random.default_rng(1).integers(-2, hasher.vocab_size, (3, 12)).astype(np.int32)
        device = hasher.on_device()
        want = hasher(ids)
        step = self.variant(device.step)
        for prompt in (0, 1, 5):  # decoding from nothing, from less than N - 1 tokens, and from more
            context = device.context(ids[:, :prompt])
            chex.assert_shape(context, (3, hasher.max_ngram_size - 1))
            for t in range(prompt, ids.shape[1]):
                got, context = step(context, ids[:, t])
                chex.assert_trees_all_equal(jax.tree.map(np.asarray, got), {k: v[:, t] for k, v in want.items()})


def test_golden_reference_cases(reference_dir):
    data = np.load(reference_dir / "hash_small.npz")
    c = json.loads((reference_dir / "cases.json").read_text())[0]["config"]
    hasher = NgramHasher(data["compression_table"], max_ngram_size=c["max_n"], heads_per_ngram=c["n_head"],
                         table_sizes=c["vocab_sizes"], layer_ids=c["layer_ids"], pad_id=c["pad_id"], seed=c["seed"])
    got = jax.jit(hasher.on_device())(data["input_ids"].astype(np.int32))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, got),
                                {layer: data[f"hash_ids_layer{layer}"].astype(np.int32) for layer in c["layer_ids"]})

    data = np.load(reference_dir / "engram_forward_small.npz")
    hasher = NgramHasher(data["compression_table"], max_ngram_size=3, heads_per_ngram=4, table_sizes=[997, 1499],
                         layer_ids=[1, 3], pad_id=2, seed=0)
    got = hasher.on_device()(data["input_ids"].astype(np.int32))[1]
    chex.assert_trees_all_equal(np.asarray(got), data["hash_ids"].astype(np.int32))


@pytest.mark.parametrize("vocab_prime", [1, 2, 1000, 2**20])
def test_extremes_against_python_integers(vocab_prime):
    """The largest compressed id and multipliers, the largest int32 prime and 2, all-pad rows."""
    lookup = np.arange(vocab_prime + 5) % vocab_prime
    top = vocab_prime - 1  # the raw id of the largest compressed id, and the pad id
    hasher = NgramHasher(lookup, max_ngram_size=3, heads_per_ngram=1, table_sizes=[2**31 - 1, 2], layer_ids=[0],
                         pad_id=top, seed=0)
    bound = max(1, (np.iinfo(np.int64).max // vocab_prime) // 2)
    largest = 2 * (bound - 1) + 1  # the largest multiplier `layer_multipliers` can draw
    hasher.multipliers[0] = np.array([largest, largest - 2, largest - 4], np.int64)
    ids = np.array([[top] * 6, [vocab_prime + 4] * 6, [top, 0, top, 1, top, vocab_prime]], np.int32)  # all pad first

    x = np.concatenate([np.full((3, 2), lookup[hasher.pad_id]), lookup[ids]], 1).tolist()  # [B, T + 2]
    m = [int(v) for v in hasher.multipliers[0]]
    want = np.zeros((3, 6, 2), np.int64)
    for b in range(3):
        for t in range(6):
            mix = x[b][t + 2] * m[0] ^ x[b][t + 1] * m[1]
            want[b, t, 0] = mix % (2**31 - 1)
            want[b, t, 1] = (mix ^ x[b][t] * m[2]) % 2
    assert hasher.head_sizes[0] == [[2**31 - 1], [2]]
    np.testing.assert_array_equal(hasher(ids)[0], want)
    chex.assert_trees_all_equal(np.asarray(jax.jit(hasher.on_device())(ids)[0]), want.astype(np.int32))


def test_negative_ids_wrap_as_the_reference_int64_does():
    """Padding markers below 0 with the largest multipliers: int64 products wrap, mixes go negative."""
    hasher = NgramHasher(np.zeros(4, np.int64), max_ngram_size=4, heads_per_ngram=3, table_sizes=[2, 97, 2**30],
                         layer_ids=[0, 1], pad_id=0, seed=0)
    for layer in hasher.layer_ids:
        hasher.multipliers[layer] = layer_multipliers(1, 4, [layer], seed=layer)[layer]  # up to 2**63
    ids = np.array([[-1, -2**31, -7, 0, 3, -1, -1, 1], [-2, 0, -5, 2, 1, 3, 3, -9]], np.int32)
    assert_matches_host(hasher.on_device()(ids), hasher, ids)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_batch_split_over_eight_devices(axis_type):
    hasher, _ = random_case(5)
    ids = np.random.default_rng(2).integers(-1, hasher.vocab_size, (16, 24)).astype(np.int32)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    device = hasher.on_device()
    got = jax.jit(device)(jax.device_put(ids, NamedSharding(mesh, P("data"))))
    for out in got.values():
        assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, None)), 3), out.sharding
    assert_matches_host(got, hasher, ids)
    context = jax.device_put(device.context(ids[:, :3]), NamedSharding(mesh, P("data")))
    step, context = jax.jit(device.step)(context, jax.device_put(ids[:, 3], NamedSharding(mesh, P("data"))))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, step), {k: v[:, 3] for k, v in got.items()})
    assert context.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2), context.sharding


def small_device():
    host = NgramHasher(np.arange(100) // 2, max_ngram_size=3, heads_per_ngram=2, table_sizes=[31, 41],
                       layer_ids=[0], pad_id=0, seed=0)
    return host, host.on_device()


def test_out_of_vocabulary_ids_are_named_eagerly_and_marked_under_jit():
    host, device = small_device()
    ids = np.array([[1, 2, 100, 3, 4, 5]], np.int32)
    with pytest.raises(ValueError, match=r"token id 100 at raw_ids\[0, 2\] is outside the vocabulary"):
        device(ids)
    with pytest.raises(ValueError, match="token id 100"):
        device.step(device.context(ids[:, :0]), np.array([100], np.int32))
    got = np.asarray(jax.jit(device)(ids)[0])  # [1, 6, 4]: orders 2 and 3, two heads each
    clean = host(np.where(ids == 100, 0, ids))[0]
    np.testing.assert_array_equal(got[0, 2:4], -1)  # both orders read position 2
    np.testing.assert_array_equal(got[0, 4, :2], clean[0, 4, :2])  # the bigram at 4 does not
    np.testing.assert_array_equal(got[0, 4, 2:], -1)  # the trigram does
    np.testing.assert_array_equal(got[0, [0, 1, 5]], clean[0, [0, 1, 5]])
    assert not jax.jit(device.in_vocab)(ids) and jax.jit(device.in_vocab)(ids % 100)


@pytest.mark.parametrize("ids, error, message", [
    (np.zeros((2, 3), np.int64), TypeError, "int64"),
    (np.zeros((2, 3), np.uint32), TypeError, "uint32"),
    (np.zeros((2, 3), np.float32), TypeError, "integers"),
    (np.zeros(3, np.int32), ValueError, "rank 2"),
])
def test_bad_input_arrays_are_named(ids, error, message):
    with pytest.raises(error, match=message):
        small_device()[1](ids)


def test_narrow_integer_ids_and_lists_are_accepted():
    host, device = small_device()
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)
    assert_matches_host(device(ids), host, ids)
    assert_matches_host(device(ids.tolist()), host, ids)


def test_sizes_beyond_int32_are_refused():
    with pytest.raises(ValueError, match="int32"):
        NgramHasher(np.array([0, 2**31]), max_ngram_size=2, heads_per_ngram=1, table_sizes=[5], layer_ids=[0],
                    pad_id=0, seed=0).on_device()
    with pytest.raises(ValueError, match="rows"):
        NgramHasher(np.arange(9), max_ngram_size=2, heads_per_ngram=1, table_sizes=[2**31], layer_ids=[0],
                    pad_id=0, seed=0, dtype=np.int64).on_device()


def test_the_hasher_is_a_pytree_that_jit_can_take_as_an_argument():
    host, device = small_device()
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    leaves = jax.tree.leaves(device)
    assert len(leaves) == 1 and leaves[0].dtype == jnp.int32  # only the lookup is traced
    assert_matches_host(jax.jit(lambda h, x: h(x))(device, ids), host, ids)
