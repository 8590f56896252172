"""The validation split and its metrics: what training's periodic validation and
`engram-eval` both report (loss in nats/token, perplexity, bits per byte, drops).

Its own module so that `train/run.py` (training) and `train/evaluate.py` (restoring a
checkpoint, which needs the run config of `train/run.py`) do not import each other.
"""

from __future__ import annotations

import math

import jax
from tokenizers import Tokenizer

from engram_jax import data, sharding, training
from engram_jax.hashing import NgramHasher


class Validation:
    """The validation split, read once per run: its batches and its bytes per token.

    Args:
      run_config: the RunConfig (its data and eval_batches are used).
      tokenizer, hasher: the run's tokenizer and `NgramHasher` (None without Engram).
    """

    def __init__(self, run_config, tokenizer: Tokenizer, hasher: NgramHasher | None):
        self.pipeline = data.Pipeline(run_config.data, tokenizer, hasher, "validation")
        self.bytes_per_token = data.bytes_per_token(run_config.data, tokenizer, "validation")
        self.num_batches = run_config.eval_batches

    def metrics(self, evaluate, mesh) -> dict:
        """Loss (nats/token), perplexity and bits per byte over `eval_batches` batches,
        and the drops of full buckets summed over them (`val_engram_dropped/<layer>`
        token positions, `val_moe_dropped/<block>` token copies; with an expert or table
        axis above 1 a loss that includes drops depends on the mesh, so it is reported).

        Args:
          evaluate: `evaluate(batch) -> {"loss_sum", "tokens", ...}` on global batches.
          mesh: the mesh that batches are placed on.
        """
        iterator = self.pipeline.iterator(self.num_batches)
        try:  # dispatch every batch, then read the sums back once
            sums = [{k: v for k, v in out.items() if k in ("loss_sum", "tokens") or training.is_drop_counter(k)}
                    for out in (evaluate(sharding.global_batch(mesh, batch)) for batch in iterator)]
        finally:
            iterator.close()
        totals: dict[str, float] = {}
        for batch_sums in jax.device_get(sums):
            for k, v in batch_sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        loss = totals.pop("loss_sum") / totals.pop("tokens")
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)),
                "val_bits_per_byte": loss / math.log(2) / self.bytes_per_token,
                **{f"val_{k}": int(v) for k, v in totals.items()}}
