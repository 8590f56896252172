"""Tiny trained runs shared by the evaluation tests: trained once per test session.

`micro_config` is tests/test_train.py's; the corpus is its patterned text. The Engram run
and its baseline (the same backbone without Engram) share the corpus and the tokenizer.
"""

import atexit
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile


from test_train import micro_config, write_corpus


@functools.lru_cache(maxsize=None)
def _root() -> pathlib.Path:
    root = pathlib.Path(tempfile.mkdtemp(prefix="engram_eval_runs_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # the session's runs go with it
    write_corpus(root / "corpus")
    return root


def corpus() -> pathlib.Path:
    return _root() / "corpus"


# Trains in a child process: a run routes library loggers (asyncio's for the rest of its
# process, train/preemption.py), which would change what later tests in this process see.
_TRAIN = ("import json, pathlib, sys; from train.run import RunConfig, train; "
          "train(RunConfig.from_dict(json.loads(sys.argv[1])), pathlib.Path(sys.argv[2]))")


@functools.lru_cache(maxsize=None)
def trained_run(engram: bool = True) -> pathlib.Path:
    """The run folder of 8 steps of the micro model, with Engram (layer 1) or without."""
    root = _root()
    config = micro_config(root / "corpus", root / "cache")
    if not engram:
        config = config.replace(name="micro-baseline", model=config.model.replace(engram=None))
    workdir = root / ("engram" if engram else "baseline")
    done = subprocess.run([sys.executable, "-c", _TRAIN, json.dumps(config.to_dict()), str(workdir)],
                          capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parents[1],
                          env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir
