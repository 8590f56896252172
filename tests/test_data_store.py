"""Tests of the token store (engram_jax/data/store.py, sources.py): prepared in several
parts, read across shard boundaries, resumed, split over launchers, and refused when bad."""

import gzip
import json
import random
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engram_jax import data
from engram_jax.data import sources
from engram_jax.data import store as store_lib
from train.main import prepare_main

WORDS = "alpha beta gamma delta engram memory table hash token layer gate conv branch shard".split()
PART_BYTES = 6_000  # 30 files of 1-4 KB: several parts and shards


def _text(rng: random.Random, lines: int) -> str:
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + "\n" for _ in range(lines))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """30 files: .txt, extensionless UTF-8 text, JSONL (several records), gzipped JSONL and
    Parquet; plus a binary and an empty file that are skipped."""
    root = tmp_path_factory.mktemp("store_corpus")
    rng = random.Random(0)
    for i in range(30):
        kind = i % 5
        if kind == 0:
            (root / f"f{i:02d}.txt").write_text(f"# file {i}\n" + _text(rng, rng.randint(20, 80)))
        elif kind == 1:
            (root / f"README{i:02d}").write_text(f"plain {i}\n" + _text(rng, rng.randint(20, 80)))
        elif kind == 2:
            rows = [{"text": f"record {i}.{k} " + _text(rng, 5)} for k in range(4)]
            (root / f"r{i:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif kind == 3:
            rows = [{"text": f"gz {i}.{k} " + _text(rng, 5)} for k in range(3)]
            with gzip.open(root / f"g{i:02d}.jsonl.gz", "wt") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
        else:
            pq.write_table(pa.table({"text": [f"pq {i}.{k} " + _text(rng, 4) for k in range(3)],
                                     "id": list(range(3))}), root / f"p{i:02d}.parquet")
    (root / "image.bin").write_bytes(b"\x89PNG\x00\x01\x02")
    (root / "empty.txt").write_text("")
    return root


@pytest.fixture(scope="module")
def config(corpus, tmp_path_factory):
    return data.DataConfig(source=str(corpus), vocab_size=320, seq_len=32, batch_size=4, val_fraction=0.2,
                           cache_dir=str(tmp_path_factory.mktemp("store_cache")))


@pytest.fixture(scope="module")
def tok(config):
    return data.load_tokenizer(config)


@pytest.fixture(scope="module")
def store(config, tok, tmp_path_factory):
    return data.prepare(config, tok, tmp_path_factory.mktemp("stores") / "whole", part_bytes=PART_BYTES)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _stream(tok, docs):
    """The split's token stream tokenized in memory, independently of the store."""
    eod = data.eod_id(tok)
    return np.array([i for d in docs for i in (*tok.encode(d, add_special_tokens=False).ids, eod)], np.int32)


def test_sources_read_every_kind_and_skip_binaries(config, corpus):
    plan = sources.plan(config, PART_BYTES)
    assert plan.rule == "file" and len(plan.files) == 30 and len(plan.parts) >= 4
    assert plan.skipped_line() == "skipped 2 file(s): 1 binary (NUL bytes), 1 empty"
    docs = data.load_documents(config, "train") + data.load_documents(config, "validation")
    assert len(docs) == 6 * 2 + 6 * 4 + 6 * 3 + 6 * 3  # text, extensionless, JSONL, gzipped, Parquet
    assert {d.split(" ")[0] for d in docs} == {"#", "plain", "record", "gz", "pq"}


def test_store_streams_equal_the_in_memory_tokenization(config, tok, store):
    for split in data.SPLITS:
        assert len(store.shards(split)) >= 2
        np.testing.assert_array_equal(store.tokens(split), _stream(tok, data.load_documents(config, split)))
    docs = data.load_documents(config, "validation")
    assert store.bytes_per_token("validation") == pytest.approx(
        sum(len(d.encode()) for d in docs) / len(_stream(tok, docs)), rel=1e-12)
    assert store.manifest["dtype"] == "<u2" and store.dtype == np.uint16
    first = store.shards("train")[0]["tokens"]
    np.testing.assert_array_equal(store.tokens("train", limit=first + 5), store.tokens("train")[: first + 5])


def test_windows_across_shard_ends_equal_the_stream(store):
    windows = data.Windows(store, "train", 32)
    stream = store.tokens("train")
    assert len(windows) == (len(stream) - 1) // 32
    crossing = 0
    for w in range(len(windows)):
        np.testing.assert_array_equal(windows[w], stream[w * 32: w * 32 + 33])
        crossing += bool(np.searchsorted(windows.ends, w * 32, "right") != np.searchsorted(windows.ends, w * 32 + 32,
                                                                                             "right"))
    assert crossing >= 2


def test_iterator_state_restores_across_shards(config, tok, store):
    pipe = data.Pipeline(config, tok, None, "train", process_index=0, process_count=1, store=store)
    it = pipe.iterator()
    for _ in range(7):  # past an epoch of ~60 windows / 4: the shuffle crosses every shard
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it)["inputs"] for _ in range(20)]
    fresh = pipe.iterator()
    fresh.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["inputs"], want)


def test_a_resumed_prepare_writes_the_same_bytes(config, tok, store, tmp_path):
    out = tmp_path / "resumed"
    assert data.prepare(config, tok, out, part_bytes=PART_BYTES, stop_after_parts=2) is None
    with pytest.raises(data.StoreError, match="incomplete .* rerun engram-prepare"):
        data.TokenStore.open(out)
    (out / "train-00002.tokens.tmp").write_bytes(b"half a part")  # as a kill mid-part leaves it
    resumed = data.prepare(config, tok, out, part_bytes=PART_BYTES)
    assert resumed.digest == store.digest
    assert _files(out) == _files(store.path)


def test_launchers_split_the_parts_and_the_last_one_joins(config, tok, store, tmp_path):
    out = tmp_path / "split"
    assert data.prepare(config, tok, out, shard=(1, 3), part_bytes=PART_BYTES) is None
    with pytest.raises(data.StoreError, match="parts are not prepared yet .* part 0"):
        data.join(out)
    assert data.prepare(config, tok, out, shard=(0, 3), part_bytes=PART_BYTES) is None
    joined = data.prepare(config, tok, out, shard=(2, 3), part_bytes=PART_BYTES)
    assert _files(out) == _files(store.path) and joined.digest == store.digest


def test_starting_reads_the_manifest_not_the_text(config, tok, monkeypatch):
    first = data.token_store(config, tok)  # prepared into the cache on first use
    store_lib._OPENED.clear()

    def no_reading(*args, **kwargs):
        raise AssertionError("the text was read")

    monkeypatch.setattr(sources, "documents", no_reading)
    again = data.token_store(config, tok)
    assert again.path == first.path and again.digest == first.digest
    batch = next(data.Pipeline(config, tok, split="validation", process_index=0, process_count=1).iterator())
    assert batch["inputs"].shape == (4, 32)


def test_a_changed_source_file_is_a_new_store(config, tok, corpus, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    moved = config.replace(source=str(copy))
    before = store_lib.default_path(moved, tok, sources.plan(moved))
    (copy / "f00.txt").write_text((copy / "f00.txt").read_text() + "one more line\n")
    assert store_lib.default_path(moved, tok, sources.plan(moved)) != before


def test_a_record_file_keeps_one_record_in_each_split(tmp_path, tok):
    source = tmp_path / "three.jsonl"
    texts = ["first record text", "second record text", "third record text"]
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    config = data.DataConfig(source=str(source), val_fraction=1e-9, cache_dir=str(tmp_path))  # none held by score
    held = data.load_documents(config, "validation")
    assert len(held) == 1 and held[0] in texts
    made = data.prepare(config, tok, tmp_path / "store")
    np.testing.assert_array_equal(made.tokens("validation"), _stream(tok, held))
    np.testing.assert_array_equal(made.tokens("train"), _stream(tok, [t for t in texts if t != held[0]]))
    assert made.manifest["splits"]["train"]["bytes"] == sum(len(t) for t in texts if t != held[0])


def test_long_documents_are_cut_where_a_byte_level_bpe_splits_anyway(tok):
    rng = random.Random(3)
    text = "".join(rng.choice(["  indented line\n", "\n", "word word\n", "x\n", " \n"]) for _ in range(3000))
    pieces = list(sources.pieces([text[i: i + 500] for i in range(0, len(text), 500)], limit=2000))
    assert len(pieces) > 5 and "".join(pieces) == text and max(map(len, pieces)) <= 2000
    ids = [i for p in pieces for i in tok.encode(p, add_special_tokens=False).ids]
    assert ids == tok.encode(text, add_special_tokens=False).ids


def test_bad_stores_fail_with_one_line(config, tok, store, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    shard = copy / f"{store.shards('train')[0]['name']}.tokens"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 1
    shard.write_bytes(bytes(raw))
    data.TokenStore.open(copy)  # sizes match: only a verify reads the bytes
    with pytest.raises(data.StoreError, match=f"{shard.name} does not match its sha256"):
        data.TokenStore.open(copy, verify=True)
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(data.StoreError, match=f"{shard.name} has .* bytes, the manifest says"):
        data.TokenStore.open(copy)
    other = data.train_tokenizer(data.load_documents(config, "train"), 300)
    with pytest.raises(data.StoreError, match="prepared with another tokenizer"):
        data.TokenStore.open(store.path, tokenizer=other)
    with pytest.raises(data.StoreError, match=r"prepared from other input \(it differs in: source\)"):
        data.prepare(config.replace(val_fraction=0.3), tok, copy, part_bytes=PART_BYTES)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(data.StoreError, match="not a readable token store manifest"):
        data.TokenStore.open(copy)
    with pytest.raises(data.StoreError, match="does not exist"):
        data.TokenStore.open(tmp_path / "nowhere")


def test_bad_sources_name_the_file_and_record(tmp_path, tok):
    def prepare(path, **changes):
        return data.prepare(data.DataConfig(source=str(path), cache_dir=str(tmp_path), **changes), tok,
                            tmp_path / f"store-{path.name}")

    table = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), table)
    with pytest.raises(ValueError, match=f"{table}: no column 'text' \\(columns: body\\)"):
        prepare(table)
    broken = tmp_path / "broken.jsonl.gz"
    whole = gzip.compress(b"".join(json.dumps({"text": f"row {k}"}).encode() + b"\n" for k in range(2000)))
    broken.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=f"{broken}: corrupt gzip data"):
        prepare(broken)
    fieldless = tmp_path / "fieldless.jsonl.gz"
    fieldless.write_bytes(gzip.compress(b'{"text": "ok"}\n{"body": "no text"}\n'))
    with pytest.raises(ValueError, match=f"{fieldless}:2: no string field 'text'"):
        prepare(fieldless)
    binary = tmp_path / "blob"
    binary.write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="is not a text, JSONL, gzipped JSONL or Parquet file \\(binary"):
        prepare(binary)


def test_engram_prepare_command(config, store, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--config", "tiny", "--set", f"data.source={config.source}", "--set", "data.vocab_size=320",
            "--set", "model.vocab_size=320", "--set", f"data.cache_dir={config.cache_dir}",
            "--set", f"data.val_fraction={config.val_fraction}", "--part-mb", str(PART_BYTES / 2**20)]
    assert prepare_main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"engram-prepare: {out}: train " in printed and f"--set data.store={out}" in printed
    assert _files(out) == _files(store.path)
    assert prepare_main([*argv, "--out", str(out), "--verify"]) == 0
    assert "matches the bytes recorded" in capsys.readouterr().out
    assert prepare_main([*argv[:2], "--set", f"data.source={tmp_path / 'missing'}"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
