"""engram-train turns XLA's out-of-memory into one line with what to try instead."""

import jax
import pytest

import train.run
from train.main import train_main

XLA_OOM = ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 36.00GiB.\n"
           "BufferAssignment OOM Debugging.\n  (a long report follows)")


def raising(error):
    def train(*args, **kwargs):
        raise error

    return train


def test_out_of_memory_is_one_line_with_advice_and_exit_code_2(monkeypatch, capsys):
    monkeypatch.setattr(train.run, "train", raising(jax.errors.JaxRuntimeError(XLA_OOM)))
    assert train_main(["--config", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("engram-train: error: out of memory (RESOURCE_EXHAUSTED: Out of memory while trying")
    for advice in ("--dry-run", "--set data.batch_size=", "--set model.remat=full"):
        assert advice in err


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
    error = jax.errors.JaxRuntimeError("INTERNAL: something else broke")
    monkeypatch.setattr(train.run, "train", raising(error))
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        train_main(["--config", "tiny"])
