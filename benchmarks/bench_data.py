"""The data path at corpus scale: the token store against today's in-memory path, side by side.

"Today's path" is engram_jax/data.py as it was before the token store (commit 73d54f0),
loaded from git history: it reads every document into memory, tokenizes the whole split
in one `encode_batch_fast` call, concatenates the ids and caches them as one .npy; a warm
start re-reads every document to find that cache. The store path is `engram-prepare`'s:
streamed parts, memory-mapped shards, a manifest.

The base corpus is this interpreter's standard library (the default `stdlib` source, its
.py files without tests, about 12 MB); k x is k copies of it in k folders. Each figure is
one subprocess (peak RSS from `wait4`), old and new alternating at each size:

  prepare      tokenize both splits with an existing tokenizer (wall s, MB/s, tokens/s, peak RSS)
  prepare_bpe  the same, training the BPE first on the default 100 MB sample (the largest size only)
  first_batch  from a fresh process to the first training batch with hash ids, the
               tokens already prepared (a warm start)
  pipeline     batches/s of the pipeline with Engram hashing at tiny's and small's shapes

    python benchmarks/bench_data.py [--sizes 1,4,16] [--corpus DIR] [--tokenizer tokenizer.json]
                                    [--tasks prepare,first_batch,pipeline,prepare_bpe] [--plot PNG]

`--corpus DIR` measures one given corpus (size "1") instead of stdlib copies. Prints one
JSON object. Needs a git checkout (for today's path) and a few GB of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEGACY_COMMIT = "73d54f0"


def _legacy(folder: Path):
    """engram_jax/data.py of LEGACY_COMMIT, imported as `legacy_data`."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{LEGACY_COMMIT}:engram_jax/data.py"],
                            capture_output=True, text=True, check=True).stdout
    (folder / "legacy_data.py").write_text(source)
    sys.path.insert(0, str(folder))
    import legacy_data

    return legacy_data


# ----------------------------------------------------------------------------- one measurement (child)

def _child(spec: dict) -> dict:
    from engram_jax import data
    from engram_jax.engram import EngramConfig

    start = time.perf_counter()
    path, task, corpus, cache = spec["path"], spec["task"], spec["corpus"], spec["cache"]
    module = _legacy(Path(spec["scratch"])) if path == "today" else data
    tokenizer = spec.get("tokenizer", "")
    config = module.DataConfig(source=corpus, tokenizer=tokenizer, vocab_size=4096, cache_dir=cache,
                               seq_len=128, batch_size=16)
    out: dict = {}
    if task in ("prepare", "prepare_bpe"):
        tok = module.load_tokenizer(config)
        out["tokenizer_s"] = time.perf_counter() - start
        if path == "today":
            tokens = sum(len(module.tokenize_split(config, tok, split)) for split in module.SPLITS)
        else:
            store = data.prepare(config, tok)
            tokens = sum(store.num_tokens(split) for split in data.SPLITS)
        out["tokens"] = tokens
    elif task == "first_batch":
        tok = module.load_tokenizer(config)
        hasher = EngramConfig(layer_ids=(1, 3), pad_id=1).make_hasher(
            __import__("engram_jax.compression", fromlist=["x"]).compress_tokenizer(tok, cache).lookup)
        batch = next(iter(module.Pipeline(config, tok, hasher, "train", process_index=0, process_count=1)))
        out["batch_shape"] = list(batch["inputs"].shape)
    elif task == "pipeline":
        tok = module.load_tokenizer(config)
        from engram_jax.compression import compress_tokenizer

        lookup = compress_tokenizer(tok, cache).lookup
        for name, (batch, seq, engram) in {"tiny": (16, 128, EngramConfig(layer_ids=(1, 3), pad_id=1)),
                                           "small": (32, 512, EngramConfig(layer_ids=(1, 5), pad_id=1))}.items():
            shaped = config.replace(batch_size=batch, seq_len=seq)
            it = iter(module.Pipeline(shaped, tok, engram.make_hasher(lookup), "train", process_index=0,
                                      process_count=1))
            next(it)
            t = time.perf_counter()
            count = 50
            for _ in range(count):
                next(it)
            out[f"{name}_batches_per_s"] = count / (time.perf_counter() - t)
            it.close()
    out["wall_s"] = time.perf_counter() - start
    return out


def _measure(spec: dict) -> dict:
    """Runs one child; its JSON plus its peak RSS (GB)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(proc.pid, 0)
    process_s = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{spec['path']} {spec['task']} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["process_s"] = process_s  # from the start of the process (imports included) to its end
    result["peak_rss_gb"] = usage.ru_maxrss / 2**20  # KB on Linux
    result["cpu_s"] = usage.ru_utime + usage.ru_stime  # less sensitive than wall time to a busy machine
    return result


def _copies(base: Path, k: int, into: Path) -> Path:
    """k copies of the stdlib's .py files (test folders left out, as the `stdlib` source does)."""
    folder = into / f"corpus_{k}x"
    if not folder.exists():
        skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
        for path in base.rglob("*.py"):
            relative = path.relative_to(base)
            if skip & set(relative.parts[:-1]) or any(p.startswith(".") for p in relative.parts):
                continue
            for i in range(k):
                target = folder / f"copy{i}" / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--sizes", default="1,4,16")
    parser.add_argument("--corpus", help="measure this corpus (one size) instead of stdlib copies")
    parser.add_argument("--tasks", default="prepare,first_batch,pipeline,prepare_bpe")
    parser.add_argument("--plot", default="benchmarks/data_rss.png")
    parser.add_argument("--scratch", help="folder for corpora and caches (default: a temporary one)")
    parser.add_argument("--tokenizer", help="a tokenizer.json to use (default: the BPE trained on the first size)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    tasks = args.tasks.split(",")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench_data_"))
    scratch.mkdir(parents=True, exist_ok=True)
    base = Path(sysconfig.get_paths()["stdlib"])
    sizes = [1] if args.corpus else [int(s) for s in args.sizes.split(",")]
    corpora = {k: Path(args.corpus) if args.corpus else _copies(base, k, scratch) for k in sizes}
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "legacy_commit": LEGACY_COMMIT, "sizes": {}}
    # One tokenizer for every size: trained once on the 1x corpus by today's code (the same BPE).
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer_cache = scratch / "tokenizer_cache"
        shutil.rmtree(tokenizer_cache, ignore_errors=True)
        first = _measure({"path": "store", "task": "prepare", "corpus": str(corpora[sizes[0]]),
                          "cache": str(tokenizer_cache), "scratch": str(scratch)})
        tokenizer = str(next((tokenizer_cache / "tokenizers").glob("*.json")))
        report["tokenizer_training_s"] = first["tokenizer_s"]
    for k, corpus in corpora.items():
        mb = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file()) / 2**20
        row: dict = {"corpus_mb": round(mb, 1)}
        for task in tasks:
            if task == "prepare_bpe" and k != max(sizes):
                continue
            for path in ("today", "store"):
                cache = scratch / f"cache_{path}_{k}x"
                if task in ("prepare", "prepare_bpe"):
                    shutil.rmtree(cache, ignore_errors=True)  # cold: nothing tokenized
                spec = {"path": path, "task": task, "corpus": str(corpus), "cache": str(cache),
                        "scratch": str(scratch), "tokenizer": "" if task == "prepare_bpe" else tokenizer}
                result = _measure(spec)
                if task in ("prepare", "prepare_bpe"):
                    result["mb_per_s"] = mb / result["wall_s"]
                    result["tokens_per_s"] = result["tokens"] / result["wall_s"]
                row[f"{task}/{path}"] = {k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in result.items()}
                print(json.dumps({"size": k, "task": task, "path": path, **row[f"{task}/{path}"]}), file=sys.stderr)
            if task != "pipeline":
                today, store = row[f"{task}/today"], row[f"{task}/store"]
                if "tokens" in today:  # the same text tokenized: the same number of ids
                    row[f"{task}/same_tokens"] = today["tokens"] == store["tokens"]
                row[f"{task}/ratio_store_over_today"] = {"process": round(store["process_s"] / today["process_s"], 3),
                                                         "wall": round(store["wall_s"] / today["wall_s"], 3),
                                                         "cpu": round(store["cpu_s"] / today["cpu_s"], 3),
                                                         "peak_rss": round(store["peak_rss_gb"] / today["peak_rss_gb"], 3)}
        report["sizes"][f"{k}x"] = row
    print(json.dumps(report, indent=1))
    if args.plot and len(sizes) > 1 and "prepare" in tasks:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        mbs = [report["sizes"][f"{k}x"]["corpus_mb"] for k in sizes]
        fig, ax = plt.subplots(figsize=(6, 4))
        for path, label in (("today", "today: in memory"), ("store", "token store (streamed)")):
            ax.plot(mbs, [report["sizes"][f"{k}x"][f"prepare/{path}"]["peak_rss_gb"] for k in sizes], "o-",
                    label=label)
        ax.set_xlabel("corpus (MB of text)")
        ax.set_ylabel("peak RSS of tokenizing it (GB)")
        ax.set_title("Preparing a corpus: memory against size")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(ROOT / args.plot if not Path(args.plot).is_absolute() else args.plot, dpi=120)


if __name__ == "__main__":
    main()
