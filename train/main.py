"""Command lines: `engram-train` (also `python -m train`), `engram-eval` and `engram-prepare`."""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

from engram_jax import configs
from engram_jax.checkpoint import CheckpointError
from engram_jax.config_base import ConfigError
from train.workdir_lock import WorkdirInUse

# Bad input (and failed saves, a folder in use) that deserve one clear line, not a traceback.
USER_ERRORS = (ConfigError, CheckpointError, KeyError, ValueError, FileNotFoundError, WorkdirInUse)


def _fail(program: str, err: BaseException) -> int:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    print(f"{program}: error: {message}", file=sys.stderr)
    return 2


_OOM_ADVICE = ("out of memory ({detail}); check what fits with --dry-run, or use less memory: a smaller "
               "--set data.batch_size=N, or recompute activations with --set model.remat=full (or save_dots)")


def _out_of_memory(err: BaseException) -> bool:
    """Whether `err` is XLA running out of device memory (its RESOURCE_EXHAUSTED status)."""
    import jax

    return isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err)


def _first_line(err: BaseException, limit: int = 160) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _setup_logging() -> None:
    """Our INFO lines on stderr from process 0; libraries' chatter at WARNING."""
    import jax

    logger = logging.getLogger("engram_jax")
    if not logger.handlers:  # JAX/absl may already have configured the root logger
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    for noisy in ("absl", "jax", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _initialize_distributed(**cluster) -> None:
    """`jax.distributed.initialize` with the given settings (None: JAX detects or reads them).

    CPU processes exchange collectives through gloo: JAX's default here (0.10), set
    for versions whose default is none; it must be chosen before the backend starts.
    """
    import jax

    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**cluster)


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engram-train", description="Train an Engram language model.")
    parser.add_argument("--config", default="tiny", help=f"a preset: {', '.join(configs.names())}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optim.learning_rate=1e-3 (repeatable)")
    parser.add_argument("--workdir", help="run folder (default runs/<config>); an existing run resumes")
    parser.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this step")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="compile the train step for the mesh on simulated CPU devices, allocating nothing and "
                             "reading no data; print per-device memory (state, temporaries, largest buffers), "
                             "collectives and compile time; exit 0 if it fits --set mesh.device_memory_gb=GiB (or "
                             "none is set), 3 if it does not (train/dry_run.py)")
    parser.add_argument("--devices", type=int, metavar="N",
                        help="with --dry-run: simulate N devices, the mesh axis at -1 inferred (default: the "
                             "product of the mesh axes, -1 counting 1)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first, on every process of a multi-process run. "
                             "On a managed cluster (Cloud TPU pod, SLURM, Open MPI, ...) JAX finds the coordinator "
                             "and the process ids itself; elsewhere give them with --coordinator (or "
                             "$JAX_COORDINATOR_ADDRESS), --num-processes and --process-id, e.g. two processes "
                             "on one machine: XLA_FLAGS=--xla_force_host_platform_device_count=4 engram-train "
                             "--distributed --coordinator 127.0.0.1:12345 --num-processes 2 --process-id {0,1} "
                             "--workdir runs/x (CPU processes talk through gloo)")
    parser.add_argument("--coordinator", metavar="HOST:PORT",
                        help="with --distributed: process 0's address, the same on every process")
    parser.add_argument("--num-processes", type=int, metavar="N", help="with --distributed: how many processes")
    parser.add_argument("--process-id", type=int, metavar="I", help="with --distributed: this process, 0..N-1")
    args = parser.parse_args(argv)
    if args.devices is not None and not args.dry_run:
        parser.error("--devices needs --dry-run")
    cluster = {"coordinator_address": args.coordinator, "num_processes": args.num_processes,
               "process_id": args.process_id}
    if not args.distributed and any(v is not None for v in cluster.values()):
        parser.error("--coordinator, --num-processes and --process-id need --distributed")
    try:
        if args.distributed:
            _initialize_distributed(**cluster)
        from train.run import run_preset, train

        config = run_preset(args.config).override(args.set)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=1))
            return 0
        if args.dry_run:
            from train.dry_run import dry_run_main, reserve_devices

            reserve_devices(config, args.devices)  # before JAX starts (logging's set-up starts it)
            _setup_logging()
            return dry_run_main(config, args.devices)
        _setup_logging()
        result = train(config, args.workdir, stop_after=args.stop_after)
    except USER_ERRORS as err:
        return _fail("engram-train", err)
    except Exception as err:
        if not _out_of_memory(err):
            raise
        return _fail("engram-train", RuntimeError(_OOM_ADVICE.format(detail=_first_line(err))))
    import jax

    if "stopped_by" in result:  # a stop request: the checkpoint is on disk
        if jax.process_index() == 0:
            print(f"engram-train: {result['stopped_by']}: stopped after step {result['step']} with checkpoint "
                  f"{result['checkpoint']}; run the same command again to resume from there", flush=True)
        return 130 if result["stopped_by"] == "SIGINT" else 143  # the shell's codes for death by SIGINT, SIGTERM
    if jax.process_index() == 0:  # one summary per run, not one per process
        if "val_loss" in result:
            print(f"validation loss {result['val_loss']:.4f} nats/token "
                  f"({result['val_bits_per_byte']:.4f} bits/byte) at step {result['step']}")
        if result.get("tokens_per_s_mean"):
            print(f"throughput: {result['tokens_per_s_mean']:,.0f} tokens/s on average over the timed steps "
                  "(the first, compiling, step and validation left out)")
        if result["dropped"]:
            print(f"dropped by full buckets over this run's steps: {_drops(result['dropped'])}")
        print(f"checkpoint: {result['checkpoint']}")
    return 0


def _drops(counts: dict[str, int]) -> str:
    """`engram_dropped/1 0 token positions, moe_dropped/block_2 3 token copies, ...`"""
    units = {"engram_dropped": "token positions", "engram_dropped_ids": "ids", "moe_dropped": "token copies"}
    return ", ".join(f"{k} {v:,} {units[k.split('/')[0]]}" for k, v in sorted(counts.items()))


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"need 0 <= i < n, got {text!r}")
    return index, count


def prepare_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="engram-prepare",
        description="Tokenize a corpus once into a sharded, memory-mapped token store (engram_jax/data/store.py). "
                    "engram-train does this on first use; run it ahead of time for a large corpus, or split it "
                    "over several launchers with --shard.")
    parser.add_argument("--config", default="tiny", help=f"a preset: {', '.join(configs.names())}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set data.source=/data/fineweb (repeatable)")
    parser.add_argument("--out", help="the store folder (default: <data.cache_dir>/stores/<key>, where engram-train "
                                      "looks for it); train on it with --set data.store=DIR")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                        help="prepare only the I-th of N disjoint sets of parts (N launchers, one each); the "
                             "launcher that finishes the last part writes the manifest")
    parser.add_argument("--part-mb", type=float, default=64.0, help="MB of source per part (default 64)")
    parser.add_argument("--join", action="store_true", help="write the manifest of a store whose parts are done")
    parser.add_argument("--verify", action="store_true",
                        help="check a prepared store: every shard's sha256 and, where the source can be read, "
                             "the sha256 of its bytes against the manifest")
    args = parser.parse_args(argv)
    try:
        from engram_jax import data
        from train.run import run_preset

        config = run_preset(args.config).override(args.set)
        _setup_logging()
        tokenizer = data.load_tokenizer(config.data)
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab > config.model.vocab_size:
            raise ValueError(f"the tokenizer has {vocab} ids but model.vocab_size is {config.model.vocab_size}; "
                             f"set --set model.vocab_size={vocab}")
        out = args.out or config.data.store or None
        if args.verify:
            store, source_checked = data.store.verify(config.data, tokenizer, out)
            print(f"engram-prepare: {store.path}: every shard matches its sha256; the source "
                  + ("matches the bytes recorded" if source_checked else "was not checked (not readable here, or "
                     "not the recorded one)"))
            return 0
        if args.join:
            if out is None:
                out = data.store.default_path(config.data, tokenizer, data.sources.plan(config.data))
            store = data.join(out, tokenizer)
        else:
            store = data.prepare(config.data, tokenizer, out, shard=args.shard, part_bytes=int(args.part_mb * 2**20))
        if store is None:
            print(f"engram-prepare: part set {args.shard[0]}/{args.shard[1]} done; the store is complete when every "
                  "set is (the last to finish writes the manifest, or run again with --join)")
            return 0
        splits = store.manifest["splits"]
        print(f"engram-prepare: {store.path.resolve()}: " + ", ".join(
            f"{split} {s['tokens']:,} tokens ({s['documents']:,} documents, {len(s['shards'])} shards)"
            for split, s in splits.items()))
        if args.out:
            print(f"train on it with: engram-train --config {args.config} --set data.store={store.path.resolve()}")
    except USER_ERRORS as err:
        return _fail("engram-prepare", err)
    return 0


def _read_prompts(path: str) -> list[str]:
    """The non-blank lines of a text file (one prompt each)."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--prompts-file {path}: no such file")
    prompts = [line for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path} holds no prompt")
    return prompts


def _generate(trained, prompts: list[str], args, sampling) -> list[str]:
    """Generates the batch and prints its tokens/s (to stderr with --prompts-file to stdout)."""
    compiled_before = trained.decoder.programs()
    texts = trained.generate(prompts, args.max_new_tokens, sampling.temperature, args.seed, sampling.top_k,
                             sampling.top_p, args.cache_length)
    out = trained.last_generation
    new = sum(len(t) for t in out.tokens)
    note = " (including compilation)" if trained.decoder.programs() != compiled_before else ""
    where = sys.stderr if args.prompts_file and not args.output else sys.stdout
    print(f"generated {new} tokens for {len(prompts)} prompts in {out.seconds:.2f} s: "
          f"{new / max(out.seconds, 1e-9):.1f} tokens/s{note}", file=where)
    if trained.tables is not None and trained.tables.host:
        row = next(iter(trained.rows.values()))
        per_token = out.table_rows_read / max(new, 1)
        fallbacks = f"; {out.hot_fallbacks} programs read their hot-row misses twice" if out.hot_fallbacks else ""
        print(f"host table reads: {per_token:,.1f} rows ({per_token * row.shape[-1] * row.dtype.itemsize:,.0f} bytes) "
              f"per new token, prompts included{fallbacks}", file=where)
    return texts


def _tasks_and_engram_off(trained, args, task_names: list[str], off: tuple[int, ...] | None,
                          lm_eval_model) -> None:
    """engram-eval's lm-eval tasks (`--tasks`) and Engram-off comparison (`--engram-off`):
    prints the tables and writes their JSON into <run>/eval/."""
    from train import engram_off

    rows = []
    if task_names:
        results = {}
        for which, layers in (("on", ()), ("off", off)) if off else (("on", ()),):
            model = lm_eval_model.EngramLM(trained=trained, batch_size=args.batch_size, max_length=args.max_length,
                                           engram_off=layers)
            results[which] = lm_eval_model.evaluate(model, task_names, limit=args.limit, num_fewshot=args.num_fewshot,
                                                    include_path=args.include_path)
            print(f"--- lm-eval, Engram {which}" if off else "--- lm-eval")
            print(lm_eval_model.format_scores(results[which]))
        if off:
            on_scores = {(t, m): v for t, m, v, _, _ in lm_eval_model.scores(results["on"])}
            rows += [engram_off.Comparison(t, m, on_scores[t, m], v, better)
                     for t, m, v, _, better in lm_eval_model.scores(results["off"]) if (t, m) in on_scores]
        path = lm_eval_model.write_results(
            engram_off.results_folder(args.checkpoint) / f"lm_eval_step{trained.step}.json",
            {"step": trained.step, "tasks": task_names, "limit": args.limit, "num_fewshot": args.num_fewshot,
             "engram_off": list(off) if off else None, **results})
        print(f"lm-eval results: {path}")
    if off is not None:
        if not args.no_validation:
            rows = engram_off.validation_comparison(trained, off, args.corpus) + rows
        print(engram_off.format_table(rows, off))
        path = engram_off.write_json(engram_off.results_folder(args.checkpoint) / "engram_off.json",
                                     {"step": trained.step, "engram_off": list(off),
                                      "scores": [r.to_dict() for r in rows]})
        print(f"engram-off results: {path}")


def _import_lm_eval_model():
    """train.lm_eval_model, or a one-line error when lm-eval is not installed."""
    try:
        from train import lm_eval_model
    except ImportError as err:
        raise ValueError(f"--tasks needs lm-eval ({err}): pip install -e \".[eval]\"") from None
    return lm_eval_model


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engram-eval", description="Evaluate a trained Engram model.")
    parser.add_argument("--checkpoint", required=True, help="a run folder, its checkpoints folder or a step folder")
    parser.add_argument("--step", type=int, help="which step (default: the latest)")
    parser.add_argument("--prompt", action="append", default=[],
                        help="text to continue (repeatable: the prompts are generated as one batch)")
    parser.add_argument("--prompts-file", metavar="TXT",
                        help="one prompt per line (blank lines skipped), generated as one batch; writes JSONL")
    parser.add_argument("--output", metavar="JSONL", help="where --prompts-file writes (default: stdout)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1]")
    parser.add_argument("--cache-length", type=int, help="KV cache slots per prompt (default: fitted)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hot-rows", type=int, default=0, metavar="K",
                        help="keep each layer's K most used rows (counted over the training split) in device "
                             "memory; for tables in host memory")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a runtime setting of the run config, e.g. model.engram.placement=host")
    parser.add_argument("--gates", metavar="PNG", help="draw the prompts' Engram gates (paper Fig. 7) to PNG")
    parser.add_argument("--gate-layer", type=int, help="Engram layer to draw (default: the first)")
    parser.add_argument("--gate-branch", default="mean", help="branch to draw, or 'mean'")
    parser.add_argument("--no-validation", action="store_true", help="skip the validation metrics")
    parser.add_argument("--engram-off", nargs="?", const="all", metavar="LAYERS",
                        help="also score with Engram's output zeroed at every Engram layer, or at the given "
                             "comma-separated layer ids; prints on, off and the fraction kept (paper Fig. 6) "
                             "and writes <run>/eval/engram_off.json")
    parser.add_argument("--corpus", action="append", default=[], metavar="PATH",
                        help="with --engram-off: another corpus whose held-out split is also scored (repeatable)")
    tasks = parser.add_argument_group("lm-evaluation-harness (pip install -e \".[eval]\")")
    tasks.add_argument("--tasks", metavar="TASK,...", help="lm-eval tasks to score (comma-separated); results "
                       "JSON in <run>/eval/, with --engram-off also scored with Engram off")
    tasks.add_argument("--limit", type=float, help="lm-eval's --limit: examples per task (a fraction if < 1)")
    tasks.add_argument("--num-fewshot", type=int, help="lm-eval's --num-fewshot")
    tasks.add_argument("--include-path", metavar="DIR", help="a folder of your own lm-eval task YAMLs")
    tasks.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    tasks.add_argument("--max-length", type=int, help="longest sequence scored (default: the run's seq_len)")
    args = parser.parse_args(argv)
    if args.corpus and args.engram_off is None:
        parser.error("--corpus needs --engram-off")
    if args.engram_off is not None and args.no_validation and not args.tasks:
        parser.error("--engram-off with --no-validation needs --tasks: there is nothing else to score")
    lm_eval_only = ("--limit", args.limit), ("--num-fewshot", args.num_fewshot), ("--include-path", args.include_path)
    if not args.tasks and any(v is not None for _, v in lm_eval_only):
        parser.error(", ".join(k for k, v in lm_eval_only if v is not None) + " needs --tasks")
    try:
        from engram_jax.decode import SamplingConfig
        from train import engram_off
        from train.evaluate import Trained, gate_picture

        task_names = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
        if args.tasks is not None:
            lm_eval_model = _import_lm_eval_model()
            if not task_names:
                raise ValueError("--tasks: no task names given")
            lm_eval_model.check_tasks(task_names, args.include_path)  # before the checkpoint is read
        _setup_logging()
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        file_prompts = _read_prompts(args.prompts_file) if args.prompts_file else []
        trained = Trained(args.checkpoint, args.step, tuple(args.set))
        info = sys.stderr if args.prompts_file and not args.output else sys.stdout  # stdout: the JSONL
        print(f"restored step {trained.step} of {trained.config.name}", file=info)
        if args.hot_rows:
            hot = trained.use_hot_rows(args.hot_rows)
            print(f"hot rows: {hot.size:,} per layer in device memory", file=info)
        off = (engram_off.engram_off_layers(trained.config.model, engram_off.parse_layers(args.engram_off))
               if args.engram_off is not None else None)
        if off is None and not args.no_validation:  # with --engram-off, validation is in its table
            metrics = trained.validate()
            print(f"validation loss {metrics['val_loss']:.4f} nats/token, perplexity "
                  f"{metrics['val_perplexity']:.2f}, {metrics['val_bits_per_byte']:.4f} bits/byte", file=info)
            dropped = {k[len("val_"):]: v for k, v in metrics.items() if k.startswith("val_") and "dropped" in k}
            if dropped:
                print(f"dropped by full buckets in validation: {_drops(dropped)}")
        if task_names or off is not None:
            _tasks_and_engram_off(trained, args, task_names, off, lm_eval_model if task_names else None)
        if args.prompt:
            texts = _generate(trained, args.prompt, args, sampling)
            for prompt, text in zip(args.prompt, texts):
                print(f"--- {prompt!r}\n{text}")
        if file_prompts:
            texts = _generate(trained, file_prompts, args, sampling)
            out = trained.last_generation
            lines = [json.dumps({"prompt": p, "text": t, "new_tokens": len(n), "finished": f})
                     for p, t, n, f in zip(file_prompts, texts, out.tokens, out.finished)]
            if args.output:
                pathlib.Path(args.output).write_text("".join(line + "\n" for line in lines))
                print(f"wrote {len(lines)} generations to {args.output}")
            else:
                print("\n".join(lines))
        if args.gates:
            prompts = args.prompt or ["import numpy as np", "def __init__(self, config):", "for i in range(len(x)):"]
            path = gate_picture(trained, prompts, args.gates, args.gate_layer, args.gate_branch)
            print(f"gates: {path}")
    except USER_ERRORS as err:
        return _fail("engram-eval", err)
    return 0
