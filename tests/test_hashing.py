"""NgramHasher: bit-exact with the reference demo's golden data and with the spec."""

import gc
import json
import pickle
import sys
import threading

import numpy as np
import pytest

from engram_jax import configs
from engram_jax.hashing import NgramHasher, head_primes, is_prime, layer_multipliers, next_prime


def spec_hash(lookup, ids, *, n_max, heads, sizes, layers, pad_id, seed):
    """Reference section 2, written out directly: the oracle for random configs."""
    x = np.where(ids >= 0, lookup[np.clip(ids, 0, None)], ids).astype(np.int64)
    v_prime = int(lookup.max()) + 1
    bound = max(1, ((2**63 - 1) // v_prime) // 2)
    primes = head_primes(tuple(sizes), heads, tuple(layers))
    pad = lookup[pad_id]
    batch, seq = x.shape
    shifted = [np.concatenate([np.full((batch, k), pad, np.int64), x], 1)[:, :seq] for k in range(n_max)]
    out = {}
    for layer in layers:
        r = np.random.default_rng(seed + 10007 * layer).integers(0, bound, size=n_max, dtype=np.int64)
        m = 2 * r + 1
        cols = []
        for n in range(2, n_max + 1):
            mix = shifted[0] * m[0]
            for k in range(1, n):
                mix = mix ^ (shifted[k] * m[k])
            cols += [mix % p for p in primes[layer][n - 2]]
        out[layer] = np.stack(cols, axis=2)
    return out


@pytest.fixture(scope="module")
def golden(reference_dir):
    data = np.load(reference_dir / "hash_small.npz")
    case = json.loads((reference_dir / "cases.json").read_text())[0]
    return data, case


def golden_hasher(data, case, **kwargs):
    c = case["config"]
    return NgramHasher(data["compression_table"], max_ngram_size=c["max_n"], heads_per_ngram=c["n_head"],
                       table_sizes=c["vocab_sizes"], layer_ids=c["layer_ids"], pad_id=c["pad_id"],
                       seed=c["seed"], **kwargs)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_golden_hash_ids(golden, dtype):
    data, case = golden
    out = golden_hasher(data, case, dtype=dtype)(data["input_ids"])
    for layer in case["config"]["layer_ids"]:
        np.testing.assert_array_equal(out[layer], data[f"hash_ids_layer{layer}"])
        assert out[layer].dtype == dtype


def test_golden_multipliers_primes_and_pad(golden):
    data, case = golden
    hasher = golden_hasher(data, case)
    assert hasher.num_compressed == case["config"]["Vp"]
    assert hasher.compressed_pad_id == case["compressed_pad_id"]
    for layer, expected in case["multipliers"].items():
        np.testing.assert_array_equal(hasher.multipliers[int(layer)], np.array(expected, np.int64))
    assert hasher.head_sizes == {int(k): v for k, v in case["head_table_sizes"].items()}


def test_golden_forward_case_hash_ids(reference_dir):
    data = np.load(reference_dir / "engram_forward_small.npz")
    hasher = NgramHasher(data["compression_table"], max_ngram_size=3, heads_per_ngram=4,
                         table_sizes=[997, 1499], layer_ids=[1, 3], pad_id=2, seed=0)
    np.testing.assert_array_equal(hasher(data["input_ids"])[1], data["hash_ids"])


@pytest.mark.parametrize("trial", range(40))
def test_matches_spec_on_random_configs(trial):
    rng = np.random.default_rng(trial)
    vocab = int(rng.integers(2, 3000))
    lookup = rng.integers(0, int(rng.integers(1, vocab + 1)), vocab)
    n_max, heads = int(rng.integers(2, 6)), int(rng.integers(1, 6))
    sizes = [int(s) for s in rng.integers(2, 10 ** int(rng.integers(1, 8)), n_max - 1)]
    layers = [int(i) for i in rng.choice(40, int(rng.integers(1, 4)), replace=False)]
    seq = int(rng.integers(20_000, 40_000)) if trial % 10 == 0 else int(rng.integers(1, 50))  # rows > a tile
    ids = rng.integers(-3 if trial % 3 == 0 else 0, vocab, (int(rng.integers(1, 4)), seq))
    kwargs = dict(n_max=n_max, heads=heads, sizes=sizes, layers=layers,
                  pad_id=int(rng.integers(0, vocab)), seed=int(rng.integers(0, 10_000)))
    expected = spec_hash(lookup, ids, **kwargs)
    for dtype in (np.int32, np.int64):
        hasher = NgramHasher(lookup, max_ngram_size=n_max, heads_per_ngram=heads, table_sizes=sizes,
                             layer_ids=layers, pad_id=kwargs["pad_id"], seed=kwargs["seed"], dtype=dtype)
        got = hasher(ids)
        assert sorted(got) == sorted(layers)
        for layer in layers:
            np.testing.assert_array_equal(got[layer], expected[layer])


def test_negative_padding_ids_pass_through_like_the_reference():
    lookup = np.arange(50) // 2
    ids = np.array([[-1, -1, 7, 9, 11], [3, 4, 5, -1, -1]])
    kwargs = dict(n_max=3, heads=2, sizes=[31, 41], layers=[0], pad_id=0, seed=5)
    hasher = NgramHasher(lookup, max_ngram_size=3, heads_per_ngram=2, table_sizes=[31, 41], layer_ids=[0],
                         pad_id=0, seed=5)
    np.testing.assert_array_equal(hasher.compress(ids)[ids < 0], -1)
    np.testing.assert_array_equal(hasher(ids)[0], spec_hash(lookup, ids, **kwargs)[0])
    assert hasher(ids)[0].min() >= 0


def small_hasher(**kwargs):
    args = dict(max_ngram_size=3, heads_per_ngram=2, table_sizes=[31, 41], layer_ids=[0], pad_id=0, seed=0)
    return NgramHasher(np.arange(100), **(args | kwargs))


def test_out_of_vocabulary_id_names_the_value():
    with pytest.raises(ValueError, match="token id 100 is outside the vocabulary"):
        small_hasher()(np.array([[1, 2, 100]]))


@pytest.mark.parametrize("ids, message", [
    (np.arange(5), r"\[batch, seq\]"),
    (np.zeros((2, 3), np.float32), "integers"),
])
def test_bad_input_arrays_are_rejected(ids, message):
    with pytest.raises(ValueError, match=message):
        small_hasher()(ids)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_ngram_size=1), "max_ngram_size"),
    (dict(table_sizes=[31]), "table_sizes"),
    (dict(layer_ids=[]), "layer_ids"),
    (dict(pad_id=100), "pad_id"),
    (dict(dtype=np.float32), "dtype"),
    (dict(table_sizes=[2**31, 41], dtype=np.int32), "int32"),
])
def test_bad_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_hasher(**kwargs)


def test_large_primes_need_int64_and_stay_exact():
    lookup = np.arange(60)
    ids = np.random.default_rng(0).integers(0, 60, (2, 30))
    kwargs = dict(n_max=2, heads=3, sizes=[2**33], layers=[2], pad_id=1, seed=3)
    hasher = NgramHasher(lookup, max_ngram_size=2, heads_per_ngram=3, table_sizes=[2**33], layer_ids=[2],
                         pad_id=1, seed=3, dtype=np.int64)
    np.testing.assert_array_equal(hasher(ids)[2], spec_hash(lookup, ids, **kwargs)[2])


def test_v41_flash_rows_per_layer_without_allocating():
    config = configs.engram("deepseek-v4.1-flash")
    assert [config.table_rows(i) for i in config.layer_ids] == [384_006_168, 384_016_682]


def test_primes_are_distinct_across_layers_and_heads():
    primes = head_primes((100, 100), 8, (1, 15, 30))
    flat = [p for layer in primes.values() for order in layer for p in order]
    assert len(set(flat)) == len(flat) == 48
    assert all(is_prime(p) and p > 99 for p in flat)


def test_is_prime_agrees_with_a_sieve():
    sieve = np.ones(20_000, bool)
    sieve[:2] = False
    for i in range(2, 142):
        sieve[i * i :: i] = False
    assert [is_prime(n) for n in range(20_000)] == sieve.tolist()
    assert next_prime(7) == 11 and next_prime(7, {11}) == 13


def test_multipliers_are_odd_and_bounded():
    mult = layer_multipliers(1000, 4, [0, 9], seed=1)
    for m in mult.values():
        assert m.dtype == np.int64 and np.all(m % 2 == 1) and np.all(m * 999 > 0)


def data_address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


@pytest.fixture
def refcounts_that_lie(monkeypatch):
    """Reference counts as a new interpreter may report them: nobody seems to hold anything.

    The earlier pool recycled an array when `sys.getrefcount` said only the pool held it,
    so with counts like these it overwrote results still in use.
    """
    monkeypatch.setattr(sys, "getrefcount", lambda obj: 2)


def test_results_held_at_once_stay_intact_and_independent(refcounts_that_lie):
    hasher = small_hasher(layer_ids=[0, 1])
    ids = np.arange(40).reshape(2, 20)
    results = [hasher(ids + k) for k in range(12)]  # more than the pool keeps
    for k, result in enumerate(results):
        for layer, want in small_hasher(layer_ids=[0, 1])(ids + k).items():
            np.testing.assert_array_equal(result[layer], want)
    arrays = [a for result in results for a in result.values()]
    assert not any(np.shares_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1 :])


def test_views_and_buffer_exports_of_dropped_results_stay_intact(refcounts_that_lie):
    hasher = small_hasher()
    ids = np.arange(40).reshape(2, 20)
    want = small_hasher()(ids)[0]
    result = hasher(ids)[0]
    view, strided, exported = result[1:], result.T[::2], memoryview(result)
    rebuilt = np.frombuffer(hasher(ids)[0], np.int32)  # a view through a buffer export only
    del result
    gc.collect()
    for k in range(1, 20):
        hasher(ids + k)  # dropped at once: their memory is reused
    np.testing.assert_array_equal(view, want[1:])
    np.testing.assert_array_equal(strided, want.T[::2])
    np.testing.assert_array_equal(np.asarray(exported), want)
    np.testing.assert_array_equal(rebuilt, want.reshape(-1))


def test_released_memory_is_reused():
    hasher = small_hasher()
    ids = np.arange(40).reshape(2, 20)
    seen = {data_address(hasher(ids + k)[0]) for k in range(3)}
    gc.collect()
    assert {data_address(hasher(ids + k)[0]) for k in range(10)} <= seen  # no new memory once released
    fresh = small_hasher()
    fresh._pool.capacity = 0  # recycling off: the benchmark's baseline
    held = [fresh(ids)[0] for _ in range(3)]
    assert len({data_address(a) for a in held}) == 3


def test_concurrent_threads_get_correct_results():
    hasher = small_hasher(layer_ids=[0, 1])
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 100, (8, 300)) for _ in range(8)]
    expected = [small_hasher(layer_ids=[0, 1])(b) for b in batches]
    results = [None] * len(batches)

    def work(i):
        for _ in range(20):
            results[i] = {k: v.copy() for k, v in hasher(batches[i]).items()}

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        for layer in want:
            np.testing.assert_array_equal(got[layer], want[layer])


def test_a_pickled_hasher_gives_the_same_ids():
    hasher = small_hasher(layer_ids=[0, 4])
    ids = np.random.default_rng(0).integers(0, 100, (3, 50))
    copy = pickle.loads(pickle.dumps(hasher))  # as Grain sends it to worker processes
    for layer, want in hasher(ids).items():
        np.testing.assert_array_equal(copy(ids)[layer], want)
