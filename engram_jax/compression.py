"""Tokenizer compression (paper section 2.2; reference section 1).

Subword tokenizers give different ids to tokens that mean the same to an n-gram memory:
"Apple", " apple" and "APPLE", or "café" and "cafe". Before hashing, Engram maps raw ids
through a surjection P: [0, V) -> [0, V') that merges tokens whose decoded text is equal
after normalization; the paper reports about 23% fewer ids on a 128k vocabulary.

P depends only on the tokenizer, so `compress_tokenizer` caches it on disk (`.npy` and
`.json`, never pickle), keyed by the sha256 of the tokenizer's JSON: training reloads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers

from engram_jax.hashing import checked_lookup

# Bump when the file layout or the compression rule changes: older cache entries then
# fail to load and are rebuilt instead of being trusted.
FORMAT_VERSION = 1
CACHE_ENV_VAR = "ENGRAM_JAX_CACHE"

TokenizerLike = Tokenizer | str | os.PathLike

# The Hugging Face normalizers, as in DeepSeek's demo, so Unicode tables agree exactly.
_COLLAPSE_STEPS = [normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(),
                   normalizers.Lowercase(), normalizers.Replace(Regex(r"[ \t\r\n]+"), " ")]
_COLLAPSE = normalizers.Sequence(_COLLAPSE_STEPS)
_NORMALIZE = normalizers.Sequence([*_COLLAPSE_STEPS, normalizers.Strip()])


def normalize_token_text(text: str) -> str:
    """Normalizes decoded token text (reference section 1).

    Args:
        text: the decoded text of one token.

    Returns:
        The text after NFKC, NFD, accent stripping, lowercasing, collapsing each run of
        [ \\t\\r\\n] into one space and stripping; a text that collapses to exactly one
        space stays one space.
    """
    out = _NORMALIZE.normalize_str(text)
    # Strip would erase a lone space, yet a space is a token of its own in the paper.
    # Only an empty result can hide one, so the second pass is rarely needed.
    if not out and _COLLAPSE.normalize_str(text) == " ":
        return " "
    return out


def _as_tokenizer(tokenizer: TokenizerLike) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return Tokenizer.from_file(os.fspath(tokenizer))
    raise TypeError(f"expected a Tokenizer or a tokenizer.json path, got {type(tokenizer)!r}")


def tokenizer_fingerprint(tokenizer: TokenizerLike) -> str:
    """Returns the sha256 hex digest of the tokenizer's JSON serialization."""
    return hashlib.sha256(_as_tokenizer(tokenizer).to_str().encode("utf-8")).hexdigest()


def build_lookup(tokenizer: TokenizerLike) -> np.ndarray:
    """Builds the compression lookup P of a tokenizer.

    Args:
        tokenizer: a `tokenizers.Tokenizer`, or the path of a tokenizer.json file.

    Returns:
        int64 [V], V counting added tokens: the compressed id of each raw id, numbered
        in order of first appearance of each key.
    """
    tok = _as_tokenizer(tokenizer)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    # One batch call decodes in Rust. Normalizing stays one call per token: joining
    # texts would let NFKC compose a combining mark with the previous token's text.
    texts = tok.decode_batch([[t] for t in range(vocab_size)], skip_special_tokens=False)
    key_ids: dict[str, int] = {}
    lookup = []
    for t, text in enumerate(texts):
        # A partial UTF-8 byte decodes to U+FFFD: its text says nothing, its token does.
        key = tok.id_to_token(t) if "\ufffd" in text else (normalize_token_text(text) or text)
        lookup.append(key_ids.setdefault(key, len(key_ids)))
    return np.array(lookup, dtype=np.int64)


def _sha256_of(lookup: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(lookup, dtype="<i8").tobytes()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    # A reader (or a crash) never sees a half-written file: write aside, then rename.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache must be readable
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # a no-op once the rename is done


@dataclasses.dataclass(frozen=True, eq=False)
class Compression:
    """A tokenizer compression P: raw id -> compressed id.

    Attributes:
        lookup: int64 [V], read-only; lookup[t] is the compressed id of raw id t.
        fingerprint: sha256 hex of the tokenizer JSON it was built from (of the lookup
            bytes for an explicit array).
    """

    lookup: np.ndarray = dataclasses.field(repr=False)
    fingerprint: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "lookup", checked_lookup(self.lookup))

    @property
    def vocab_size(self) -> int:
        """V, the number of raw ids."""
        return int(self.lookup.shape[0])

    @property
    def num_compressed(self) -> int:
        """V', the number of compressed ids."""
        return int(self.lookup.max()) + 1

    @property
    def ratio(self) -> float:
        """Fraction of ids removed, 1 - V'/V (the paper reports about 0.23)."""
        return 1.0 - self.num_compressed / self.vocab_size

    @classmethod
    def from_lookup(cls, lookup: np.ndarray) -> Compression:
        """Wraps an explicit integer [V] lookup; raises ValueError if it is not one."""
        return cls(lookup, _sha256_of(checked_lookup(lookup)))

    @classmethod
    def identity(cls, vocab_size: int) -> Compression:
        """No compression (P = identity), for the ablation."""
        return cls.from_lookup(np.arange(vocab_size, dtype=np.int64))

    def _metadata(self) -> dict[str, int | str]:
        return {"format_version": FORMAT_VERSION, "vocab_size": self.vocab_size,
                "num_compressed": self.num_compressed, "fingerprint": self.fingerprint,
                "lookup_sha256": _sha256_of(self.lookup)}

    def save(self, path: str | os.PathLike) -> None:
        """Writes `<path>.npy` and `<path>.json`, each atomically."""
        stem, array = os.fspath(path), io.BytesIO()
        np.save(array, self.lookup, allow_pickle=False)
        _atomic_write(Path(f"{stem}.npy"), array.getvalue())
        _atomic_write(Path(f"{stem}.json"), json.dumps(self._metadata(), indent=1).encode())

    @classmethod
    def load(cls, path: str | os.PathLike, expected_fingerprint: str | None = None) -> Compression:
        """Loads what `save` wrote, checking the JSON against the array.

        Raises:
            ValueError: naming the problem: a missing or unreadable file, a lookup that
                is not int64 [V], a disagreement between the files (V, V', checksum,
                format version), or a fingerprint other than `expected_fingerprint`.
        """
        stem = os.fspath(path)
        try:
            meta = json.loads(Path(f"{stem}.json").read_text(encoding="utf-8"))
            lookup = np.load(f"{stem}.npy", allow_pickle=False)
        except FileNotFoundError as err:
            raise ValueError(f"missing compression file {err.filename}") from err
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"cannot read compression files {stem}.npy/.json: {err}") from err
        if not isinstance(meta, dict):
            raise ValueError(f"{stem}.json does not hold a JSON object")
        dtype, shape = getattr(lookup, "dtype", type(lookup)), getattr(lookup, "shape", None)
        if dtype != np.int64 or len(shape or ()) != 1:
            raise ValueError(f"{stem}.npy must hold an int64 [V] array, found {dtype} {shape}")
        loaded = cls(lookup, str(meta.get("fingerprint")))  # rejects negative ids
        for name, actual in loaded._metadata().items():
            if meta.get(name) != actual:
                raise ValueError(f"{stem}.json: {name} is {meta.get(name)!r}, not {actual!r}")
        if expected_fingerprint is not None and loaded.fingerprint != expected_fingerprint:
            raise ValueError(f"{stem}: fingerprint is not the expected {expected_fingerprint}")
        return loaded


def default_cache_dir() -> Path:
    """`$ENGRAM_JAX_CACHE` if set, else `~/.cache/engram_jax`."""
    return Path(os.environ.get(CACHE_ENV_VAR) or "~/.cache/engram_jax").expanduser()


def compress_tokenizer(
    tokenizer: TokenizerLike, cache_dir: str | os.PathLike | None = None
) -> Compression:
    """Returns the compression of a tokenizer, built once and then reloaded from cache.

    Args:
        tokenizer: a `tokenizers.Tokenizer`, or the path of a tokenizer.json file.
        cache_dir: holds `compression/<fingerprint>.npy/.json`; defaults to
            `default_cache_dir()`.

    Returns:
        The `Compression`, fingerprinted by the tokenizer. A corrupt cache entry is
        rebuilt with a warning; a cache that cannot be written only warns.
    """
    tok = _as_tokenizer(tokenizer)
    fingerprint = tokenizer_fingerprint(tok)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = root / "compression" / fingerprint
    if Path(f"{stem}.npy").exists() or Path(f"{stem}.json").exists():
        try:
            return Compression.load(stem, expected_fingerprint=fingerprint)
        except ValueError as err:
            warnings.warn(f"rebuilding corrupt compression cache entry: {err}", stacklevel=2)
    compression = Compression(build_lookup(tok), fingerprint)
    try:
        compression.save(stem)
    except OSError as err:
        warnings.warn(f"could not cache the compression at {stem}: {err}", stacklevel=2)
    return compression
