"""engram-jax checkpoints as an lm-evaluation-harness model (`pip install -e ".[eval]"`).

    engram-eval --checkpoint runs/tiny --tasks lambada_openai,hellaswag --limit 100
    engram-eval --checkpoint runs/tiny --tasks my_task --include-path my_tasks/ --num-fewshot 5
    engram-eval --checkpoint runs/tiny --tasks my_task --include-path my_tasks/ --engram-off

or from Python, with `lm_eval.simple_evaluate(model=EngramLM(checkpoint="runs/tiny"), ...)`;
importing this module also registers the model as "engram-jax" in lm-eval's registry
(`simple_evaluate(model="engram-jax", model_args="checkpoint=runs/tiny")`). lm-eval 0.4.13
has no plugin discovery, so its own `lm_eval` command does not see the model.

Scoring follows lm-eval's Hugging Face model: a context and its continuation are
tokenized together and split where the context's own tokens end (a context's trailing
space moves to the continuation); every sequence starts with the end-of-document id, as
documents do in training (position 0, one document). Sequences longer than
`max_length` keep their last `max_length` tokens. Requests are sorted by length and run
in batches of `batch_size` rows (short batches padded with empty rows), each row padded
on the right to the next power of two (at least 16, at most `max_length`): the model is
causal (attention, Engram's n-grams and conv look back only), so padding changes no
score, and one jitted function compiles once per bucket. `generate_until` runs the
KV-cached decoding engine (`engram_jax.Decoder`).
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from engram_jax import training
from engram_jax.model import Model

# The shortest length bucket: shorter rows would compile more programs for little gain.
MIN_BUCKET = 16
# New tokens of a generation request that does not say (lm-eval's Hugging Face model's default).
MAX_GEN_TOKS = 256


def bucket(length: int, max_length: int) -> int:
    """The padded length of a row of `length` tokens: a power of two >= MIN_BUCKET, or max_length."""
    return min(max_length, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


@register_model("engram-jax")
class EngramLM(LM):
    """lm-eval's `LM` over a restored engram-jax checkpoint.

    Args:
      checkpoint: a run folder, its checkpoints folder or a step folder (or pass `trained`).
      step: which step (default: the latest).
      trained: an already restored `train.evaluate.Trained` (shared by several models).
      batch_size: rows per batch.
      max_length: the longest sequence scored at once (default: the run's `data.seq_len`,
        the context it was trained on).
      engram_off: Engram layer ids whose output is zeroed (`Model.engram_off`); "all"
        or a comma-separated string are accepted too, as from `model_args`.
    """

    def __init__(self, checkpoint: str | None = None, step: int | None = None, trained=None,
                 batch_size: int = 8, max_length: int | None = None,
                 engram_off: Sequence[int] | str = ()):
        super().__init__()
        from train import engram_off as engram_off_lib
        from train.evaluate import Trained

        if trained is None:
            if checkpoint is None:
                raise ValueError("EngramLM needs a checkpoint (or a restored Trained)")
            trained = Trained(checkpoint, None if step is None else int(step))
        self.trained = trained
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or trained.config.data.seq_len)
        if isinstance(engram_off, str):
            engram_off = (() if not engram_off else
                          engram_off_lib.engram_off_layers(trained.config.model,
                                                           engram_off_lib.parse_layers(engram_off)))
        elif engram_off:
            engram_off = engram_off_lib.engram_off_layers(trained.config.model, engram_off)
        self.engram_off = tuple(engram_off)
        self.eod = trained.encode("")[0]
        self.shapes: set[tuple[int, int]] = set()  # the [B, T] buckets run so far

    @functools.cached_property
    def _log_probs(self):
        """Jitted: tokens, targets [B, T] and hash ids -> the targets' log-probabilities [B, T]
        and whether each is the argmax [B, T]."""
        trained, model = self.trained, Model(self.trained.config.model, engram_off=self.engram_off)

        def run(tokens, targets, hash_ids):
            chex.assert_equal_shape([tokens, targets])
            memory, _ = training.lookup(trained.tables, trained.rows, {"hash_ids": hash_ids})
            logits = model.apply(trained.variables, tokens, memory)  # [B, T, V]
            log_probs = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, T]
            return picked, jnp.argmax(logits, axis=-1) == targets

        return jax.jit(run)

    # ---------------------------------------------------------------- scoring
    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Summed log-probability of each continuation given its context, and whether
        every continuation token is the greedy choice.

        Args:
          pairs: (context ids, continuation ids); the context is not empty (it holds at
            least the end-of-document id), the continuation not either.
        """
        rows = []  # (index, inputs, targets, scored)
        for index, (context, continuation) in enumerate(pairs):
            if not context or not continuation:
                raise ValueError("EngramLM.score needs a context and a continuation of at least one token")
            whole = (context + continuation)[-(self.max_length + 1):]
            scored = min(len(continuation), len(whole) - 1)
            rows.append((index, whole[:-1], whole[1:], scored))
        rows.sort(key=lambda r: -len(r[1]))  # longest first: batches of similar lengths
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start: start + self.batch_size]
            t = bucket(max(len(r[1]) for r in batch), self.max_length)
            tokens = np.full((self.batch_size, t), self.eod, np.int32)  # [B, T]
            targets = np.zeros((self.batch_size, t), np.int32)  # [B, T]
            for i, (_, inputs, target, _) in enumerate(batch):
                tokens[i, : len(inputs)] = inputs
                targets[i, : len(target)] = target
            hash_ids = self.trained.hasher(tokens) if self.trained.hasher is not None else {}
            self.shapes.add(tokens.shape)
            picked, greedy = jax.device_get(self._log_probs(tokens, targets, hash_ids))
            for i, (index, inputs, _, scored) in enumerate(batch):
                end = len(inputs)
                results[index] = (float(np.sum(picked[i, end - scored: end], dtype=np.float64)),
                                  bool(np.all(greedy[i, end - scored: end])))
        return results

    def _encode(self, text: str) -> list[int]:
        return self.trained.tokenizer.encode(text).ids

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, split as lm-eval's Hugging Face model does."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        context_ids = self._encode(context)
        return [self.eod] + whole[: len(context_ids)], whole[len(context_ids):]

    # ---------------------------------------------------------------- the LM interface
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._pair(*request.args) for request in requests]
        results = self.score(pairs)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each text's summed log-probability, in disjoint windows of up to `max_length`
        predicted tokens, each after as much preceding text as fits (lm-eval's
        `get_rolling_token_windows`); the first token follows the end-of-document id."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args[:1]
            for window in lm_utils.get_rolling_token_windows(self._encode(text), self.eod, self.max_length, 1):
                windows.append(lm_utils.make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self.score(windows)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    @functools.cached_property
    def decoder(self):
        """The KV-cached decoding engine (`engram_jax.Decoder`) with this model's Engram switches."""
        from engram_jax.decode import Decoder

        t = self.trained
        return Decoder(t.config.model, t.variables, t.tables, t.rows, t.hasher, self.eod,
                       getattr(t, "hot_rows", None), engram_off=self.engram_off)

    def generate_until(self, requests) -> list[str]:
        """Continuations by the decoding engine, `batch_size` contexts at a time: greedy
        unless a request sets `do_sample` with a temperature above 0, at most `max_gen_toks`
        (default MAX_GEN_TOKS) new tokens, stopped at the end-of-document id, and the text
        cut before the first of the request's `until` strings (applied to the text after
        generation, as lm-eval's Hugging Face model does). A context keeps its last
        `max_length - max_gen_toks` tokens (at least one). `generated_ids` keeps each
        request's new ids."""
        from engram_jax.decode import SamplingConfig

        jobs = []  # (index, prompt ids, max_new, temperature, until)
        for index, request in enumerate(requests):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", MAX_GEN_TOKS))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            prompt = [self.eod] + self._encode(context)
            jobs.append((index, prompt[-max(1, self.max_length - max_new):], max_new, temperature, until))
        texts: list[str | None] = [None] * len(jobs)
        self.generated_ids: list[list[int] | None] = [None] * len(jobs)
        groups: dict[tuple[int, float], list] = {}  # one max_gen_toks and temperature per batch
        for job in sorted(jobs, key=lambda j: -len(j[1])):  # similar lengths together
            groups.setdefault((job[2], job[3]), []).append(job)
        for (max_new, temperature), group in groups.items():
            for start in range(0, len(group), self.batch_size):
                batch = group[start: start + self.batch_size]
                out = self.decoder.generate([j[1] for j in batch], max_new, SamplingConfig(temperature=temperature))
                for (index, _, _, _, until), ids in zip(batch, out.tokens):
                    text = self.trained.tokenizer.decode(ids)
                    cut = min((text.find(s) for s in until if s and s in text), default=len(text))
                    texts[index], self.generated_ids[index] = text[:cut], list(ids)
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts


# ---------------------------------------------------------------- running tasks
@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None = None):
    """lm-eval's TaskManager (its built-in tasks and those under `include_path`), made
    once per process: it indexes some 15,000 task files (about 10 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_tasks(tasks: Sequence[str], include_path: str | None = None) -> list[str]:
    """The task names, each known to lm-eval (a task, group or tag; globs allowed).

    Raises:
      ValueError: a name lm-eval does not know.
    """
    manager = task_manager(include_path)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not manager.match_tasks([t])]
    if unknown:
        where = f" nor under --include-path {include_path}" if include_path else ""
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: not among lm-eval's tasks{where} "
                         "(`lm_eval ls tasks` lists them)")
    return list(tasks)


def evaluate(model: EngramLM, tasks: Sequence[str], *, limit: float | None = None,
             num_fewshot: int | None = None, include_path: str | None = None) -> dict:
    """`lm_eval.simple_evaluate` of `model` on `tasks`: its results, per task metrics,
    `higher_is_better`, `n-shot`, `versions` and the task configs (no per-sample logs)."""
    import lm_eval

    out = lm_eval.simple_evaluate(model=model, tasks=check_tasks(tasks, include_path), limit=limit,
                                  num_fewshot=num_fewshot, task_manager=task_manager(include_path),
                                  log_samples=False, bootstrap_iters=1000)
    return {k: out[k] for k in ("results", "higher_is_better", "n-shot", "versions", "configs") if k in out}


def scores(results: dict) -> list[tuple[str, str, float, float | None, bool]]:
    """(task, metric, value, stderr, higher is better) of every numeric metric."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            better = results.get("higher_is_better", {}).get(task, {}).get(metric, True)
            rows.append((task, metric, float(value), stderr if isinstance(stderr, (int, float)) else None,
                         bool(better)))
    return rows


def format_scores(results: dict) -> str:
    rows = scores(results)
    width = max([len(r[0]) for r in rows] + [4])
    lines = [f"{'task':<{width}}  {'metric':<16}  {'value':>9}  {'stderr':>8}"]
    for task, metric, value, stderr, _ in rows:
        err = f"{stderr:8.4f}" if stderr is not None else f"{'':>8}"
        lines.append(f"{task:<{width}}  {metric:<16}  {value:9.4f}  {err}")
    return "\n".join(lines)


def write_results(path: pathlib.Path, payload: dict) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=lm_utils.handle_non_serializable) + "\n")
    return path
