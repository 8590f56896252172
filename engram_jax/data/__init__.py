"""Input data: a source streamed once into a sharded token store, read as batches.

The modules follow the data's way:

  sources.py    where documents come from (files, folders, JSONL, gzipped JSONL,
                Parquet, the Hub) and which split each belongs to;
  tokenizer.py  the tokenizer (a given one, or a BPE trained on a streamed sample);
  store.py      the token store: `prepare` (streamed, sharded, resumable), its manifest,
                `TokenStore`, `token_store` (the run's store, prepared on first use);
  pipeline.py   windows read across shards, batches, hash ids, iterator state (Grain);
  processes.py  multi-process runs: one tokenizer, compression table and store for all.

Everything a user calls is importable from `engram_jax.data`.
"""

from engram_jax.data.config import EOD_TOKEN, PAD_TOKEN, SPLITS, DataConfig
from engram_jax.data.pipeline import (Pipeline, Windows, bytes_per_token, checkpoint_args, document_ids,
                                      restore_args, tokenize_split)
from engram_jax.data.processes import check_same_data, shared_compression, shared_store, shared_tokenizer
from engram_jax.data.sources import load_documents
from engram_jax.data.store import StoreError, TokenStore, join, prepare, token_store
from engram_jax.data.tokenizer import (DEEPSEEK_EOD_TOKEN, DEEPSEEK_PAD_TOKEN, eod_id, load_tokenizer, pad_id,
                                       train_tokenizer)

__all__ = ["DEEPSEEK_EOD_TOKEN", "DEEPSEEK_PAD_TOKEN", "EOD_TOKEN", "PAD_TOKEN", "SPLITS", "DataConfig",
           "Pipeline", "StoreError", "TokenStore", "Windows", "bytes_per_token", "check_same_data",
           "checkpoint_args", "document_ids", "eod_id", "join", "load_documents", "load_tokenizer", "pad_id",
           "prepare", "restore_args", "shared_compression", "shared_store", "shared_tokenizer", "token_store",
           "tokenize_split", "train_tokenizer"]
