"""Tests of engram_jax.data on tiny corpora written to tmp_path (one test reads the stdlib)."""

import json
import random
import re

import numpy as np
import orbax.checkpoint as ocp
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from engram_jax import data
from engram_jax.compression import compress_tokenizer
from engram_jax.config_base import ConfigError
from engram_jax.engram import EngramConfig

WORDS = ("alpha beta gamma delta engram memory table hash token layer gate conv branch "
         "lookup prime seed batch window shard epoch value query key norm the of and to "
         "def return class import self if else for while in not is None True False").split()
NUM_FILES = 24


def _text(rng: random.Random, lines: int) -> str:
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "\n"
                   for _ in range(lines))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of NUM_FILES .txt/.md/.py files (one nested), each starting with its name."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(NUM_FILES):
        path = root / ("sub" if i % 5 == 0 else "") / f"doc{i:02d}{('.txt', '.md', '.py')[i % 3]}"
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"# doc{i:02d}\n" + _text(rng, 40))
    (root / "notes.bin").write_bytes(b"\x00\x01 not text")  # ignored: not a text suffix
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def make_config(corpus, cache):
    def make(**changes) -> data.DataConfig:
        base = dict(source=str(corpus), vocab_size=300, seq_len=16, batch_size=4,
                    val_fraction=0.25, cache_dir=str(cache))
        return data.DataConfig(**{**base, **changes})

    return make


@pytest.fixture(scope="module")
def tok(make_config):
    return data.load_tokenizer(make_config())


ENGRAM = EngramConfig(layer_ids=(0, 2), max_ngram_size=3, heads_per_ngram=2, embed_per_ngram=8,
                      table_sizes=(101, 211), pad_id=1)


@pytest.fixture(scope="module")
def hasher(tok, cache):
    return ENGRAM.make_hasher(compress_tokenizer(tok, cache).lookup)


def _pipe(config, tok, hasher=None, split="train", index=0, count=1):
    return data.Pipeline(config, tok, hasher, split, process_index=index, process_count=count)


def _take(pipe, k, **kw):
    it = pipe.iterator(**kw)
    return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])
        assert x.keys() == y.keys()
        for key in ("segment_ids", "positions"):
            if key in x:
                np.testing.assert_array_equal(x[key], y[key])
        assert x["hash_ids"].keys() == y["hash_ids"].keys()
        for layer in x["hash_ids"]:
            np.testing.assert_array_equal(x["hash_ids"][layer], y["hash_ids"][layer])


def test_batch_shapes_and_dtypes(make_config, tok, hasher):
    (batch,) = _take(_pipe(make_config(), tok, hasher), 1)
    assert batch["inputs"].shape == batch["targets"].shape == (4, 16)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert sorted(batch["hash_ids"]) == [0, 2]
    for ids in batch["hash_ids"].values():
        assert ids.shape == (4, 16, ENGRAM.num_heads) and ids.dtype == np.int32


def test_same_seed_same_batches_other_seed_differs(make_config, tok):
    first = _take(_pipe(make_config(seed=3), tok), 5)
    _assert_batches_equal(first, _take(_pipe(make_config(seed=3), tok), 5))
    other = _take(_pipe(make_config(seed=4), tok), 5)
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))


def test_targets_are_shifted_inputs_from_the_corpus(make_config, tok):
    config = make_config()
    text = "".join(d + data.EOD_TOKEN for d in data.load_documents(config, "train"))
    for batch in _take(_pipe(config, tok), 3):
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        for x, y in zip(batch["inputs"], batch["targets"]):
            window = tok.decode([*x.tolist(), int(y[-1])], skip_special_tokens=False)
            assert window in text


def test_hash_ids_equal_an_independent_hasher(make_config, tok, hasher, cache):
    own = ENGRAM.make_hasher(compress_tokenizer(tok, cache).lookup)
    for batch in _take(_pipe(make_config(), tok, hasher), 3):
        expected = own(batch["inputs"])
        for layer in ENGRAM.layer_ids:
            np.testing.assert_array_equal(batch["hash_ids"][layer], expected[layer])


def test_no_hasher_gives_no_hash_ids(make_config, tok):
    (batch,) = _take(_pipe(make_config(), tok), 1)
    assert batch["hash_ids"] == {}


def test_resume_through_orbax_checkpoint_manager(make_config, tok, hasher, tmp_path):
    config = make_config(seed=7)
    it = _pipe(config, tok, hasher).iterator()
    for _ in range(5):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(data=data.checkpoint_args(it)))
        expected = [next(it) for _ in range(6)]  # advancing while the save may be in flight
        manager.wait_until_finished()
    fresh = _pipe(config, tok, hasher).iterator()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(5, args=ocp.args.Composite(data=data.restore_args(fresh)))
    _assert_batches_equal([next(fresh) for _ in range(6)], expected)


def test_state_round_trip_without_orbax(make_config, tok):
    pipe = _pipe(make_config(), tok)
    it = pipe.iterator()
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = pipe.iterator()
    fresh.set_state(json.loads(json.dumps(state)))  # the state is plain JSON
    _assert_batches_equal([next(fresh) for _ in range(4)], expected)


def test_process_sharding_splits_each_global_batch(make_config, tok, hasher):
    config = make_config(batch_size=8)
    full = _take(_pipe(config, tok), 6)
    halves = [_take(_pipe(config, tok, hasher, index=p, count=2), 6) for p in range(2)]
    seen = [set(), set()]
    for k, batch in enumerate(full):
        for p in range(2):
            part = halves[p][k]
            assert part["inputs"].shape == (4, 16) and part["hash_ids"][0].shape[0] == 4
            # Process p's rows are the p-th half of the single-process batch, in order, so
            # the global batch (process 0's devices first) is the single-process batch.
            np.testing.assert_array_equal(part["inputs"], batch["inputs"][4 * p: 4 * (p + 1)])
            np.testing.assert_array_equal(part["hash_ids"][0], hasher(batch["inputs"])[0][4 * p: 4 * (p + 1)])
            seen[p].update(row.tobytes() for row in part["inputs"])
    assert not seen[0] & seen[1]


def test_validation_sharding_gives_every_process_the_same_batches(make_config, tok):
    full = list(_pipe(make_config(batch_size=4), tok, split="validation"))
    halves = [list(_pipe(make_config(batch_size=4), tok, split="validation", index=p, count=2))
              for p in range(2)]
    assert len(halves[0]) == len(halves[1]) == len(full)  # no process waits on another
    for p in range(2):
        for part, batch in zip(halves[p], full):
            np.testing.assert_array_equal(part["inputs"], batch["inputs"][2 * p: 2 * (p + 1)])


def test_batch_size_must_divide_by_process_count(make_config, tok):
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        _pipe(make_config(batch_size=4), tok, index=0, count=3)


def test_training_epochs_repeat_reshuffled(make_config, tok):
    pipe = _pipe(make_config(batch_size=1), tok)
    n = pipe.num_windows
    rows = [b["inputs"][0].tobytes() for b in _take(pipe, 2 * n)]
    assert sorted(rows[:n]) == sorted(rows[n:])  # every window once per epoch
    assert rows[:n] != rows[n:]  # in a new order


def test_validation_is_ordered_finite_and_whole(make_config, tok, hasher):
    config = make_config()
    pipe = _pipe(config, tok, hasher, split="validation")
    tokens = data.tokenize_split(config, tok, "validation")
    assert pipe.num_batches == pipe.num_windows // 4 > 1
    batches = list(pipe.iterator())
    assert len(batches) == pipe.num_batches
    assert pipe.num_windows == (len(tokens) - 1) // 16
    first = np.stack([tokens[16 * w : 16 * w + 17] for w in range(4)])  # windows 0..3, in order
    np.testing.assert_array_equal(batches[0]["inputs"], first[:, :-1])
    np.testing.assert_array_equal(batches[0]["targets"], first[:, 1:])
    _assert_batches_equal(list(pipe.iterator(num_batches=2)), batches[:2])
    # The seed shuffles training only.
    _assert_batches_equal(list(_pipe(make_config(seed=9), tok, hasher, "validation")), batches)


def test_windows_lose_no_input_target_pair(make_config, tok):
    """Windows of T + 1 tokens at stride T: each pair (s[i], s[i + 1]) is trained once."""
    config = make_config(batch_size=1)
    tokens = np.asarray(data.tokenize_split(config, tok, "train"))
    pipe = _pipe(config, tok)
    n = pipe.num_windows
    assert n == (len(tokens) - 1) // 16
    pairs = sorted((int(x), int(y), int(i)) for b in _take(pipe, n)
                   for i, (x, y) in enumerate(zip(b["inputs"][0], b["targets"][0])))
    # Window w holds the pairs at stream positions 16 w .. 16 w + 15: all of 0 .. 16 n - 1.
    expected = sorted((int(tokens[p]), int(tokens[p + 1]), p % 16) for p in range(16 * n))
    assert pairs == expected


def test_split_is_by_file_and_deterministic(make_config):
    config = make_config()
    train = data.load_documents(config, "train")
    val = data.load_documents(config, "validation")
    names = lambda docs: [re.match(r"# (doc\d\d)\n", d).group(1) for d in docs]  # noqa: E731
    assert len(train) + len(val) == NUM_FILES
    assert not set(names(train)) & set(names(val)) and val
    assert data.load_documents(config, "validation") == val
    assert data.load_documents(make_config(seed=5), "validation") == val  # seed-independent
    in_sub = lambda name: int(name[3:]) % 5 == 0  # noqa: E731  (written under sub/)
    assert names(train) == sorted(names(train), key=lambda n: (in_sub(n), n))  # path order


def test_held_out_share_follows_val_fraction(tmp_path):
    for i in range(400):
        (tmp_path / f"f{i}.txt").write_text(f"file {i}\n")
    config = data.DataConfig(source=str(tmp_path), val_fraction=0.25)
    held = len(data.load_documents(config, "validation"))
    assert held + len(data.load_documents(config, "train")) == 400
    assert 70 <= held <= 130  # 100 expected; binomial sd 8.7, and fixed by the file names


def test_trained_tokenizer_is_exact_cached_and_round_trips(make_config, tmp_path, monkeypatch):
    config = make_config(cache_dir=str(tmp_path))
    tok = data.load_tokenizer(config)
    assert tok.get_vocab_size(with_added_tokens=True) == 300
    assert tok.token_to_id(data.EOD_TOKEN) == 0 == data.eod_id(tok)
    assert data.pad_id(tok) == 1
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("retrained despite the cache")

    monkeypatch.setattr(data.tokenizer, "train_tokenizer", no_training)
    assert data.load_tokenizer(config).to_str() == tok.to_str()
    with pytest.raises(AssertionError, match="retrained"):  # another vocab_size is another key
        data.load_tokenizer(config.replace(vocab_size=301))
    text = "def gate(x):\n    return 'héllo → ✓'\n"
    assert tok.decode(tok.encode(text).ids) == text


def test_end_of_document_text_in_a_document_is_not_the_special_id(tmp_path, tok):
    source = tmp_path / "one.txt"
    source.write_text("a <|endoftext|> b\n")
    config = data.DataConfig(source=str(source), val_fraction=0.0, cache_dir=str(tmp_path))
    tokens = data.tokenize_split(config, tok, "train")
    assert tokens[-1] == 0 and (tokens[:-1] != 0).all()


def _word_tokenizer(specials: list[str]) -> Tokenizer:
    """A word-level tokenizer of "a b c" with `specials` added after them."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "c": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    return tok


def test_deepseek_end_of_document_is_a_candidate(tmp_path):
    # DeepSeek-V3's tokenizer.json: ids 1 and 2, bars U+FF5C, spaces U+2581.
    tok = _word_tokenizer(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"])
    eod = tok.token_to_id("<｜end▁of▁sentence｜>")
    assert data.eod_id(tok) == eod == 5
    assert data.pad_id(tok) == tok.token_to_id("<｜▁pad▁｜>") == 6
    source = tmp_path / "doc.txt"
    source.write_text("a b c")
    config = data.DataConfig(source=str(source), val_fraction=0.0, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(data.tokenize_split(config, tok, "train"), [1, 2, 3, eod])


def test_end_of_document_token_is_configurable(tmp_path, tok):
    source = tmp_path / "doc.txt"
    source.write_text("a b c")
    config = data.DataConfig(source=str(source), val_fraction=0.0, cache_dir=str(tmp_path))
    unknown = _word_tokenizer(["<doc>"])
    with pytest.raises(ValueError, match="no end-of-document token") as err:
        data.tokenize_split(config, unknown, "train")
    assert "data.eod_token" in str(err.value) and "\n" not in str(err.value)
    stream = data.tokenize_split(config.replace(eod_token="<doc>"), unknown, "train")
    np.testing.assert_array_equal(stream, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="data.eod_token '<nope>' is not a token"):
        data.tokenize_split(config.replace(eod_token="<nope>"), unknown, "train")
    # The setting wins over the candidates, and a cached stream with another EOD is not reused.
    assert data.tokenize_split(config, tok, "train")[-1] == 0
    assert data.tokenize_split(config.replace(eod_token=data.PAD_TOKEN), tok, "train")[-1] == 1


def test_segment_ids_and_positions_restart_at_each_end_of_document(tmp_path):
    # Word ids a b c = 1 2 3, EOD "<doc>" = 4. Stream: a b c | b c | c a b a |, with | = 4.
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a b c", "b c", "c a b a")))
    config = data.DataConfig(source=str(source), eod_token="<doc>", seq_len=5,
                             batch_size=2, val_fraction=0.0, cache_dir=str(tmp_path))
    tok = _word_tokenizer(["<doc>"])
    np.testing.assert_array_equal(data.tokenize_split(config, tok, "train"), [1, 2, 3, 4, 2, 3, 4, 3, 1, 2, 1, 4])
    (batch,) = _take(_pipe(config, tok), 1)  # both windows, in the shuffle's order
    rows = {tuple(x): i for i, x in enumerate(batch["inputs"].tolist())}
    assert sorted(rows) == [(1, 2, 3, 4, 2), (3, 4, 3, 1, 2)]
    # The EOD (4) opens the next document at position 0, as a prompt starts in generation.
    expected = {(1, 2, 3, 4, 2): ([0, 0, 0, 1, 1], [0, 1, 2, 0, 1]),
                (3, 4, 3, 1, 2): ([0, 1, 1, 1, 1], [0, 0, 1, 2, 3])}  # cut document: from 0
    for row, (segments, positions) in expected.items():
        np.testing.assert_array_equal(batch["segment_ids"][rows[row]], segments)
        np.testing.assert_array_equal(batch["positions"][rows[row]], positions)
    assert batch["segment_ids"].dtype == batch["positions"].dtype == np.int32
    (off,) = _take(_pipe(config.replace(segment_ids=False), tok), 1)
    assert "segment_ids" not in off and "positions" not in off


def test_segment_ids_and_positions_of_every_validation_window(make_config, tok):
    """Against a per-token count: the EODs up to t, and t minus the latest of them."""
    batches = list(_pipe(make_config(), tok, split="validation").iterator())
    for batch in batches:
        for x, segments, positions in zip(batch["inputs"], batch["segment_ids"], batch["positions"]):
            ends = [t for t, token in enumerate(x) if token == 0]  # EOD_TOKEN is id 0
            for t in range(len(x)):
                assert segments[t] == sum(e <= t for e in ends)
                assert positions[t] == t - max([e for e in ends if e <= t], default=0)
    assert any(len(set(b["segment_ids"][r])) > 1 for b in batches for r in range(4))  # windows span EODs


def test_bytes_per_token(make_config, tok):
    config = make_config()
    docs = data.load_documents(config, "validation")
    tokens = sum(len(tok.encode(d).ids) + 1 for d in docs)  # + 1: the EOD id
    expected = sum(len(d.encode()) for d in docs) / tokens
    assert data.bytes_per_token(config, tok) == pytest.approx(expected, rel=1e-12)


def test_bad_sources_raise_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        data.load_documents(data.DataConfig(source=str(empty)), "train")
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "x.bin").write_bytes(b"\x00")
    (binary / "blank.txt").write_text("")
    with pytest.raises(ValueError, match=re.escape(str(binary)) + ".*no usable files"):
        data.load_documents(data.DataConfig(source=str(binary)), "train")
    with pytest.raises(ValueError, match="unknown source scheme 'gs'"):
        data.load_documents(data.DataConfig(source="gs://bucket/corpus"), "train")
    with pytest.raises(ValueError, match="does not exist"):
        data.load_documents(data.DataConfig(source=str(tmp_path / "missing")), "train")
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_documents(data.DataConfig(source=str(empty)), "test")


def test_hf_source_without_datasets_says_what_to_install():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="optional `datasets` package"):
            data.load_documents(data.DataConfig(source="hf:roneneldan/TinyStories"), "train")
    else:
        pytest.skip("datasets is installed; loading would need the network")


def test_empty_split_is_an_error(make_config):
    with pytest.raises(ValueError, match="'validation' split .* is empty"):
        data.load_documents(make_config(val_fraction=0.0), "validation")


def test_config_validation():
    with pytest.raises(ConfigError, match="val_fraction"):
        data.DataConfig(val_fraction=1.0)
    with pytest.raises(ConfigError, match="vocab_size"):
        data.DataConfig(vocab_size=100)
    with pytest.raises(ConfigError, match="seed"):
        data.DataConfig(seed=2**32)


def test_jsonl_source_with_text_field(tmp_path):
    rng = random.Random(1)
    source = tmp_path / "corpus.jsonl"
    records = [{"id": i, "body": f"record {i}: " + _text(rng, 6)} for i in range(60)]
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    config = data.DataConfig(source=str(source), text_field="body", vocab_size=280, seq_len=8,
                             batch_size=2, val_fraction=0.2, cache_dir=str(tmp_path))
    train = data.load_documents(config, "train")
    val = data.load_documents(config, "validation")
    assert sorted(train + val) == sorted(r["body"] for r in records)
    assert not set(train) & set(val)
    tok = data.load_tokenizer(config)
    (batch,) = _take(_pipe(config, tok), 1)
    assert batch["inputs"].shape == (2, 8)
    with pytest.raises(ValueError, match="corpus.jsonl:1: no string field 'text'"):
        data.load_documents(config.replace(text_field="text"), "train")


def test_single_text_file_holds_out_its_last_lines(tmp_path):
    source = tmp_path / "book.md"
    source.write_text("".join(f"line {i}\n" for i in range(20)))
    config = data.DataConfig(source=str(source), val_fraction=0.1)
    assert data.load_documents(config, "validation") == ["line 18\nline 19\n"]
    assert data.load_documents(config, "train")[0].endswith("line 17\n")


def test_worker_process_yields_the_same_batches(make_config, tok, hasher):
    config = make_config(seed=2)
    expected = _take(_pipe(config, tok, hasher), 4)
    it = _pipe(config.replace(num_workers=1), tok, hasher).iterator()
    try:
        _assert_batches_equal([next(it) for _ in range(4)], expected)
    finally:
        it.close()


def test_stdlib_corpus_split(tmp_path):
    config = data.DataConfig(cache_dir=str(tmp_path))
    files = data.sources.plan(config).files
    relative = [f.key.split("/") for f in files]
    assert len(files) > 100
    assert not any({"site-packages", "test", "tests"} & set(parts[:-1]) for parts in relative)
    train = data.load_documents(config, "train")
    val = data.load_documents(config, "validation")
    assert len(train) + len(val) <= len(files) and 0 < len(val) < len(train)
    assert not set(train) & set(val)
