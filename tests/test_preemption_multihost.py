"""SIGTERM to one process of a two-process run: JAX's preemption sync point stops both at
the same step with one checkpoint (train/preemption.py); helpers from tests/test_multihost.py."""

import json
import pathlib
import signal
import time

from test_multihost import STEPS, TIMEOUT_S, _finish, _settings, _train_argv, _two_processes, corpus  # noqa: F401
from test_multihost import pytestmark  # noqa: F401 (slow, multihost, needs gloo)


def test_sigterm_to_one_process_stops_every_process_at_one_step(corpus, tmp_path):  # noqa: F811
    workdir = tmp_path / "run"
    procs = _two_processes(_train_argv(_settings(corpus, tmp_path / "cache"), workdir), tmp_path / "launch")
    out0 = pathlib.Path(f"{procs[0].logs}.out")
    deadline = time.monotonic() + TIMEOUT_S
    while "step 2/" not in (out0.read_text() if out0.exists() else ""):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run did not reach step 2"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # the process that prints nothing: the notice must travel
    (stdout0, _), (stdout1, err1) = _finish(procs, "the preempted two-process run", check=False)
    assert [p.returncode for p in procs] == [143, 143], err1
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    stopped = max(steps)
    assert 2 <= stopped < STEPS
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(saved) == stopped
    assert stdout0.splitlines()[-1] == (f"engram-train: a preemption notice: stopped after step {stopped} with "
                                        f"checkpoint {workdir / 'checkpoints' / str(stopped)}; run the same command "
                                        "again to resume from there")
    assert "stopped after" not in stdout1
