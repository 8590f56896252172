"""Multi-process runs: one tokenizer, one compression table and one token store for all.

Process 0 builds each (trains the BPE, prepares the store) and the others receive the
tokenizer and compression table as bytes and open process 0's store by its path: a store
on a file system every host mounts (NFS, Filestore, a gcsfuse bucket) serves them all and
nothing is tokenized twice. `check_same_data` then compares what each process holds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import numpy as np
from tokenizers import Tokenizer

from engram_jax.compression import Compression, compress_tokenizer, tokenizer_fingerprint
from engram_jax.data import store as store_lib
from engram_jax.data.config import DataConfig
from engram_jax.data.tokenizer import load_tokenizer


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


def shared_store(config: DataConfig, tokenizer: Tokenizer) -> store_lib.TokenStore:
    """The run's token store: found or prepared by process 0, opened by path on the others.

    Raises:
      ValueError: process 0 could not prepare it, or another process cannot read it
        (naming the path: it must be on a file system every host shares).
    """
    import jax

    if jax.process_count() == 1:
        return store_lib.token_store(config, tokenizer)
    path = _from_process_0(lambda: str(store_lib.token_store(config, tokenizer).path).encode(), "token store")
    path = path.decode()
    try:
        opened = store_lib.TokenStore.open(path, tokenizer=tokenizer)
    except (OSError, ValueError) as err:
        raise ValueError(f"process {jax.process_index()} cannot read the token store that process 0 prepared "
                         f"({err}); put data.cache_dir or data.store on a file system every host shares") from None
    store_lib.remember(config, tokenizer, opened)
    return opened


def _sha256(data: bytes | np.ndarray) -> bytes:
    return hashlib.sha256(data if isinstance(data, bytes) else np.ascontiguousarray(data).data).digest()


def check_same_data(config: DataConfig, tokenizer: Tokenizer, compression: Compression | None = None) -> None:
    """Opens the run's store on every process (`shared_store`) and checks that every
    process holds the same tokenizer, compression table, data settings and store.

    A process with another `data.source`, `text_field`, `val_fraction`, `eod_token` or
    `store` would otherwise expect data it does not get. The store is compared by the
    sha256 of its manifest, which holds every shard's sha256; no text is read or
    tokenized. Nothing is done with one process.

    Raises:
      ValueError: naming the first process and item that differ from process 0's.
    """
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    opened = shared_store(config, tokenizer)
    settings = {k: getattr(config, k) for k in ("source", "text_field", "val_fraction", "eod_token", "store")}
    digests = {"tokenizer": _sha256(tokenizer.to_str().encode("utf-8")),
               "data settings": _sha256(json.dumps(settings, sort_keys=True).encode())}
    if compression is not None:
        digests["compression table"] = _sha256(np.ascontiguousarray(compression.lookup, "<i8"))
    digests["token store manifest"] = bytes.fromhex(opened.digest)
    local = np.frombuffer(b"".join(digests.values()), np.uint8).reshape(len(digests), 32)
    every = np.asarray(multihost_utils.process_allgather(local))  # [P, items, 32]
    for process, theirs in enumerate(every[1:], 1):
        for name, lead, other in zip(digests, every[0], theirs):
            if not np.array_equal(lead, other):
                raise ValueError(f"process {process}'s {name} (sha256 {other.tobytes().hex()[:12]}) differs "
                                 f"from process 0's ({lead.tobytes().hex()[:12]}): every process must read "
                                 "the same data.source and tokenizer")
