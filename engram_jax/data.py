"""Input pipeline: text -> packed token windows -> Engram hash ids, with Grain.

A split's documents d_1..d_m are tokenized once (cached as `.npy`) and joined, each
followed by the end-of-document id e, into one stream s = tok(d_1) e tok(d_2) e ...
Window w (0 <= w < W = (|s| - 1) // T) is s[w T : w T + T + 1]: windows overlap by one
token, so every pair (s[i], s[i + 1]) up to the last whole window is one (input, target)
pair of exactly one window; the tail is dropped. For window x of T + 1 tokens:

    inputs  = x[0 : T],   targets = x[1 : T + 1],   hash_ids = NgramHasher(inputs)

The end-of-document token is `DataConfig.eod_token`, or the first of _EOD_CANDIDATES
that the tokenizer knows.

A window usually holds the end of one document and the start of the next. With
`DataConfig.segment_ids` (the default) the batch also carries, for input position t,

    segment_ids[t] = #{s <= t : inputs[s] = e}
    positions[t]   = t - (the latest s <= t with inputs[s] = e, or 0)

so that attention stays within a document and its rotary positions restart at 0, as
packed training does elsewhere. As an input the EOD opens the next document (a
beginning-of-document token at position 0, as `Trained.encode` starts a prompt); as a
target it stays the last prediction of the document it ends. A document cut by the
window's start begins at position 0 there. Engram is left as DeepSeek's reference has
it: its hashed n-grams (and short conv) read across the boundary, so the first tokens of
a document see the last tokens of the previous one through Engram only.

Grain runs the rest on `MapDataset`s, so every element has an index and the iterator's
state is one integer: training reads windows in a seeded permutation that is redrawn
each epoch (`shuffle(seed).repeat()`: epoch k uses seed + k), then `batch(B / P)`, and
process p of P takes batches p, p + P, ...: its part of step k is rows p B/P .. (p + 1)
B/P - 1 of the single-process batch k, in order, so the global batch that
`sharding.global_batch` assembles (process p's devices hold the p-th B/P rows) is that
batch exactly. Then the hashing map runs in Grain's threads or, with `num_workers > 0`,
its worker processes (`mp_prefetch`). Validation reads windows in order, truncated to
whole global batches, once.

In a multi-process run every process must see the same tokenizer and token stream:
`shared_tokenizer` and `shared_compression` build them on process 0 only and send them
to the others, and `check_same_data` compares the processes' fingerprints.

Why not Grain's packing (`ConcatThenSplitIterDataset`): it is an `IterDataset`, after
which only a windowed shuffle is possible and resuming replays the packer; packing a
cached stream by index gives a global shuffle and an exact, O(1) checkpoint.

Splits are by file (stdlib, folders with 2+ files: a sha256 of the relative path),
by record (a single JSONL file, Hugging Face rows: a sha256 of the index), or, for a
single text file, its last `ceil(val_fraction * lines)` lines; never by the seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sysconfig
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import grain
from absl import flags
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engram_jax.compression import Compression, compress_tokenizer, default_cache_dir, tokenizer_fingerprint
from engram_jax.config_base import Config
from engram_jax.hashing import NgramHasher

EOD_TOKEN = "<|endoftext|>"  # id 0 of a trained tokenizer
PAD_TOKEN = "<|pad|>"  # id 1 of a trained tokenizer
# DeepSeek-V3's (the paper presets' tokenizer) end of document and pad, ids 1 and 2 of its
# tokenizer.json. The bars are U+FF5C (fullwidth) and the spaces U+2581, not ASCII.
DEEPSEEK_EOD_TOKEN = "<\uff5cend\u2581of\u2581sentence\uff5c>"
DEEPSEEK_PAD_TOKEN = "<\uff5c\u2581pad\u2581\uff5c>"
# End-of-document tokens of common hub tokenizers (GPT-2/Qwen, DeepSeek-V3, Llama 3,
# Llama 2/T5, Gemma), tried in this order when DataConfig.eod_token is "".
_EOD_CANDIDATES = (EOD_TOKEN, DEEPSEEK_EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
_PAD_CANDIDATES = (PAD_TOKEN, DEEPSEEK_PAD_TOKEN, "<pad>", "[PAD]")
TEXT_SUFFIXES = (".txt", ".md", ".py")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")
SPLITS = ("train", "validation")
# Test folders are dropped from the stdlib corpus: 19 of its 31 MB (CPython 3.11), with
# deliberately odd files (bad encodings, generated tables); the rest, 12 MB in 734 files,
# trains a 4096-id BPE in ~7 s on 2 cores.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
# Bump when the cache layout or the trainer changes, so older entries are not trusted.
FORMAT_VERSION = 1
_BPE_SETTINGS = {"model": "bpe", "pre_tokenizer": "byte_level", "add_prefix_space": False,
                 "special_tokens": [EOD_TOKEN, PAD_TOKEN], "min_frequency": 0,
                 "format_version": FORMAT_VERSION}
# Threads and buffered batches per process for slicing + hashing. Measured on 2 cores
# (2 Engram layers, H = 16): batches/s for 0/1/2 threads were 700/600/500 at 16 x 256 and
# 135/125/105 at 64 x 1024; one thread keeps most of the speed and overlaps the hashing
# with the training step, more threads contend for the GIL. A small buffer bounds host
# memory, since one batch of hash ids can take hundreds of MB.
_READ_THREADS = 1
_PREFETCH_BATCHES = 4
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """Where the text comes from, how it is tokenized, and the batch shape.

    Attributes:
      source: "stdlib" (this interpreter's standard library .py files, without
        site-packages and test folders); a path to a .txt/.md/.py/.jsonl file or to a
        folder of them (recursive, sorted; hidden entries skipped); or
        "hf:<name>[:<config>]" for the "train" split of a Hugging Face dataset (needs
        the optional `datasets` package and a network).
      text_field: field holding the text in JSONL records and Hugging Face rows.
      tokenizer: "" trains a byte-level BPE on the training split (cached); else a
        tokenizer.json path or a Hugging Face hub name (online).
      vocab_size: ids of the trained BPE, special tokens included (ignored otherwise).
      eod_token: the token that ends each document in the stream; "" picks the first of
        `<|endoftext|>`, DeepSeek's `<｜end▁of▁sentence｜>`, `<|end_of_text|>`, `</s>`,
        `<eos>` that the tokenizer has.
      seq_len: T, tokens per training sequence; each window holds T + 1 and the next
        starts T tokens later.
      segment_ids: batches carry "segment_ids" and "positions" [B, T], so that the
        model's attention is masked to each document and RoPE positions restart at
        every end-of-document token (which opens the next document); False lets
        attention cross documents with positions 0..T-1. Engram's n-grams read across
        documents either way (as the reference).
      batch_size: B, the global batch size.
      val_fraction: share of files (or records) held out for validation.
      seed: seed of the shuffle (0 <= seed < 2**32, as Grain requires).
      num_workers: Grain worker processes for slicing and hashing; 0 runs in-process.
      cache_dir: "" means $ENGRAM_JAX_CACHE or ~/.cache/engram_jax.
    """

    source: str = "stdlib"
    text_field: str = "text"
    tokenizer: str = ""
    vocab_size: int = 4096
    eod_token: str = ""
    seq_len: int = 256
    segment_ids: bool = True
    batch_size: int = 16
    val_fraction: float = 0.05
    seed: int = 0
    num_workers: int = 0
    cache_dir: str = ""

    def validate(self) -> None:
        self.check(bool(self.source), "source", "must name 'stdlib', a path or 'hf:<name>'")
        self.check(bool(self.text_field), "text_field", "must not be empty")
        # 256 byte-level symbols plus the two special tokens.
        self.check(bool(self.tokenizer) or self.vocab_size >= 258, "vocab_size",
                   "a byte-level BPE needs >= 258 ids (256 bytes + 2 special tokens)")
        self.check(self.seq_len >= 1, "seq_len", "must be >= 1")
        self.check(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.check(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        self.check(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32) (Grain's shuffle)")
        self.check(self.num_workers >= 0, "num_workers", "must be >= 0")

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


# ----------------------------------------------------------------------------- documents

def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _holdout_score(key: str) -> float:
    """A uniform number in [0, 1) fixed by `key`; keys below val_fraction are held out."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64


def _held_out(keys: list[str], fraction: float) -> set[str]:
    """Keys in validation. With 2+ keys and fraction > 0 each split keeps at least one."""
    scores = {k: _holdout_score(k) for k in dict.fromkeys(keys)}
    held = {k for k, s in scores.items() if s < fraction}
    if fraction > 0 and len(scores) >= 2:
        if not held:
            held = {min(scores, key=scores.get)}
        elif len(held) == len(scores):
            held.remove(max(scores, key=scores.get))
    return held


def _source_files(config: DataConfig) -> tuple[Path, list[Path]]:
    """The corpus root and its usable files, sorted by relative path."""
    if config.source == "stdlib":
        root, suffixes, skip = Path(sysconfig.get_paths()["stdlib"]), (".py",), _STDLIB_SKIP_DIRS
    else:
        match = _SCHEME.match(config.source)
        root, suffixes, skip = Path(config.source).expanduser(), SUFFIXES, frozenset()
        if match and len(match.group(1)) > 1 and not root.exists():  # "C:" is a drive
            raise ValueError(f"unknown source scheme {match.group(1)!r} in {config.source!r}; "
                             "use 'stdlib', a path, or 'hf:<name>[:<config>]'")
        if not root.exists():
            raise ValueError(f"data source {str(root)!r} does not exist")
        if root.is_file():
            if root.suffix not in SUFFIXES:
                raise ValueError(f"{str(root)!r} is not a {'/'.join(SUFFIXES)} file")
            return root.parent, [root]
    files = []
    for folder, dirs, names in os.walk(root):
        # Pruning here keeps the walk off site-packages (10x the stdlib's files).
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        files += [Path(folder, n) for n in names if Path(n).suffix in suffixes
                  and not n.startswith(".") and os.path.isfile(os.path.join(folder, n))]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return root, files


def _read_file(path: Path, text_field: str) -> list[str]:
    """Documents of one file: the whole text, or one per JSONL record."""
    # A stray undecodable byte should not drop a file: it becomes U+FFFD.
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return [text]
    docs = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: not a JSON record ({err})") from None
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise ValueError(f"{path}:{line_no}: no string field {text_field!r} "
                             "(set DataConfig.text_field)")
        docs.append(value)
    return docs


def _hf_documents(config: DataConfig) -> list[str]:
    _, name, *rest = config.source.split(":", 2)
    try:
        import datasets  # optional extra: pip install engram-jax[hf]
    except ImportError:
        raise ValueError(f"source {config.source!r} needs the optional `datasets` package "
                         "(pip install 'engram-jax[hf]')") from None
    rows = datasets.load_dataset(name, rest[0] if rest else None, split="train")
    if config.text_field not in rows.column_names:
        raise ValueError(f"{config.source}: no column {config.text_field!r} "
                         f"(columns: {rows.column_names}); set DataConfig.text_field")
    return list(rows[config.text_field])


def load_documents(config: DataConfig, split: str) -> list[str]:
    """The non-empty documents of a split, in corpus order.

    Args:
      config: the data config (source, text_field, val_fraction).
      split: "train" or "validation".

    Returns:
      The split's documents (a file's text, or a JSONL record's / row's text field).

    Raises:
      ValueError: an unknown split or source scheme, a missing path, a folder with no
        usable files (naming it), a malformed JSONL record, or an empty split.
    """
    _check_split(split)
    fraction = config.val_fraction
    if config.source.startswith("hf:"):
        docs = _hf_documents(config)
        keys = [str(i) for i in range(len(docs))]
    else:
        root, files = _source_files(config)
        per_file = [(f, [d for d in _read_file(f, config.text_field) if d]) for f in files]
        per_file = [(f, d) for f, d in per_file if d]
        if not per_file:
            raise ValueError(f"{str(root if len(files) != 1 else files[0])!r} holds no usable "
                             f"files (non-empty {', '.join(SUFFIXES)}) for source "
                             f"{config.source!r}")
        if len(per_file) >= 2:  # split by file
            keys = [f.relative_to(root).as_posix() for f, d in per_file for _ in d]
            docs = [doc for _, d in per_file for doc in d]
        elif per_file[0][0].suffix == ".jsonl":  # one JSONL file: split by record
            docs = per_file[0][1]
            keys = [str(i) for i in range(len(docs))]
        else:  # one text file: hold out its last lines
            lines = per_file[0][1][0].splitlines(keepends=True)
            held = min(math.ceil(fraction * len(lines)), max(len(lines) - 1, 0))
            held = max(held, 1) if fraction > 0 and len(lines) >= 2 else held
            cut = len(lines) - held
            part = lines[:cut] if split == "train" else lines[cut:]
            docs = ["".join(part)] if part else []
            keys = None
    if keys is not None:
        held = _held_out(keys, fraction)
        docs = [d for k, d in zip(keys, docs) if (k in held) == (split == "validation")]
    if not docs:
        raise ValueError(f"the {split!r} split of source {config.source!r} is empty "
                         f"(val_fraction={fraction}); add data or change val_fraction")
    return docs


def _documents_fingerprint(documents: list[str]) -> hashlib._Hash:
    h = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))  # length prefix: ["ab"] != ["a", "b"]
        h.update(data)
    return h


def _atomic_write(path: Path, write) -> None:
    """Calls write(file) on a temporary file beside `path`, then renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE with EOD_TOKEN at id 0 and PAD_TOKEN at id 1.

    Raises:
      ValueError: the documents hold too few distinct pairs for `vocab_size` ids.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=_BPE_SETTINGS["min_frequency"],
        special_tokens=_BPE_SETTINGS["special_tokens"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer, length=len(documents))
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"the corpus yields only {tok.get_vocab_size()} BPE ids, not "
                         f"vocab_size={vocab_size}; use a smaller vocab_size or more text")
    return tok


def load_tokenizer(config: DataConfig) -> Tokenizer:
    """The given tokenizer, or the BPE trained on the training split (trained once).

    The trained one is cached as `<cache_dir>/tokenizers/<sha256>.json`, the hash
    covering the training documents, vocab_size and the trainer settings.
    """
    if config.tokenizer:
        path = Path(config.tokenizer).expanduser()
        if path.is_file():
            return Tokenizer.from_file(str(path))
        if path.suffix == ".json" or os.sep in config.tokenizer:
            raise ValueError(f"tokenizer file {config.tokenizer!r} does not exist")
        try:
            return Tokenizer.from_pretrained(config.tokenizer)
        except Exception as err:
            raise ValueError(f"cannot load tokenizer {config.tokenizer!r} from the Hugging "
                             f"Face hub (needs a network): {err}") from err
    docs = load_documents(config, "train")
    h = _documents_fingerprint(docs)
    h.update(json.dumps({**_BPE_SETTINGS, "vocab_size": config.vocab_size}, sort_keys=True).encode())
    path = config.cache_root / "tokenizers" / f"{h.hexdigest()}.json"
    if path.exists():
        try:
            tok = Tokenizer.from_file(str(path))
            if tok.get_vocab_size() == config.vocab_size and tok.token_to_id(EOD_TOKEN) == 0:
                return tok
            warnings.warn(f"retraining the tokenizer: {path} does not match", stacklevel=2)
        except Exception as err:  # a corrupt file: retrain rather than fail
            warnings.warn(f"retraining the tokenizer: cannot read {path}: {err}", stacklevel=2)
    tok = train_tokenizer(docs, config.vocab_size)
    try:
        _atomic_write(path, lambda f: f.write(tok.to_str().encode("utf-8")))
    except OSError as err:
        warnings.warn(f"could not cache the tokenizer at {path}: {err}", stacklevel=2)
    return tok


def eod_id(tokenizer: Tokenizer, token: str = "") -> int:
    """Id of the end-of-document token: `token` (DataConfig.eod_token), or if it is "",
    the first of _EOD_CANDIDATES that the tokenizer knows.

    Raises:
      ValueError: one line naming the missing token and the `data.eod_token` setting.
    """
    if token:
        if (i := tokenizer.token_to_id(token)) is None:
            raise ValueError(f"data.eod_token {token!r} is not a token of the tokenizer; "
                             "set it to the token that ends a document")
        return i
    for candidate in _EOD_CANDIDATES:
        if (i := tokenizer.token_to_id(candidate)) is not None:
            return i
    raise ValueError(f"the tokenizer has no end-of-document token (tried "
                     f"{', '.join(_EOD_CANDIDATES)}); set data.eod_token to the token that "
                     "ends a document")


def pad_id(tokenizer: Tokenizer, eod_token: str = "") -> int:
    """Id of the pad token, or the end-of-document id when it has none (for Engram pad_id)."""
    for token in _PAD_CANDIDATES:
        if (i := tokenizer.token_to_id(token)) is not None:
            return i
    return eod_id(tokenizer, eod_token)


def _token_stream(config: DataConfig, tokenizer: Tokenizer, documents: list[str]) -> np.ndarray:
    """int32 [N]: each document's ids followed by the EOD id; cached as `.npy`."""
    end = eod_id(tokenizer, config.eod_token)  # before any work: a missing token fails here
    h = _documents_fingerprint(documents)
    h.update(tokenizer.to_str().encode("utf-8"))
    h.update(f"format={FORMAT_VERSION} eod={end}".encode())
    path = config.cache_root / "tokens" / f"{h.hexdigest()}.npy"
    if path.exists():
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
            if tokens.dtype == np.int32 and tokens.ndim == 1:
                return tokens
        except (OSError, ValueError) as err:
            warnings.warn(f"re-tokenizing: cannot read {path}: {err}", stacklevel=3)
    # A copy, so that text such as "<|endoftext|>" inside a document is encoded as text.
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.encode_special_tokens = True
    encodings = tok.encode_batch_fast(documents, add_special_tokens=False)
    sep = np.array([end], np.int32)
    tokens = np.concatenate([a for e in encodings for a in (np.asarray(e.ids, np.int32), sep)])
    try:
        _atomic_write(path, lambda f: np.save(f, tokens, allow_pickle=False))
    except OSError as err:
        warnings.warn(f"could not cache the token stream at {path}: {err}", stacklevel=3)
        return tokens
    return np.load(path, mmap_mode="r", allow_pickle=False)  # shared pages, cheap to pickle


def tokenize_split(config: DataConfig, tokenizer: Tokenizer, split: str) -> np.ndarray:
    """The split's token stream, int32 [N]: tok(d_1) EOD tok(d_2) EOD ... (cached)."""
    return _token_stream(config, tokenizer, load_documents(config, split))


def bytes_per_token(config: DataConfig, tokenizer: Tokenizer, split: str = "validation") -> float:
    """UTF-8 bytes of the split's documents per token of its stream (EOD ids counted).

    bits per byte = (mean loss per token in nats) / ln 2 / bytes_per_token.
    """
    docs = load_documents(config, split)
    num_bytes = sum(len(d.encode("utf-8", errors="surrogatepass")) for d in docs)
    return num_bytes / len(_token_stream(config, tokenizer, docs))


# ----------------------------------------------------------------------------- processes

def _from_process_0(build: Callable[[], bytes], what: str) -> bytes:
    """`build()` run on process 0 only, its bytes sent to every process.

    An error of process 0 is raised there and, as a ValueError naming `what`, on the
    others, so that no process waits for data that will not come.
    """
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return build()
    lead = jax.process_index() == 0
    payload, error = b"", None
    if lead:
        try:
            payload = build()
        except Exception as err:  # noqa: BLE001 (every process must reach the broadcasts below)
            error, payload = err, f"{type(err).__name__}: {err}".encode()
    size, failed = multihost_utils.broadcast_one_to_all(np.array([len(payload), error is not None], np.int32))
    buffer = np.frombuffer(payload, np.uint8) if lead else np.zeros(int(size), np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8).tobytes()
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"process 0 could not build the {what}: {received.decode(errors='replace')}")
    return received


def shared_tokenizer(config: DataConfig) -> Tokenizer:
    """`load_tokenizer(config)` on process 0, sent as JSON to the other processes.

    A BPE is trained once per run, not once per process, and every process holds the
    same tokenizer even where their caches (or their Hub access) differ. With one
    process this is `load_tokenizer(config)`.
    """
    import jax

    if jax.process_count() == 1:
        return load_tokenizer(config)
    text = _from_process_0(lambda: load_tokenizer(config).to_str().encode("utf-8"), "tokenizer")
    return Tokenizer.from_str(text.decode("utf-8"))  # on process 0 too: one object for all


def shared_compression(tokenizer: Tokenizer, cache_dir: str | os.PathLike) -> Compression:
    """`compress_tokenizer(tokenizer, cache_dir)` on process 0, its lookup sent to the others.

    With one process this is `compress_tokenizer(tokenizer, cache_dir)`.
    """
    import jax

    if jax.process_count() == 1:
        return compress_tokenizer(tokenizer, cache_dir)
    raw = _from_process_0(lambda: np.ascontiguousarray(compress_tokenizer(tokenizer, cache_dir).lookup, "<i8")
                          .tobytes(), "compression table")
    return Compression(np.frombuffer(raw, "<i8").astype(np.int64), tokenizer_fingerprint(tokenizer))


def _sha256(data: bytes | np.ndarray) -> bytes:
    return hashlib.sha256(data if isinstance(data, bytes) else np.ascontiguousarray(data).data).digest()


def check_same_data(config: DataConfig, tokenizer: Tokenizer, compression: Compression | None = None) -> None:
    """Checks that every process holds the same tokenizer, compression and token streams.

    Process 0 tokenizes both splits first (filling a cache that the others may share),
    then the others do; each process's sha256 of the tokenizer JSON, of the compression
    lookup and of each split's token stream is compared with process 0's. A process
    that reads another corpus (another `data.source`, another Python's stdlib) would
    otherwise train on batches that are not one consistent global batch. Nothing is
    done with one process.

    Raises:
      ValueError: naming the first process and item that differ from process 0's.
    """
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    if jax.process_index() == 0:
        streams = {split: tokenize_split(config, tokenizer, split) for split in SPLITS}
    multihost_utils.sync_global_devices("engram_jax token streams cached by process 0")
    if jax.process_index() != 0:
        streams = {split: tokenize_split(config, tokenizer, split) for split in SPLITS}
    digests = {"tokenizer": _sha256(tokenizer.to_str().encode("utf-8"))}
    if compression is not None:
        digests["compression table"] = _sha256(np.ascontiguousarray(compression.lookup, "<i8"))
    digests.update({f"{split} token stream": _sha256(tokens) for split, tokens in streams.items()})
    local = np.frombuffer(b"".join(digests.values()), np.uint8).reshape(len(digests), 32)
    every = np.asarray(multihost_utils.process_allgather(local))  # [P, items, 32]
    for process, theirs in enumerate(every[1:], 1):
        for name, lead, other in zip(digests, every[0], theirs):
            if not np.array_equal(lead, other):
                raise ValueError(f"process {process}'s {name} (sha256 {other.tobytes().hex()[:12]}) differs "
                                 f"from process 0's ({lead.tobytes().hex()[:12]}): every process must read "
                                 "the same data.source and tokenizer")


# ----------------------------------------------------------------------------- pipeline

class _Windows:
    """Random-access source of windows: item w is tokens[w T : w T + T + 1], int32.

    Consecutive windows share one token (the last target of w is the first input of
    w + 1), so no (input, target) pair falls between two windows.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.window = seq_len + 1
        self.path = tokens.filename if isinstance(tokens, np.memmap) else None

    def __len__(self) -> int:
        return max(len(self.tokens) - 1, 0) // self.seq_len

    def __getitem__(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return np.array(self.tokens[start : start + self.window], np.int32)  # [T + 1]

    def __getstate__(self) -> dict:
        # Worker processes reopen the cached file instead of receiving a copy.
        return {**self.__dict__, "tokens": None} if self.path else dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.path:
            self.tokens = np.load(self.path, mmap_mode="r", allow_pickle=False)


def document_ids(inputs: np.ndarray, eod: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and positions of packed documents (see the module docstring).

    Args:
      inputs: [B, T] token ids; each `eod` opens the next document.
      eod: the end-of-document id.

    Returns:
      (segment_ids, positions), int32 [B, T]: the number of EODs up to each token, and
      its index within its document (0 at the row's start and at each EOD).
    """
    starts = inputs == eod  # [B, T]
    segment_ids = np.cumsum(starts, axis=1, dtype=np.int32)  # [B, T]
    t = np.arange(inputs.shape[1], dtype=np.int32)
    start = np.maximum.accumulate(np.where(starts, t, 0), axis=1)  # [B, T]: latest start <= t
    return segment_ids, (t - start).astype(np.int32)


class _MakeBatch(grain.transforms.Map):
    """Windows [B, T + 1] -> {"inputs", "targets": [B, T], "hash_ids": {layer: [B, T, H]}},
    and "segment_ids", "positions" [B, T] when `eod` is given."""

    def __init__(self, hasher: NgramHasher | None, eod: int | None = None):
        self.hasher = hasher
        self.eod = eod

    def map(self, windows: np.ndarray) -> dict:
        inputs = np.ascontiguousarray(windows[:, :-1])  # [B, T]
        targets = np.ascontiguousarray(windows[:, 1:])  # [B, T]
        hash_ids = self.hasher(inputs) if self.hasher is not None else {}
        batch = {"inputs": inputs, "targets": targets, "hash_ids": hash_ids}
        if self.eod is not None:
            batch["segment_ids"], batch["positions"] = document_ids(inputs, self.eod)
        return batch


def _process_defaults(index: int | None, count: int | None) -> tuple[int, int]:
    if index is None or count is None:
        import jax  # lazily: worker processes unpickling this module need no JAX

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    return index, count


class Pipeline:
    """Batches of one split for one process, as a Grain `MapDataset`.

    Args:
      config: the data config.
      tokenizer: the tokenizer (`load_tokenizer(config)`).
      hasher: the model's `NgramHasher`, or None for a model without Engram.
      split: "train" (shuffled, repeats forever) or "validation" (in order, finite).
      process_index, process_count: this process and the count; default: JAX's.

    With `num_workers > 0` Grain starts worker processes with `spawn`: a script needs
    an `if __name__ == "__main__":` guard, and should `close()` the iterator when done.

    Attributes:
      dataset: `grain.MapDataset` of batch dicts: "inputs" and "targets" int32
        [B_local, T], "hash_ids" {layer_id: int32 [B_local, T, H]} (empty without a
        hasher), and with `config.segment_ids` "segment_ids" and "positions" int32
        [B_local, T] (`document_ids`); B_local = batch_size // process_count.
      num_windows: W = (N - 1) // T, windows of T + 1 tokens (stride T) in the split.
    """

    def __init__(self, config: DataConfig, tokenizer: Tokenizer, hasher: NgramHasher | None = None,
                 split: str = "train", *, process_index: int | None = None,
                 process_count: int | None = None):
        _check_split(split)
        index, count = _process_defaults(process_index, process_count)
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"need 0 <= process_index < process_count, got {index} of {count}")
        if config.batch_size % count:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by "
                             f"process_count {count}")
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        if hasher is not None and vocab > hasher.vocab_size:
            raise ValueError(f"the hasher covers {hasher.vocab_size} ids, the tokenizer {vocab}")
        self.config, self.split, self.hasher = config, split, hasher
        self.process_index, self.process_count = index, count
        self.local_batch_size = config.batch_size // count
        windows = _Windows(tokenize_split(config, tokenizer, split), config.seq_len)
        self.num_windows = len(windows)
        if self.num_windows == 0:
            raise ValueError(f"the {split!r} split has {len(windows.tokens)} tokens, fewer than "
                             f"one window of seq_len + 1 = {windows.window}")
        ds = grain.MapDataset.source(windows)
        if split == "train":
            ds = ds.shuffle(seed=config.seed).repeat()  # epoch k is shuffled with seed + k
        else:
            whole = self.num_windows // config.batch_size * config.batch_size
            if whole == 0:
                raise ValueError(f"the validation split has {self.num_windows} windows of "
                                 f"{windows.window} tokens, fewer than batch_size = "
                                 f"{config.batch_size}")
            ds = ds[:whole]  # every process gets the same number of batches
        ds = ds.batch(self.local_batch_size, drop_remainder=True)  # [B_local, T + 1]
        if count > 1:
            ds = ds[index::count]  # step k: rows index * B_local ... of the global batch k
        eod = eod_id(tokenizer, config.eod_token) if config.segment_ids else None
        self.dataset = ds.map(_MakeBatch(hasher, eod))

    @property
    def num_batches(self) -> int | None:
        """Batches in one pass of validation; None for the endless training stream."""
        return len(self.dataset) if self.split == "validation" else None

    def iterator(self, num_batches: int | None = None) -> grain.DatasetIterator:
        """A fresh, checkpointable Grain iterator over the first `num_batches` (or all)."""
        ds = self.dataset if num_batches is None else self.dataset[:num_batches]
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS,
                                                  prefetch_buffer_size=_PREFETCH_BATCHES))
        if self.config.num_workers > 0:
            # grain 0.2.18 reads an absl flag when starting workers and fails unless the
            # flags were parsed (google/grain#1355): mark them parsed outside absl apps.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.config.num_workers))
        return iter(it)

    def __iter__(self) -> grain.DatasetIterator:
        return self.iterator()


def checkpoint_args(iterator: grain.DatasetIterator):
    """Orbax args that save a Grain iterator's state (one JSON file per process).

    >>> manager.save(step, args=ocp.args.Composite(state=..., data=checkpoint_args(it)))
    """
    return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator: grain.DatasetIterator):
    """Orbax args that restore a saved state into `iterator` (a fresh `Pipeline.iterator()`).

    >>> manager.restore(step, args=ocp.args.Composite(data=restore_args(it)))
    """
    return grain.checkpoint.CheckpointRestore(iterator)
