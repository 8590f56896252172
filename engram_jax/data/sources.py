"""Where documents come from, and which split each one belongs to.

A source is first planned (`plan`), reading nothing but names, sizes and modification
times (and the first 4 KB of a file whose name does not tell its kind):

  - "stdlib": this interpreter's standard library .py files (site-packages and test
    folders left out);
  - a file or a folder of files (recursive, sorted by relative path, hidden entries
    skipped): .jsonl, .jsonl.gz / .json.gz and .parquet hold one document per record
    (`text_field`); .txt/.md/.py and any other file that is UTF-8 text are one document
    each; binaries and empty files are skipped and counted;
  - "hf:<name>[:<config>]": the "train" split of a Hugging Face dataset, streamed (its
    fingerprint is its name: a new revision of the dataset needs a new store folder).

The plan groups the files into parts, consecutive runs of about `part_bytes`, that a
prepare processes one at a time (and that `--shard i/n` deals out), and fingerprints the
source cheaply (relative paths, sizes, modification times) so that a token store knows
whether it is still current without reading the text.

Splits are fixed by the source, never by the seed:

  - by file (2+ files): a file is held out when a sha256 of its relative path maps below
    val_fraction; with val_fraction > 0 each split keeps at least one file;
  - by record (one JSONL or Parquet file, a Hub dataset): the k-th non-empty record,
    the same way from str(k); the "at least one" rule applies once the whole source has
    been read (`record_fallback`);
  - by lines (one text file): its last ceil(val_fraction * lines) lines.

Documents stream as pieces of at most PIECE_CHARS characters. A longer document is cut
right after a line break that sits between two non-space characters, where the
byte-level pre-tokenizers (GPT-2's, Llama 3's) split anyway, so its ids are those of the
whole text; a tokenizer whose pre-tokens span line breaks may differ near a cut.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import re
import sysconfig
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from engram_jax.data.config import DataConfig

TEXT_SUFFIXES = (".txt", ".md", ".py")
RECORD_KINDS = ("jsonl", "jsonl.gz", "parquet")
PIECE_CHARS = 1 << 20
_HARD_PIECE_CHARS = 16 << 20  # no safe cut in this many characters: cut anyway
_READ_CHARS = 4 << 20
_SNIFF_BYTES = 4096
PART_BYTES = 64 << 20
# Test folders are dropped from the stdlib corpus: 19 of its 31 MB (CPython 3.11), with
# deliberately odd files (bad encodings, generated tables); the rest, 12 MB in 734 files,
# trains a 4096-id BPE in ~7 s on 2 cores.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
SPLIT_RULES = ("file", "record", "lines", "hub")
PLAN_VERSION = 1  # bump when the split rules or the reading of files change


@dataclasses.dataclass(frozen=True, slots=True)
class SourceFile:
    path: str
    key: str  # the path relative to the source's root, '/'-separated
    kind: str  # "text", "jsonl", "jsonl.gz" or "parquet"
    size: int
    mtime_ns: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a source holds and how it splits, known before any text is read.

    Attributes:
      source, text_field, val_fraction: from the DataConfig.
      rule: "file", "record", "lines" or "hub" (see the module docstring).
      files: the usable files in corpus order (empty for "hub").
      held: keys of the held-out files (rule "file").
      parts: [start, stop) ranges of `files`, in order; one part for "hub".
      skipped: (reason, count) of the files left out.
    """

    source: str
    text_field: str
    val_fraction: float
    rule: str
    files: tuple[SourceFile, ...]
    held: frozenset[str]
    parts: tuple[tuple[int, int], ...]
    skipped: tuple[tuple[str, int], ...]

    @property
    def description(self) -> dict:
        """What defines the split and the text (JSON)."""
        return {"source": self.source, "text_field": self.text_field, "val_fraction": self.val_fraction,
                "rule": self.rule, "plan_version": PLAN_VERSION}

    @property
    def fingerprint(self) -> str:
        """sha256 of each file's relative path, size and modification time (the source name for "hub")."""
        listing = [[f.key, f.kind, f.size, f.mtime_ns] for f in self.files] or [self.source]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def part_bytes(self, part: int) -> int:
        start, stop = self.parts[part]
        return sum(f.size for f in self.files[start:stop])

    def skipped_line(self) -> str:
        """"skipped 3 files: 2 binary (NUL bytes), 1 empty", or ""."""
        if not self.skipped:
            return ""
        total = sum(n for _, n in self.skipped)
        return f"skipped {total} file(s): " + ", ".join(f"{n} {reason}" for reason, n in self.skipped)


# ----------------------------------------------------------------------------- planning

def holdout_score(key: str) -> float:
    """A uniform number in [0, 1) fixed by `key`; keys below val_fraction are held out."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64


def held_out(keys: list[str], fraction: float) -> set[str]:
    """Keys in validation. With 2+ keys and fraction > 0 each split keeps at least one."""
    scores = {k: holdout_score(k) for k in dict.fromkeys(keys)}
    held = {k for k, s in scores.items() if s < fraction}
    if fraction > 0 and len(scores) >= 2:
        if not held:
            held = {min(scores, key=scores.get)}
        elif len(held) == len(scores):
            held.remove(max(scores, key=scores.get))
    return held


def record_split(ordinal: int, fraction: float) -> str:
    """The split of the `ordinal`-th non-empty record, before `record_fallback`."""
    return "validation" if holdout_score(str(ordinal)) < fraction else "train"


def record_fallback(count: int, fraction: float, num_validation: int) -> tuple[int, str] | None:
    """The record that changes split once all `count` records are known, or None.

    With 2+ records and fraction > 0 each split keeps one: when no record was held out,
    the lowest-scoring one moves to validation; when all were, the highest to train.
    """
    if fraction <= 0 or count < 2 or 0 < num_validation < count:
        return None
    scores = [holdout_score(str(k)) for k in range(count)]
    if num_validation == 0:
        return min(range(count), key=scores.__getitem__), "validation"
    return max(range(count), key=scores.__getitem__), "train"


def _kind_by_name(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith((".jsonl.gz", ".json.gz")):
        return "jsonl.gz"
    suffix = os.path.splitext(lower)[1]
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "text" if suffix in TEXT_SUFFIXES else None)


def _open_binary(path: str):
    try:
        return open(path, "rb", buffering=0)
    except OSError as err:
        raise ValueError(f"{path}: cannot read it ({err.strerror or err})") from None


def _sniff(path: str) -> str | None:
    """Why the file is not UTF-8 text ("binary (NUL bytes)", "not UTF-8"), or None if it is."""
    with _open_binary(path) as f:
        head = f.read(_SNIFF_BYTES)
    if b"\0" in head:
        return "binary (NUL bytes)"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut character is fine
    except UnicodeDecodeError:
        return "not UTF-8"
    return None


def _source_file(path: str, root: Path, kind: str) -> SourceFile:
    st = os.stat(path)
    return SourceFile(path, Path(path).relative_to(root).as_posix(), kind, st.st_size, st.st_mtime_ns)


def _walk(root: Path, stdlib: bool, skipped: Counter) -> list[SourceFile]:
    """The folder's usable files, sorted by relative path: one stat per file (scandir)."""
    files = []
    skip_dirs = _STDLIB_SKIP_DIRS if stdlib else frozenset()
    folders = [(str(root), "")]
    while folders:
        folder, prefix = folders.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                key = prefix + entry.name
                if entry.is_dir():  # a symbolic link to a folder is not followed (as os.walk)
                    if entry.name not in skip_dirs and not entry.is_symlink():
                        folders.append((entry.path, key + "/"))
                    continue
                if not entry.is_file():
                    continue
                if stdlib:
                    kind = "text" if entry.name.endswith(".py") else None
                    if kind is None:
                        continue
                else:
                    kind = _kind_by_name(entry.name)
                    if kind is None and (reason := _sniff(entry.path)) is not None:
                        skipped[reason] += 1
                        continue
                st = entry.stat()
                files.append(SourceFile(entry.path, key, kind or "text", st.st_size, st.st_mtime_ns))
    files.sort(key=lambda f: f.key)
    return files


def plan(config: DataConfig, part_bytes: int = PART_BYTES) -> Plan:
    """The source's files, split rule and parts (reading no text).

    Raises:
      ValueError: an unknown source scheme, a missing path, a file that is neither text
        nor records, or a folder with no usable files (naming it).
    """
    fraction = config.val_fraction
    common = dict(source=config.source, text_field=config.text_field, val_fraction=fraction)
    if config.source.startswith("hf:"):
        return Plan(**common, rule="hub", files=(), held=frozenset(), parts=((0, 0),), skipped=())
    skipped: Counter = Counter()
    if config.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _walk(root, True, skipped)
    else:
        root = Path(config.source).expanduser()
        match = _SCHEME.match(config.source)
        if match and len(match.group(1)) > 1 and not root.exists():  # "C:" is a drive
            raise ValueError(f"unknown source scheme {match.group(1)!r} in {config.source!r}; "
                             "use 'stdlib', a path, or 'hf:<name>[:<config>]'")
        if not root.exists():
            raise ValueError(f"data source {str(root)!r} does not exist")
        if root.is_file():
            kind = _kind_by_name(root.name)
            if kind is None and (reason := _sniff(str(root))) is not None:
                raise ValueError(f"{str(root)!r} is not a text, JSONL, gzipped JSONL or Parquet file ({reason})")
            files, root = [_source_file(str(root), root.parent, kind or "text")], root.parent
        else:
            files = _walk(root, False, skipped)
    empty = [f for f in files if f.size == 0]
    files = [f for f in files if f.size > 0]
    if empty:
        skipped["empty"] += len(empty)
    if not files:
        raise ValueError(f"{str(root)!r} holds no usable files (non-empty text, JSONL, gzipped JSONL or "
                         f"Parquet) for source {config.source!r}")
    if len(files) >= 2:
        rule, held = "file", frozenset(held_out([f.key for f in files], fraction))
    else:
        rule, held = ("record" if files[0].kind in RECORD_KINDS else "lines"), frozenset()
    parts, start, size = [], 0, 0
    for i, f in enumerate(files):
        size += f.size
        if size >= part_bytes or i == len(files) - 1:
            parts.append((start, i + 1))
            start, size = i + 1, 0
    return Plan(**common, rule=rule, files=tuple(files), held=held, parts=tuple(parts),
                skipped=tuple(sorted(skipped.items())))


# ----------------------------------------------------------------------------- reading

@dataclasses.dataclass
class Document:
    """One document: its split (None: by record, `record_split(ordinal)`), and its text
    as pieces, to be consumed before the next document is asked for."""

    split: str | None
    ordinal: int
    pieces: Iterator[str]


class Reading:
    """Counts the source bytes a part's reading goes through, and hashes each file's."""

    def __init__(self):
        self.bytes = 0
        self.files: list = []  # a sha256 per file opened, in order

    def new_file(self):
        self.files.append(hashlib.sha256())
        return self.files[-1]

    def digests(self) -> list[str]:
        return [h.hexdigest() for h in self.files]


class _Counted(io.RawIOBase):
    """A binary file whose bytes are counted and hashed into a `Reading` as they are read."""

    def __init__(self, raw, reading: Reading):
        self.raw, self.reading, self.sha256 = raw, reading, reading.new_file()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.reading.bytes += n
        self.sha256.update(memoryview(buffer)[:n])
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _open_text(f: SourceFile, reading: Reading) -> io.TextIOWrapper:
    """The file as text: UTF-8, undecodable bytes as U+FFFD, universal newlines."""
    raw = io.BufferedReader(_Counted(_open_binary(f.path), reading), 1 << 20)
    if f.kind == "jsonl.gz":
        raw = gzip.GzipFile(fileobj=raw, mode="rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


def _safe_cut(text: str, limit: int) -> int | None:
    """The largest cut <= limit right after a line break between two non-space characters."""
    j = text.rfind("\n", 1, limit)
    while j > 0:
        if j + 1 < len(text) and not text[j - 1].isspace() and not text[j + 1].isspace():
            return j + 1
        j = text.rfind("\n", 1, j)
    return None


def pieces(chunks: Iterable[str], limit: int = PIECE_CHARS) -> Iterator[str]:
    """The text of `chunks` (joined) as pieces of at most `limit` characters, cut safely."""
    buffer = ""
    for chunk in chunks:
        buffer += chunk
        while len(buffer) > limit:
            cut = _safe_cut(buffer, limit)
            if cut is None:
                if len(buffer) < _HARD_PIECE_CHARS:
                    break  # read on: a safe cut may come
                cut = limit
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer


def _chunks(text: io.TextIOWrapper, what: str) -> Iterator[str]:
    try:
        while chunk := text.read(_READ_CHARS):
            yield chunk
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{what}: corrupt gzip data ({err})") from None


def _jsonl_texts(f: SourceFile, field: str, reading: Reading) -> Iterator[str]:
    with _open_text(f, reading) as text:
        line_no = 0
        try:
            for line_no, line in enumerate(text, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{f.path}:{line_no}: not a JSON record ({err})") from None
                value = record.get(field) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    raise ValueError(f"{f.path}:{line_no}: no string field {field!r} (set data.text_field)")
                yield value
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise ValueError(f"{f.path}: corrupt gzip data after line {line_no} ({err})") from None


def _parquet_texts(f: SourceFile, field: str, reading: Reading) -> Iterator[str]:
    import pyarrow.parquet as pq

    sha256 = reading.new_file()
    with _open_binary(f.path) as raw:  # the bytes, for the content hash
        while block := raw.read(1 << 22):
            sha256.update(block)
            reading.bytes += len(block)
    try:
        table = pq.ParquetFile(f.path)
    except Exception as err:  # noqa: BLE001 (pyarrow raises its own types)
        raise ValueError(f"{f.path}: not a readable Parquet file ({err})") from None
    names = table.schema_arrow.names
    if field not in names:
        raise ValueError(f"{f.path}: no column {field!r} (columns: {', '.join(names)}); set data.text_field")
    row = 0
    for batch in table.iter_batches(batch_size=4096, columns=[field]):
        for value in batch.column(0).to_pylist():
            if not isinstance(value, str):
                raise ValueError(f"{f.path}: row {row}: column {field!r} holds no string ({value!r})")
            row += 1
            yield value


def _hub_texts(plan_: Plan) -> Iterator[str]:
    _, name, *rest = plan_.source.split(":", 2)
    try:
        import datasets  # optional extra: pip install engram-jax[hf]
    except ImportError:
        raise ValueError(f"source {plan_.source!r} needs the optional `datasets` package "
                         "(pip install 'engram-jax[hf]')") from None
    rows = datasets.load_dataset(name, rest[0] if rest else None, split="train", streaming=True)
    for k, row in enumerate(rows):
        value = row.get(plan_.text_field)
        if not isinstance(value, str):
            raise ValueError(f"{plan_.source}: row {k} has no string field {plan_.text_field!r} "
                             f"(fields: {', '.join(row)}); set data.text_field")
        yield value


def _count_lines(f: SourceFile) -> tuple[int, bool]:
    """Lines of a text file (a last line without a line break counts) and whether any."""
    count, last = 0, ""
    with _open_text(f, Reading()) as text:
        for chunk in _chunks(text, f.path):
            count += chunk.count("\n")
            last = chunk[-1]
    return count + (last not in ("", "\n")), bool(last)


def _line_documents(f: SourceFile, fraction: float, reading: Reading) -> Iterator[Document]:
    """The two documents of one text file: its first lines (train), its last (validation)."""
    lines, _ = _count_lines(f)
    held = min(math.ceil(fraction * lines), max(lines - 1, 0))
    held = max(held, 1) if fraction > 0 and lines >= 2 else held
    cut = lines - held

    text = _open_text(f, reading)
    chunks = _chunks(text, f.path)
    rest: list[str] = []

    def train_chunks() -> Iterator[str]:
        seen = 0
        for chunk in chunks:
            n = chunk.count("\n")
            if seen + n < cut:
                seen += n
                yield chunk
                continue
            at = -1
            for _ in range(cut - seen):
                at = chunk.index("\n", at + 1)
            yield chunk[: at + 1]
            rest.append(chunk[at + 1:])
            return

    try:
        if cut > 0:
            yield Document("train", 0, pieces(train_chunks()))
        else:
            rest.extend(chunks)  # noqa: B020 (read the whole file as validation)
        if held > 0:
            def validation_chunks() -> Iterator[str]:
                yield from (c for c in rest if c)
                yield from chunks

            yield Document("validation", 0, pieces(validation_chunks()))
    finally:
        text.close()


def documents(plan_: Plan, part: int, reading: Reading) -> Iterator[Document]:
    """The non-empty documents of one part, in corpus order.

    Raises:
      ValueError: a malformed or field-less record, a Parquet file without the text
        column, corrupt gzip data (each naming the file and record).
    """
    if plan_.rule == "hub":
        ordinal = 0
        for value in _hub_texts(plan_):
            if value:
                yield Document(None, ordinal, iter((value,)) if len(value) <= PIECE_CHARS else pieces((value,)))
                ordinal += 1
        return
    start, stop = plan_.parts[part]
    ordinal = 0
    for f in plan_.files[start:stop]:
        split = ("validation" if f.key in plan_.held else "train") if plan_.rule == "file" else None
        if plan_.rule == "lines":
            yield from _line_documents(f, plan_.val_fraction, reading)
        elif f.kind == "text":
            with _open_text(f, reading) as text:
                yield Document(split, 0, pieces(_chunks(text, f.path)))
        else:
            texts = _parquet_texts if f.kind == "parquet" else _jsonl_texts
            for value in texts(f, plan_.text_field, reading):
                if value:
                    yield Document(split, ordinal,
                                   iter((value,)) if len(value) <= PIECE_CHARS else pieces((value,)))
                    ordinal += 1


def content_sha256(file_digests: Iterable[str]) -> str:
    """The source's content hash: a sha256 of its files' sha256s (hex, in corpus order)."""
    return hashlib.sha256("".join(file_digests).encode()).hexdigest()


def file_digests(plan_: Plan) -> list[str]:
    """sha256 (hex) of each file's bytes, in corpus order (reads the whole source)."""
    digests = []
    for f in plan_.files:
        h = hashlib.sha256()
        with _open_binary(f.path) as raw:
            while block := raw.read(1 << 22):
                h.update(block)
        digests.append(h.hexdigest())
    return digests


def split_of(doc: Document, fraction: float) -> str:
    return doc.split if doc.split is not None else record_split(doc.ordinal, fraction)


def load_documents(config: DataConfig, split: str) -> list[str]:
    """The non-empty documents of a split, in corpus order, in memory (for small corpora;
    training streams them into a token store instead).

    Raises:
      ValueError: as `plan` and `documents`, or an empty split.
    """
    from engram_jax.data.config import check_split

    check_split(split)
    the_plan = plan(config)
    docs: list[tuple[str, int, str]] = []  # (split, ordinal, text)
    for part in range(len(the_plan.parts)):
        for doc in documents(the_plan, part, Reading()):
            docs.append((split_of(doc, config.val_fraction), doc.ordinal, "".join(doc.pieces)))
    if the_plan.rule in ("record", "hub"):
        moved = record_fallback(len(docs), config.val_fraction, sum(s == "validation" for s, _, _ in docs))
        if moved is not None:
            ordinal, to = moved
            docs[ordinal] = (to, *docs[ordinal][1:])
    texts = [text for s, _, text in docs if s == split]
    if not texts:
        raise ValueError(f"the {split!r} split of source {config.source!r} is empty "
                         f"(val_fraction={config.val_fraction}); add data or change val_fraction")
    return texts


def first_documents(config: DataConfig, the_plan: Plan, split: str, max_bytes: int,
                    progress: Callable[[int], None] | None = None) -> Iterator[str]:
    """Pieces of the split's first documents, in corpus order, until `max_bytes` of text.

    The record rule's fallback is left out (it needs the whole source), so for a record
    source whose split rests on it the sample may hold the one moved record.
    """
    total = 0
    for part in range(len(the_plan.parts)):
        for doc in documents(the_plan, part, Reading()):
            if split_of(doc, config.val_fraction) != split:
                for _ in doc.pieces:  # read past it
                    pass
                continue
            for piece in doc.pieces:
                yield piece
                total += len(piece.encode("utf-8", errors="surrogatepass"))
                if progress is not None:
                    progress(total)
                if total >= max_bytes:
                    return
