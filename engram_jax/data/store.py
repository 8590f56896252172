"""The token store: a corpus tokenized once into shards of flat ids, and how it is made.

A store is a folder:

    plan.json                   written first: source, fingerprint, tokenizer, parts
    tokenizer.json              the tokenizer that made the ids
    parts/part-00003.json       a finished part's shards (what a resumed prepare skips)
    train-00003.tokens          the ids of part 3's training documents back to back, each
                                followed by the end-of-document id (uint16 where the
                                vocabulary fits, else uint32; little-endian)
    train-00003.docs            uint64, the end offset of each document in that shard
    validation-00003.tokens/.docs
    manifest.json               written last: its presence means the store is complete

The manifest holds the format version, dtype, end-of-document id, the tokenizer's sha256
and size, the source's description, cheap fingerprint and the sha256 of the bytes read,
and per split the token, document and UTF-8 byte counts and each shard's name, counts and
sha256. A split's token stream is its shards' ids in part order: tok(d_1) e tok(d_2) e
... for its documents in corpus order, exactly what tokenizing the split in memory gives.

`prepare` streams the source part by part (sources.py) in chunks of about ENCODE_CHARS
characters that Hugging Face `tokenizers` encodes on all cores, so its memory does not
grow with the corpus; a part's files are written under temporary names, renamed, and
then recorded in its ledger, so that an interrupted prepare resumes at the first part
without one and writes the same bytes as an uninterrupted one. `shard=(i, n)` prepares
parts i, i + n, ... only, so that n launchers split a corpus; whoever finishes the last
part (or `join`) writes the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from engram_jax.compression import tokenizer_fingerprint
from engram_jax.data import sources
from engram_jax.data.config import SPLITS, DataConfig, check_split
from engram_jax.data.tokenizer import STORE_TOKENIZER, atomic_write, encoder, eod_id

log = logging.getLogger(__name__)

STORE_FORMAT = "engram-jax token store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
ENCODE_CHARS = 4 << 20  # text per encode_batch_fast call: enough documents for every core
# (one batch is encoded, without the GIL, while the next is read: two in memory at a time)
_HASH_BLOCK = 1 << 24


class StoreError(ValueError):
    """A token store that cannot be read as it is: missing, incomplete, corrupt or mismatched."""


def token_dtype(tokenizer: Tokenizer) -> np.dtype:
    return np.dtype("<u2") if tokenizer.get_vocab_size(with_added_tokens=True) <= 1 << 16 else np.dtype("<u4")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _plan_record(the_plan: sources.Plan, tokenizer: Tokenizer) -> dict:
    return {"format": STORE_FORMAT, "version": STORE_VERSION, "source": the_plan.description,
            "fingerprint": the_plan.fingerprint, "parts": len(the_plan.parts),
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "dtype": token_dtype(tokenizer).str}


def default_path(config: DataConfig, tokenizer: Tokenizer, the_plan: sources.Plan) -> Path:
    """`<cache_dir>/stores/<key>`, the key naming the source (and its fingerprint),
    its split and the tokenizer: another source, a changed file or another tokenizer is
    another store."""
    record = {**_plan_record(the_plan, tokenizer), "eod": eod_id(tokenizer, config.eod_token)}
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]
    return config.cache_root / "stores" / key


# ----------------------------------------------------------------------------- writing

class _ShardWriter:
    """Appends documents' ids to `<name>.tokens` and their end offsets to `<name>.docs`
    (under temporary names until `finish`)."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype):
        self.folder, self.name, self.dtype = folder, name, dtype
        self.tokens_file = open(folder / f"{name}.tokens.tmp", "wb")
        self.docs_file = open(folder / f"{name}.docs.tmp", "wb")
        self.tokens = self.documents = 0
        self.bytes = 0

    def write(self, ids: list[np.ndarray], ends: list[int]) -> None:
        """`ids` appended; `ends` are document ends counted from the start of `ids`."""
        if ids:
            block = np.concatenate(ids).astype(self.dtype, copy=False)
            block.tofile(self.tokens_file)
        if ends:
            (np.asarray(ends, np.int64) + self.tokens).astype("<u8").tofile(self.docs_file)
            self.documents += len(ends)
        self.tokens += sum(len(a) for a in ids)

    def close(self) -> None:
        self.tokens_file.close()
        self.docs_file.close()

    def finish(self) -> dict:
        """Renames the files into place; their entry for the manifest."""
        self.close()
        for kind in ("tokens", "docs"):
            os.replace(self.folder / f"{self.name}.{kind}.tmp", self.folder / f"{self.name}.{kind}")
        return {"name": self.name, "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes,
                "sha256_tokens": _file_sha256(self.folder / f"{self.name}.tokens"),
                "sha256_docs": _file_sha256(self.folder / f"{self.name}.docs")}


def _take_document(writer: _ShardWriter, index: int) -> np.ndarray:
    """Removes document `index` (ids and EOD) from a closed writer's files; its ids."""
    tokens_path = writer.folder / f"{writer.name}.tokens.tmp"
    docs_path = writer.folder / f"{writer.name}.docs.tmp"
    ends = np.fromfile(docs_path, "<u8").astype(np.int64)
    start, stop = (int(ends[index - 1]) if index else 0), int(ends[index])
    tokens = np.memmap(tokens_path, writer.dtype, "r")
    doc = np.array(tokens[start:stop])
    rewritten = tokens_path.with_suffix(".cut")
    with open(rewritten, "wb") as f:
        for lo, hi in ((0, start), (stop, len(tokens))):
            for at in range(lo, hi, _HASH_BLOCK):
                np.asarray(tokens[at: min(hi, at + _HASH_BLOCK)]).tofile(f)
    del tokens
    os.replace(rewritten, tokens_path)
    np.concatenate([ends[:index], ends[index + 1:] - (stop - start)]).astype("<u8").tofile(docs_path)
    writer.tokens -= stop - start
    writer.documents -= 1
    return doc


class _Progress:
    """A log line every `every_s` seconds: MB read of the total, documents, tokens, rate, ETA."""

    def __init__(self, total_bytes: int, every_s: float, label: str):
        self.total, self.every, self.label = total_bytes, every_s, label
        self.start = self.last = time.perf_counter()
        self.bytes = self.documents = self.tokens = 0

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.bytes / elapsed
        text = f"{self.label}: {self.bytes / 2**20:,.1f}"
        if self.total:
            eta = (self.total - self.bytes) / rate if rate > 0 else float("inf")
            text += f" of {self.total / 2**20:,.1f} MB ({100 * self.bytes / self.total:.0f}%)"
        else:
            text += " MB"
        text += (f", {self.documents:,} documents, {self.tokens:,} tokens, {rate / 2**20:.2f} MB/s, "
                 f"{self.tokens / elapsed:,.0f} tokens/s")
        if self.total:
            text += f", ETA {eta:,.0f} s" if eta != float("inf") else ""
        return text

    def update(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last >= self.every:
            self.last = now
            log.info("%s", self.line())


def _prepare_part(the_plan: sources.Plan, part: int, tokenizer: Tokenizer, eod: int, out: Path,
                  progress: _Progress) -> dict:
    """Tokenizes one part into its shards; returns its ledger."""
    enc, dtype = encoder(tokenizer), token_dtype(tokenizer)
    writers: dict[str, _ShardWriter] = {}
    eod_array = np.array([eod], dtype)
    batch: list[tuple[str, str, bool]] = []  # (split, piece, ends its document)
    chars = 0
    counts = {split: 0 for split in SPLITS}  # documents per split so far
    base_bytes = progress.bytes
    reading = sources.Reading()

    def write(pending: tuple[list, Future]) -> None:
        """Appends an encoded batch's ids to its splits' shards."""
        entries, future = pending
        order, encodings = future.result()
        ids_of = [None] * len(entries)
        for i, encoding in zip(order, encodings):
            ids_of[i] = np.asarray(encoding.ids, dtype)
        per_split: dict[str, tuple[list, list, list]] = {}
        for (split, piece, last), ids in zip(entries, ids_of):
            arrays, ends, offset = per_split.setdefault(split, ([], [], [0]))
            arrays.append(ids)
            offset[0] += len(ids)
            if last:
                arrays.append(eod_array)
                offset[0] += 1
                ends.append(offset[0])
            if split not in writers:
                writers[split] = _ShardWriter(out, f"{split}-{part:05d}", dtype)
            writers[split].bytes += len(piece.encode("utf-8", errors="surrogatepass"))
        for split, (arrays, ends, _) in per_split.items():
            writers[split].write(arrays, ends)
            progress.tokens += sum(len(a) for a in arrays)

    def encode(texts: list[str]) -> tuple[list[int], list]:
        # Longest first, so that no long piece is left to one core at the end of the batch.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        return order, enc.encode_batch_fast([texts[i] for i in order], add_special_tokens=False)

    pending = None  # the batch being encoded (in `pool`, without the GIL) while the next is read

    def flush() -> None:
        nonlocal batch, chars, pending
        submitted = (batch, pool.submit(encode, [piece for _, piece, _ in batch])) if batch else None
        if pending is not None:
            write(pending)
        pending, batch, chars = submitted, [], 0
        progress.bytes = base_bytes + reading.bytes
        progress.update()

    pool = ThreadPoolExecutor(1, thread_name_prefix="engram-encode")
    try:
        for doc in sources.documents(the_plan, part, reading):
            split = sources.split_of(doc, the_plan.val_fraction)
            previous = None
            for piece in doc.pieces:
                if previous is not None:
                    batch.append((split, previous, False))
                    chars += len(previous)
                previous = piece
                if chars >= ENCODE_CHARS:
                    flush()
            batch.append((split, previous or "", True))
            chars += len(previous or "")
            counts[split] += 1
            progress.documents += 1
            if chars >= ENCODE_CHARS:
                flush()
        flush()
        flush()  # the last batch's ids
        if the_plan.rule in ("record", "hub"):
            moved = sources.record_fallback(sum(counts.values()), the_plan.val_fraction, counts["validation"])
            if moved is not None:  # that record is document `ordinal` of the other split, the whole of it
                ordinal, to = moved
                source = writers["train" if to == "validation" else "validation"]
                source.close()
                doc = _take_document(source, ordinal)
                text_bytes = len(tokenizer.decode(doc[:-1].tolist(), skip_special_tokens=False).encode())
                source.bytes -= text_bytes
                writers[to] = _ShardWriter(out, f"{to}-{part:05d}", dtype)
                writers[to].write([doc], [len(doc)])
                writers[to].bytes = text_bytes
        shards = {split: writers[split].finish() for split in SPLITS if split in writers}
    except BaseException:
        for writer in writers.values():
            writer.close()
        raise
    finally:
        pool.shutdown(cancel_futures=True)
    progress.bytes = base_bytes + reading.bytes
    return {"part": part, "shards": shards, "source_bytes": reading.bytes, "file_sha256": reading.digests()}


def _ledger_path(out: Path, part: int) -> Path:
    return out / "parts" / f"part-{part:05d}.json"


def _finished(out: Path, part: int, dtype: np.dtype) -> dict | None:
    """The part's ledger when its shard files are in place with the recorded sizes."""
    path = _ledger_path(out, part)
    try:
        ledger = json.loads(path.read_text())
        for shard in ledger["shards"].values():
            if ((out / f"{shard['name']}.tokens").stat().st_size != shard["tokens"] * dtype.itemsize
                    or (out / f"{shard['name']}.docs").stat().st_size != shard["documents"] * 8):
                return None
        return ledger
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_plan(out: Path, record: dict) -> None:
    """Records what `out` is being prepared from, or checks that it is the same."""
    path = out / PLAN
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except ValueError as err:
            raise StoreError(f"{path}: corrupt ({err}); remove the folder to prepare it again") from None
        if existing != record:
            changed = sorted(k for k in record if existing.get(k) != record[k])
            raise StoreError(f"{out} holds a store prepared from other input (it differs in: {', '.join(changed)}); "
                             "remove it or prepare into another folder (--out)")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))


def prepare(config: DataConfig, tokenizer: Tokenizer, out: str | os.PathLike | None = None, *,
            shard: tuple[int, int] = (0, 1), part_bytes: int = sources.PART_BYTES,
            log_every_s: float = 10.0, stop_after_parts: int | None = None) -> TokenStore | None:
    """Tokenizes `config.source` into a token store (or finishes one that was interrupted).

    Args:
      config: the data config (source, text_field, val_fraction, eod_token, cache_dir).
      tokenizer: the run's tokenizer (`load_tokenizer(config)`).
      out: the store folder; default `default_path(...)` in the cache.
      shard: (i, n): prepare only parts i, i + n, ... (n launchers split the corpus).
      part_bytes: source bytes per part (parts are consecutive files).
      log_every_s: seconds between progress lines.
      stop_after_parts: stop after preparing this many parts (as an interruption would).

    Returns:
      The store, or None while other launchers' parts are missing.

    Raises:
      ValueError (StoreError): a source error (naming the file), or `out` holding a store
        of another source or tokenizer.
    """
    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
    the_plan = sources.plan(config, part_bytes)
    out = Path(out).expanduser() if out is not None else default_path(config, tokenizer, the_plan)
    eod = eod_id(tokenizer, config.eod_token)
    _check_plan(out, {**_plan_record(the_plan, tokenizer), "eod": eod})
    if (out / MANIFEST).exists():
        return TokenStore.open(out, tokenizer=tokenizer)
    if not (out / STORE_TOKENIZER).exists():
        atomic_write(out / STORE_TOKENIZER, lambda f: f.write(tokenizer.to_str().encode("utf-8")))
    if line := the_plan.skipped_line():
        log.info("%s: %s", config.source, line)
    dtype = token_dtype(tokenizer)
    mine = [p for p in range(len(the_plan.parts)) if p % count == index]
    todo = [p for p in mine if _finished(out, p, dtype) is None]
    if len(todo) < len(mine):
        log.info("%s: %d of %d parts already prepared, resuming", out, len(mine) - len(todo), len(mine))
    progress = _Progress(sum(the_plan.part_bytes(p) for p in todo), log_every_s, f"preparing {out.name}")
    (out / "parts").mkdir(exist_ok=True)
    for done, part in enumerate(todo):
        if stop_after_parts is not None and done >= stop_after_parts:
            return None
        ledger = _prepare_part(the_plan, part, tokenizer, eod, out, progress)
        atomic_write(_ledger_path(out, part), lambda f: f.write(json.dumps(ledger, indent=1).encode()))
    if todo:
        progress.update(force=True)
    missing = [p for p in range(len(the_plan.parts)) if _finished(out, p, dtype) is None]
    if missing:
        log.info("%s: %d of %d parts are still missing (other launchers'); join them with --join when done",
                 out, len(missing), len(the_plan.parts))
        return None
    return join(out, tokenizer)


def join(out: str | os.PathLike, tokenizer: Tokenizer | None = None) -> TokenStore:
    """Writes the manifest of a store whose parts are all prepared; the store.

    Raises:
      StoreError: no plan.json, or parts still missing (naming how many and the first).
    """
    out = Path(out).expanduser()
    try:
        record = json.loads((out / PLAN).read_text())
    except (OSError, ValueError) as err:
        raise StoreError(f"{out} is not a token store being prepared (cannot read {PLAN}: {err})") from None
    dtype = np.dtype(record["dtype"])
    ledgers = [_finished(out, p, dtype) for p in range(record["parts"])]
    missing = [p for p, ledger in enumerate(ledgers) if ledger is None]
    if missing:
        raise StoreError(f"{out}: {len(missing)} of {record['parts']} parts are not prepared yet (the first is "
                         f"part {missing[0]}); run engram-prepare for them (it resumes), then --join")
    splits = {}
    for split in SPLITS:
        shards = [ledger["shards"][split] for ledger in ledgers if split in ledger["shards"]]
        shards = [s for s in shards if s["tokens"]]
        splits[split] = {"tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards),
                         "bytes": sum(s["bytes"] for s in shards), "shards": shards}
    content = sources.content_sha256(d for ledger in ledgers for d in ledger["file_sha256"])
    tok = Tokenizer.from_file(str(out / STORE_TOKENIZER))
    manifest = {"format": STORE_FORMAT, "version": STORE_VERSION, "dtype": record["dtype"], "eod_id": record["eod"],
                "tokenizer": {"sha256": record["tokenizer_sha256"],
                              "vocab_size": tok.get_vocab_size(with_added_tokens=True)},
                "source": {**record["source"], "fingerprint": record["fingerprint"], "content_sha256": content,
                           "bytes": sum(ledger["source_bytes"] for ledger in ledgers)},
                "parts": record["parts"], "splits": splits}
    atomic_write(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    log.info("token store %s: %s", out, ", ".join(f"{split} {s['tokens']:,} tokens in {s['documents']:,} documents"
                                                  for split, s in splits.items()))
    return TokenStore.open(out, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- reading

@dataclasses.dataclass(frozen=True)
class TokenStore:
    """A complete store, checked through its manifest (and file sizes) when opened.

    Attributes:
      path: the store folder.
      manifest: the parsed manifest.json.
      digest: sha256 of manifest.json's bytes (what multi-host runs compare).
    """

    path: Path
    manifest: dict
    digest: str

    @classmethod
    def open(cls, path: str | os.PathLike, *, tokenizer: Tokenizer | None = None,
             verify: bool = False) -> TokenStore:
        """Opens a store, checking its manifest, its shards' sizes and, with `verify`, their
        sha256; with `tokenizer`, that the store's ids come from it.

        Raises:
          StoreError: one line naming the store and the problem.
        """
        path = Path(path).expanduser()
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            if (path / PLAN).exists():
                raise StoreError(f"the token store {path} is incomplete (no {MANIFEST}: still being prepared, or "
                                 "interrupted); rerun engram-prepare to finish it (it resumes)")
            if not path.exists():
                raise StoreError(f"the token store {path} does not exist")
            raise StoreError(f"{path} is not a token store (no {MANIFEST})")
        raw = manifest_path.read_bytes()
        try:
            manifest = json.loads(raw)
            if manifest.get("format") != STORE_FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}")
            shards = {split: manifest["splits"][split]["shards"] for split in SPLITS}
            dtype = np.dtype(manifest["dtype"])
        except (ValueError, KeyError, TypeError) as err:
            raise StoreError(f"{manifest_path}: not a readable token store manifest ({err})") from None
        if manifest.get("version") != STORE_VERSION:
            raise StoreError(f"{path}: store version {manifest.get('version')}, this engram-jax reads version "
                             f"{STORE_VERSION}; prepare the source again")
        if tokenizer is not None and manifest["tokenizer"]["sha256"] != tokenizer_fingerprint(tokenizer):
            raise StoreError(f"the token store {path} was prepared with another tokenizer (sha256 "
                             f"{manifest['tokenizer']['sha256'][:12]}) than this run's "
                             f"({tokenizer_fingerprint(tokenizer)[:12]}); use its {STORE_TOKENIZER} "
                             "(data.tokenizer) or prepare the source again")
        for split_shards in shards.values():
            for shard in split_shards:
                for kind, expected in (("tokens", shard["tokens"] * dtype.itemsize), ("docs", shard["documents"] * 8)):
                    file = path / f"{shard['name']}.{kind}"
                    size = file.stat().st_size if file.exists() else None
                    if size != expected:
                        raise StoreError(f"token store {path}: {file.name} "
                                         f"{'is missing' if size is None else f'has {size:,} bytes'}, the manifest "
                                         f"says {expected:,}; prepare the source again")
                    if verify and _file_sha256(file) != shard[f"sha256_{kind}"]:
                        raise StoreError(f"token store {path}: {file.name} does not match its sha256 in the "
                                         "manifest (corrupt); prepare the source again")
        return cls(path, manifest, hashlib.sha256(raw).hexdigest())

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def eod(self) -> int:
        return int(self.manifest["eod_id"])

    def shards(self, split: str) -> list[dict]:
        check_split(split)
        return self.manifest["splits"][split]["shards"]

    def num_tokens(self, split: str) -> int:
        check_split(split)
        return int(self.manifest["splits"][split]["tokens"])

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of the split's text per token of its stream (EOD ids counted)."""
        s = self.manifest["splits"][split]
        if not s["tokens"]:
            raise StoreError(f"the {split!r} split of the token store {self.path} is empty")
        return s["bytes"] / s["tokens"]

    def tokens(self, split: str, limit: int | None = None) -> np.ndarray:
        """The split's token stream, int32 [N], or its first `limit` ids (read into memory:
        the whole stream only for tests and small corpora)."""
        parts, left = [], limit
        for s in self.shards(split):
            if left is not None and left <= 0:
                break
            count = s["tokens"] if left is None else min(left, s["tokens"])
            parts.append(np.fromfile(self.path / f"{s['name']}.tokens", self.dtype, count=count))
            left = None if left is None else left - count
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

    def document_ends(self, split: str) -> np.ndarray:
        """int64 [documents]: each document's end in the split's stream (its EOD + 1)."""
        ends, base = [], 0
        for s in self.shards(split):
            ends.append(np.fromfile(self.path / f"{s['name']}.docs", "<u8").astype(np.int64) + base)
            base += s["tokens"]
        return np.concatenate(ends) if ends else np.zeros(0, np.int64)


def verify(config: DataConfig, tokenizer: Tokenizer, path: str | os.PathLike | None = None
           ) -> tuple[TokenStore, bool]:
    """Checks a prepared store: every shard against its sha256 and, when `config`'s source
    is readable and planned as the manifest says (same description and fingerprint), the
    sha256 of its bytes. Returns the store and whether the source was checked.

    Raises:
      StoreError: naming the store and what does not match.
    """
    if path is None:
        path = default_path(config, tokenizer, sources.plan(config))
    store = TokenStore.open(path, tokenizer=tokenizer, verify=True)
    recorded = store.manifest["source"]
    try:
        the_plan = sources.plan(config)
    except (OSError, ValueError):
        return store, False  # the source is not here: the shards alone are checked
    if the_plan.fingerprint != recorded["fingerprint"] or any(
            recorded.get(k) != v for k, v in the_plan.description.items()):
        return store, False
    if sources.content_sha256(sources.file_digests(the_plan)) != recorded["content_sha256"]:
        raise StoreError(f"the source {config.source!r} has the names, sizes and times the token store {store.path} "
                         "recorded but other bytes; prepare it again")
    return store, True


_OPENED: dict[tuple, TokenStore] = {}


def _key(config: DataConfig, tokenizer: Tokenizer) -> tuple:
    return (config.store, config.source, config.text_field, config.val_fraction, config.eod_token,
            str(config.cache_root), tokenizer_fingerprint(tokenizer))


def remember(config: DataConfig, tokenizer: Tokenizer, store: TokenStore) -> None:
    """Makes `token_store(config, tokenizer)` return `store` in this process."""
    _OPENED[_key(config, tokenizer)] = store


def token_store(config: DataConfig, tokenizer: Tokenizer, *, prepare_missing: bool = True,
                progress: Callable | None = None) -> TokenStore:
    """The run's store: `data.store`, or the source's store in the cache, prepared on
    first use. Opened once per process (the source is walked and stat-ed, not read).

    Raises:
      StoreError: as `TokenStore.open`, or no store while `prepare_missing` is False.
    """
    key = _key(config, tokenizer)
    if key in _OPENED and (_OPENED[key].path / MANIFEST).exists():
        return _OPENED[key]
    if config.store:
        store = TokenStore.open(config.store, tokenizer=tokenizer)
    else:
        the_plan = sources.plan(config)
        path = default_path(config, tokenizer, the_plan)
        if (path / MANIFEST).exists():
            store = TokenStore.open(path, tokenizer=tokenizer)
        elif not prepare_missing:
            raise StoreError(f"no token store of {config.source!r} at {path}")
        else:
            log.info("preparing %s into the token store %s (once; engram-prepare does this ahead of time)",
                     config.source, path)
            store = prepare(config, tokenizer, path)
    _OPENED[key] = store
    return store
