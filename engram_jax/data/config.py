"""The data config and the names every data module shares."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from engram_jax.compression import default_cache_dir
from engram_jax.config_base import Config

EOD_TOKEN = "<|endoftext|>"  # id 0 of a trained tokenizer
PAD_TOKEN = "<|pad|>"  # id 1 of a trained tokenizer
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """Where the text comes from, how it is tokenized and stored, and the batch shape.

    Attributes:
      source: "stdlib" (this interpreter's standard library .py files, without
        site-packages and test folders); a path to a file or a folder of files
        (recursive, sorted; hidden entries skipped): .jsonl, .jsonl.gz / .json.gz and
        .parquet hold one document per record, any other file that is UTF-8 text is one
        document (binaries are skipped and counted); or "hf:<name>[:<config>]" for the
        "train" split of a Hugging Face dataset, streamed (needs the optional `datasets`
        package and a network).
      text_field: field holding the text in JSONL records, Parquet rows and Hugging Face rows.
      tokenizer: "" trains a byte-level BPE on a sample of the training split (cached);
        else a tokenizer.json path or a Hugging Face hub name (online).
      vocab_size: ids of the trained BPE, special tokens included (ignored otherwise).
      tokenizer_sample_mb: MB of training text (the first, in corpus order) that the BPE
        is trained on; the whole split when it is smaller.
      eod_token: the token that ends each document in the stream; "" picks the first of
        `<|endoftext|>`, DeepSeek's `<｜end▁of▁sentence｜>`, `<|end_of_text|>`, `</s>`,
        `<eos>` that the tokenizer has.
      store: a token store prepared by `engram-prepare --out DIR` to read instead of
        `source` (its manifest says what it holds; with `tokenizer` "" its own
        tokenizer.json is used). "" prepares `source` on first use into
        `<cache_dir>/stores/<key>` and reuses it while the source is unchanged.
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
    tokenizer_sample_mb: float = 100.0
    eod_token: str = ""
    store: str = ""
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
        self.check(bool(self.tokenizer) or bool(self.store) or self.vocab_size >= 258, "vocab_size",
                   "a byte-level BPE needs >= 258 ids (256 bytes + 2 special tokens)")
        self.check(self.tokenizer_sample_mb > 0, "tokenizer_sample_mb", "must be > 0")
        self.check(self.seq_len >= 1, "seq_len", "must be >= 1")
        self.check(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.check(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        self.check(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32) (Grain's shuffle)")
        self.check(self.num_workers >= 0, "num_workers", "must be >= 0")

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
