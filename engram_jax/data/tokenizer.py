"""The tokenizer: a given one, or a byte-level BPE trained on a sample of the training split."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engram_jax.data import sources
from engram_jax.data.config import EOD_TOKEN, PAD_TOKEN, DataConfig

log = logging.getLogger(__name__)

# DeepSeek-V3's (the paper presets' tokenizer) end of document and pad, ids 1 and 2 of its
# tokenizer.json. The bars are U+FF5C (fullwidth) and the spaces U+2581, not ASCII.
DEEPSEEK_EOD_TOKEN = "<\uff5cend\u2581of\u2581sentence\uff5c>"
DEEPSEEK_PAD_TOKEN = "<\uff5c\u2581pad\u2581\uff5c>"
# End-of-document tokens of common hub tokenizers (GPT-2/Qwen, DeepSeek-V3, Llama 3,
# Llama 2/T5, Gemma), tried in this order when DataConfig.eod_token is "".
EOD_CANDIDATES = (EOD_TOKEN, DEEPSEEK_EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
PAD_CANDIDATES = (PAD_TOKEN, DEEPSEEK_PAD_TOKEN, "<pad>", "[PAD]")
# Bump when the trainer changes, so older cached tokenizers are not trusted.
FORMAT_VERSION = 2
BPE_SETTINGS = {"model": "bpe", "pre_tokenizer": "byte_level", "add_prefix_space": False,
                "special_tokens": [EOD_TOKEN, PAD_TOKEN], "min_frequency": 0, "format_version": FORMAT_VERSION}
STORE_TOKENIZER = "tokenizer.json"  # a store's copy of its tokenizer


def atomic_write(path: Path, write) -> None:
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


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE with EOD_TOKEN at id 0 and PAD_TOKEN at id 1.

    Args:
      texts: an iterable of strings (streamed: a generator is read once).
      vocab_size: ids, special tokens included.

    Raises:
      ValueError: the texts hold too few distinct pairs for `vocab_size` ids.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=BPE_SETTINGS["min_frequency"],
        special_tokens=BPE_SETTINGS["special_tokens"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"the corpus yields only {tok.get_vocab_size()} BPE ids, not "
                         f"vocab_size={vocab_size}; use a smaller vocab_size or more text")
    return tok


def bpe_key(config: DataConfig, plan: sources.Plan) -> str:
    """Names a trained BPE: the source (cheap fingerprint), sample size, vocab and trainer."""
    key = {"source": plan.description, "fingerprint": plan.fingerprint, "vocab_size": config.vocab_size,
           "sample_mb": config.tokenizer_sample_mb, **BPE_SETTINGS}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def load_tokenizer(config: DataConfig) -> Tokenizer:
    """The run's tokenizer.

    `data.tokenizer` when given (a tokenizer.json path or a hub name); else, with
    `data.store`, the store's own tokenizer.json; else the BPE trained on the first
    `tokenizer_sample_mb` MB of the training split, streamed to the trainer and cached as
    `<cache_dir>/tokenizers/<key>.json` (`bpe_key`).
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
    if config.store:
        path = Path(config.store).expanduser() / STORE_TOKENIZER
        if not path.is_file():
            raise ValueError(f"the token store {config.store!r} has no {STORE_TOKENIZER}; "
                             "set data.tokenizer to the tokenizer it was prepared with")
        return Tokenizer.from_file(str(path))
    plan = sources.plan(config)
    path = config.cache_root / "tokenizers" / f"{bpe_key(config, plan)}.json"
    if path.exists():
        try:
            tok = Tokenizer.from_file(str(path))
            if tok.get_vocab_size() == config.vocab_size and tok.token_to_id(EOD_TOKEN) == 0:
                return tok
            warnings.warn(f"retraining the tokenizer: {path} does not match", stacklevel=2)
        except Exception as err:  # a corrupt file: retrain rather than fail
            warnings.warn(f"retraining the tokenizer: cannot read {path}: {err}", stacklevel=2)
    limit = int(config.tokenizer_sample_mb * 2**20)
    log.info("training a %d-id BPE on up to %.0f MB of the training split of %s", config.vocab_size,
             config.tokenizer_sample_mb, config.source)
    tok = train_tokenizer(sources.first_documents(config, plan, "train", limit), config.vocab_size)
    try:
        atomic_write(path, lambda f: f.write(tok.to_str().encode("utf-8")))
    except OSError as err:
        warnings.warn(f"could not cache the tokenizer at {path}: {err}", stacklevel=2)
    return tok


def eod_id(tokenizer: Tokenizer, token: str = "") -> int:
    """Id of the end-of-document token: `token` (DataConfig.eod_token), or if it is "",
    the first of EOD_CANDIDATES that the tokenizer knows.

    Raises:
      ValueError: one line naming the missing token and the `data.eod_token` setting.
    """
    if token:
        if (i := tokenizer.token_to_id(token)) is None:
            raise ValueError(f"data.eod_token {token!r} is not a token of the tokenizer; "
                             "set it to the token that ends a document")
        return i
    for candidate in EOD_CANDIDATES:
        if (i := tokenizer.token_to_id(candidate)) is not None:
            return i
    raise ValueError(f"the tokenizer has no end-of-document token (tried "
                     f"{', '.join(EOD_CANDIDATES)}); set data.eod_token to the token that "
                     "ends a document")


def pad_id(tokenizer: Tokenizer, eod_token: str = "") -> int:
    """Id of the pad token, or the end-of-document id when it has none (for Engram pad_id)."""
    for token in PAD_CANDIDATES:
        if (i := tokenizer.token_to_id(token)) is not None:
            return i
    return eod_id(tokenizer, eod_token)


def encoder(tokenizer: Tokenizer) -> Tokenizer:
    """A copy that encodes special-token text inside documents ("<|endoftext|>") as text."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.encode_special_tokens = True
    return tok
