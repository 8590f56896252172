"""Two processes on one machine (4 CPU devices each, gloo between them) as one run.

They train through the real entry point (`python -m train --distributed ...`), stop after
step 10 with a checkpoint, resume to step 20 on the hybrid mesh (`mesh.dcn_data=2`), and
log the losses of a single process with 8 devices; the tokenizer and compression table
are built by process 0 alone; each process reads its part of every batch, and the global
batch it assembles is the single-process batch. Processes that read other data, or a
process 0 that fails, end every process with one clear line.
"""

import hashlib
import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from engram_jax import data
from train.run import run_preset

REPO = pathlib.Path(__file__).resolve().parent.parent


def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax
    except ImportError:
        return False
    return hasattr(_jax, "make_gloo_tcp_collectives")


pytestmark = [pytest.mark.slow, pytest.mark.multihost,
              pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no gloo CPU collectives")]

STEPS, STOP = 20, 10
# `tiny` cut to one MoE + Engram layer (compilation dominates on 2 cores) on a 512-id BPE
# of a small corpus. Every token goes to all 8 experts (top_k = 8, through the same
# all-to-all dispatch): with a choice of 2, the last-bit differences of another summation
# order (gloo between processes) flip a token's expert after a few steps (measured: at
# step 9, after which the losses differ by 2e-4 relative), which says nothing about the
# two runs' agreement. The learning rate is lowered from tiny's 6e-3 for the same reason.
SETS = ["model.num_layers=1", "model.dense_layers=0", "model.engram.layer_ids=0", "model.vocab_size=512",
        "model.moe.top_k=8",
        "data.vocab_size=512", "data.batch_size=8", "data.seq_len=64", "optim.learning_rate=1e-3",
        f"steps={STEPS}", f"eval_every={STEPS}", "eval_batches=1", "save_every=10", "log_every=1"]
# 20x the 5e-6 measured at step 20 (see SETS); another batch in a step's place moves its
# loss by 1e-3 (relative) or more here, the smallest step-to-step change of the run.
LOSS_RTOL = 1e-4
TIMEOUT_S = 300  # per launch; a run takes 30-60 s on 2 otherwise idle cores


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    """Twelve files of 300 random words: enough pairs for a 512-id BPE."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
             for _ in range(300)]
    for i in range(12):
        lines = (" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(300))
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(corpus: pathlib.Path, cache: pathlib.Path) -> list[str]:
    return [*SETS, f"data.source={corpus}", f"data.cache_dir={cache}"]


def _cli(sets: list[str]) -> list[str]:
    return ["--config", "tiny", *(arg for s in sets for arg in ("--set", s))]


def _start(argv: list[str], logs: pathlib.Path, devices: int, env: dict) -> subprocess.Popen:
    """Starts `python argv` with `devices` CPU devices, its stdout and stderr in files."""
    env = {**os.environ, **env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    with open(f"{logs}.out", "w") as out, open(f"{logs}.err", "w") as err:  # the child keeps its copies
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=out, stderr=err)
    proc.logs = logs
    return proc


def _finish(procs: list[subprocess.Popen], what: str, check: bool = True) -> list[tuple[str, str]]:
    """Waits for all of `procs` (killing them at TIMEOUT_S); fails with every one's output
    if they time out or, with `check`, unless all exit 0. Returns each one's (stdout, stderr)."""
    deadline = time.monotonic() + TIMEOUT_S
    timed_out = False
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
            break
    outputs = [(pathlib.Path(f"{p.logs}.out").read_text(), pathlib.Path(f"{p.logs}.err").read_text()) for p in procs]
    if timed_out or (check and any(p.returncode for p in procs)):
        report = "\n".join(f"--- {p.logs.name}: exit {p.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-6000:]}"
                           for p, (out, err) in zip(procs, outputs))
        pytest.fail(f"{what} {f'timed out after {TIMEOUT_S} s' if timed_out else 'failed'}:\n{report}")
    return outputs


def _two_processes(argv, logs: pathlib.Path, env: dict | None = None) -> list[subprocess.Popen]:
    """Starts process 0 and 1 of a run: `argv(process_id, port)`."""
    port = _free_port()
    return [_start(argv(i, port), logs.with_name(f"{logs.name}.p{i}"), 4, env or {}) for i in range(2)]


def _train_argv(sets: list[str], workdir: pathlib.Path, *more: str):
    return lambda i, port: ["-m", "train", "--distributed", "--coordinator", f"127.0.0.1:{port}",
                            "--num-processes", "2", "--process-id", str(i), *_cli(sets),
                            "--workdir", str(workdir), *more]


def _metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir: pathlib.Path) -> dict[tuple[int, str], float]:
    return {(m["step"], k): m[k] for m in _metrics(workdir) for k in ("loss", "val_loss") if k in m}


# ----------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def worker(corpus, tmp_path_factory) -> dict:
    """What each process of tests/multihost_worker.py saw ("reports"; each had its own
    cache folder under "root")."""
    root = tmp_path_factory.mktemp("worker")
    sets = [s for s in _settings(corpus, root / "unused") if not s.startswith("data.cache_dir")]

    def argv(i, port):
        return ["tests/multihost_worker.py", "--port", str(port), "--process-id", str(i),
                "--cache", str(root / "cache{process}"), "--out", str(root / "report{process}.json"),
                *(arg for s in sets for arg in ("--set", s))]

    _finish(_two_processes(argv, root / "worker"), "the two-process data check")
    return {"reports": [json.loads((root / f"report{i}.json").read_text()) for i in range(2)], "root": root}


def test_processes_join_as_one_run_of_8_devices(worker):
    for i, report in enumerate(worker["reports"]):
        assert (report["process_index"], report["process_count"]) == (i, 2)
        assert (report["devices"], report["local_devices"]) == (8, 4)


def test_tokenizer_and_compression_are_built_once_by_process_0(worker, corpus):
    first, second = worker["reports"]
    # Process 1 has its own, empty, cache: it trained no BPE, built no table and tokenized
    # nothing, yet holds the same tokenizer and lookup as process 0 and reads its token store.
    assert first["cache_folders"] == ["compression", "stores", "tokenizers"]
    assert second["cache_folders"] == []
    assert first["tokenizer_sha256"] == second["tokenizer_sha256"]
    assert first["lookup_sha256"] == second["lookup_sha256"]
    # ... and they are the tokenizer that one process alone would train.
    config = run_preset("tiny").override(_settings(corpus, worker["root"] / "cache0"))
    alone = data.load_tokenizer(config.data)
    assert hashlib.sha256(alone.to_str().encode()).hexdigest() == first["tokenizer_sha256"]


def test_global_batch_is_the_single_process_batch_on_every_mesh(worker):
    for report in worker["reports"]:
        assert set(report["meshes"]) == {"data", "dcn_data=2", "fsdp=2,expert=2"}
        for name, mesh in report["meshes"].items():
            # Process 0's devices come first along the batch axes, so its rows lead the batch.
            assert np.ravel(mesh["process_of_device"]).tolist() == [0] * 4 + [1] * 4, name
            assert mesh["shape"] == ({"data": 2, "fsdp": 2, "expert": 2} if "fsdp" in name
                                     else {"data": 8, "fsdp": 1, "expert": 1}), name
            batches = {k: v for k, v in mesh.items() if "/" in k}
            assert sorted(batches) == ["train/0", "train/1", "validation/0", "validation/1"]
            for where, batch in batches.items():
                assert batch["keys"] == batch["single_process_keys"] == sorted(
                    ["inputs", "targets", "hash_ids/0", "segment_ids", "positions"]), (name, where)
                for key, seen in batch["arrays"].items():
                    assert seen["shape"][:2] == [8, 64], (name, where, key)
                    assert seen["equal"], f"{name} {where} {key}: the global batch is not the single-process one"


def test_processes_reading_other_data_fail_with_one_clear_line(worker):
    for report in worker["reports"]:
        assert report["mismatch_error"] is not None
        assert report["mismatch_error"].startswith("process 1's data settings (sha256 ")
        assert "differs from process 0's" in report["mismatch_error"]
        assert "\n" not in report["mismatch_error"]


def test_an_error_on_process_0_ends_every_process_with_one_line(corpus, tmp_path):
    # More BPE ids than the corpus has pairs: process 0 fails to train the tokenizer, and
    # process 1, which waits for it, gets the reason instead of waiting forever.
    sets = [*_settings(corpus, tmp_path / "cache"), "data.vocab_size=100000", "model.vocab_size=100000"]
    procs = _two_processes(_train_argv(sets, tmp_path / "run"), tmp_path / "failing")
    errors = [err.strip().splitlines()[-1] for _, err in _finish(procs, "the failing launch", check=False)]
    assert [p.returncode for p in procs] == [2, 2], errors
    assert errors[0].startswith("engram-train: error: the corpus yields only "), errors
    assert errors[1].startswith("engram-train: error: process 0 could not build the tokenizer: ValueError: "
                                "the corpus yields only "), errors


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict:
    """One process with 8 devices for 20 steps, alongside two processes stopped after step
    10; then the two resume to step 20 on the hybrid mesh (mesh.dcn_data=2)."""
    root = tmp_path_factory.mktemp("runs")
    sets = _settings(corpus, root / "cache")
    # The resumed launch reuses the first one's compiled steps (same processes and devices).
    env = {"JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    started = time.perf_counter()
    single = _start(["-m", "train", *_cli(sets), "--workdir", str(root / "single")], root / "single", 8, {})
    first = _two_processes(_train_argv(sets, root / "multi", "--stop-after", str(STOP)), root / "first", env)
    outputs = _finish([*first, single], "the first two-process launch and the single-process run")
    first_out, single_out = outputs[:2], outputs[2]
    stopped = _losses(root / "multi")
    checkpoint = sorted(p.name for p in (root / "multi" / "checkpoints" / str(STOP) / "data").iterdir())
    resumed = _finish(_two_processes(_train_argv([*sets, "mesh.dcn_data=2"], root / "multi"), root / "resumed",
                                     env), "the resumed two-process launch")
    seconds = time.perf_counter() - started
    print(f"two-process runs and the single-process run: {seconds:.0f} s")
    return {"root": root, "first": first_out, "single": single_out, "resumed": resumed,
            "stopped": stopped, "data_checkpoint": checkpoint}


def test_two_processes_have_the_losses_of_one(runs):
    single, multi = _losses(runs["root"] / "single"), _losses(runs["root"] / "multi")
    expected = {(s, "loss") for s in range(1, STEPS + 1)} | {(STEPS, "val_loss")}
    assert set(single) == set(multi) == expected
    keys = sorted(expected)
    np.testing.assert_allclose([multi[k] for k in keys], [single[k] for k in keys], rtol=LOSS_RTOL,
                               err_msg=f"two processes vs one, at {keys}")
    assert multi[(STEPS, "loss")] < multi[(1, "loss")] - 0.5  # it trains


def test_run_stops_with_a_checkpoint_and_resumes_from_it(runs):
    assert sorted(runs["stopped"]) == [(s, "loss") for s in range(1, STOP + 1)]
    # The checkpoint holds each process's data iterator.
    assert runs["data_checkpoint"] == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    assert f"resumed from {runs['root'] / 'multi' / 'checkpoints'} at step {STOP}" in runs["resumed"][0][1]
    assert max(int(p.name) for p in (runs["root"] / "multi" / "checkpoints").iterdir() if p.name.isdigit()) == STEPS
    # The steps after the resume are those of the uninterrupted single-process run.
    resumed = {k: v for k, v in _losses(runs["root"] / "multi").items() if k[0] > STOP}
    single = _losses(runs["root"] / "single")
    np.testing.assert_allclose([resumed[k] for k in sorted(resumed)], [single[k] for k in sorted(resumed)],
                               rtol=LOSS_RTOL)


def test_only_process_0_writes_metrics_and_prints(runs):
    steps = [m["step"] for m in _metrics(runs["root"] / "multi") if "loss" in m]
    assert steps == list(range(1, STEPS + 1))  # one line per step: process 1 wrote none
    for launch, last in (("first", STOP), ("resumed", STEPS)):
        (out0, _), (out1, err1) = runs[launch]
        assert f"step {last}/{STEPS}: loss" in out0 and f"checkpoint: {runs['root'] / 'multi'}" in out0
        assert "step " not in out1 and "checkpoint:" not in out1, out1
        assert "resumed from" not in err1 and "tokenizer compression" not in err1  # INFO lines: process 0 only
    assert json.loads((runs["root"] / "multi" / "config.json").read_text())["mesh"]["dcn_data"] == 2
