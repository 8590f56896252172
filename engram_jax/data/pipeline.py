"""Batches from a token store: windows of T + 1 tokens -> inputs, targets, Engram hash ids.

A split's token stream s = tok(d_1) e tok(d_2) e ... (e the end-of-document id) is its
store shards back to back. Window w (0 <= w < W = (|s| - 1) // T) is s[w T : w T + T + 1],
read by global index across shard boundaries with positioned reads of the shard files
(`Windows`), so a process reads only the bytes its batches need. Windows overlap by one token, so every pair
(s[i], s[i + 1]) up to the last whole window is one (input, target) pair of exactly one
window; the tail is dropped. For window x of T + 1 tokens:

    inputs  = x[0 : T],   targets = x[1 : T + 1],   hash_ids = NgramHasher(inputs)

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

Why not Grain's packing (`ConcatThenSplitIterDataset`): it is an `IterDataset`, after
which only a windowed shuffle is possible and resuming replays the packer; packing a
stored stream by index gives a global shuffle and an exact, O(1) checkpoint.
"""

from __future__ import annotations

import bisect
import os

import grain
import numpy as np
from absl import flags
from tokenizers import Tokenizer

from engram_jax.data.config import DataConfig, check_split
from engram_jax.data.store import TokenStore, token_store
from engram_jax.data.tokenizer import eod_id
from engram_jax.hashing import NgramHasher

# Threads and buffered batches per process for slicing + hashing. Measured on 2 cores
# (2 Engram layers, H = 16): batches/s for 0/1/2 threads were 700/600/500 at 16 x 256 and
# 135/125/105 at 64 x 1024; one thread keeps most of the speed and overlaps the hashing
# with the training step, more threads contend for the GIL. A small buffer bounds host
# memory, since one batch of hash ids can take hundreds of MB.
_READ_THREADS = 1
_PREFETCH_BATCHES = 4


class Windows:
    """Random-access source of windows of one split: item w is s[w T : w T + T + 1], int32 [T + 1].

    Consecutive windows share one token (the last target of w is the first input of
    w + 1), so no (input, target) pair falls between two windows. A window is read from
    its shard file(s) with one positioned read each (`os.pread`), so a process reads only
    the bytes of its windows and holds none of the store: memory-mapping the shards was
    measured to add tens of MB of mapped page cache to the RSS of a start on a 318 MB
    corpus (a page fault maps a whole large folio of the cached file), growing with the
    store. Files are opened lazily, once per process (a pickled copy, in a Grain worker,
    opens its own).
    """

    def __init__(self, store: TokenStore, split: str, seq_len: int):
        shards = store.shards(split)
        self.folder, self.dtype = str(store.path), store.dtype.str
        self.itemsize = store.dtype.itemsize
        self.names = [s["name"] for s in shards]
        self.ends = np.cumsum([s["tokens"] for s in shards], dtype=np.int64)  # [shards]
        self._ends = self.ends.tolist()  # bisect on a list is faster than searchsorted here
        self.num_tokens = int(self.ends[-1]) if len(self.ends) else 0
        self.seq_len, self.window = seq_len, seq_len + 1
        self._files: dict[int, int] = {}

    def _read(self, shard: int, start: int, count: int) -> np.ndarray:
        """`count` ids of `shard` from `start`."""
        if shard not in self._files:
            self._files[shard] = os.open(f"{self.folder}/{self.names[shard]}.tokens", os.O_RDONLY)
        raw = os.pread(self._files[shard], count * self.itemsize, start * self.itemsize)
        return np.frombuffer(raw, np.dtype(self.dtype))

    def __len__(self) -> int:
        return max(self.num_tokens - 1, 0) // self.seq_len

    def __getitem__(self, index: int) -> np.ndarray:
        start = int(index) * self.seq_len
        i = bisect.bisect_right(self._ends, start)
        base = self._ends[i - 1] if i else 0
        if start + self.window <= self._ends[i]:  # within one shard
            return self._read(i, start - base, self.window).astype(np.int32)
        out = np.empty(self.window, np.int32)
        filled = 0
        while filled < self.window:  # across one (or, for tiny shards, more) shard ends
            piece = self._read(i, start + filled - base, min(self.window - filled, self._ends[i] - start - filled))
            out[filled: filled + len(piece)] = piece
            filled += len(piece)
            base = self._ends[i]
            i += 1
        return out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


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
      store: the token store to read; default `token_store(config, tokenizer)` (the
        source prepared on first use).

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
                 process_count: int | None = None, store: TokenStore | None = None):
        check_split(split)
        index, count = _process_defaults(process_index, process_count)
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"need 0 <= process_index < process_count, got {index} of {count}")
        if config.batch_size % count:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by "
                             f"process_count {count}")
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        if hasher is not None and vocab > hasher.vocab_size:
            raise ValueError(f"the hasher covers {hasher.vocab_size} ids, the tokenizer {vocab}")
        eod = eod_id(tokenizer, config.eod_token)  # before any work: a missing token fails here
        store = store if store is not None else token_store(config, tokenizer)
        if store.eod != eod:
            raise ValueError(f"the token store {store.path} ends documents with id {store.eod}, this run with "
                             f"{eod} (data.eod_token); prepare the source again with this setting")
        self.config, self.split, self.hasher, self.store = config, split, hasher, store
        self.process_index, self.process_count = index, count
        self.local_batch_size = config.batch_size // count
        windows = Windows(store, split, config.seq_len)
        self.num_windows = len(windows)
        if self.num_windows == 0:
            raise ValueError(f"the {split!r} split has {windows.num_tokens} tokens, fewer than "
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
        self.dataset = ds.map(_MakeBatch(hasher, eod if config.segment_ids else None))

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


def tokenize_split(config: DataConfig, tokenizer: Tokenizer, split: str, limit: int | None = None) -> np.ndarray:
    """The split's token stream, int32 [N]: tok(d_1) EOD tok(d_2) EOD ..., or its first
    `limit` ids (from the store, prepared on first use; in memory)."""
    return token_store(config, tokenizer).tokens(split, limit)


def bytes_per_token(config: DataConfig, tokenizer: Tokenizer, split: str = "validation") -> float:
    """UTF-8 bytes of the split's documents per token of its stream (EOD ids counted),
    from the store's manifest.

    bits per byte = (mean loss per token in nats) / ln 2 / bytes_per_token.
    """
    return token_store(config, tokenizer).bytes_per_token(split)


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
