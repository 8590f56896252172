"""The dry run: abstract compile of the train step, per-device memory, fit verdict, CLI."""

import math

import jax
import numpy as np
import pytest

from train import dry_run
from train.main import train_main
from train.run import build_steps, run_preset

# `tiny` cut to 2 layers (one dense, one MoE with Engram) so that a compile takes
# seconds on 2 cores; the mesh uses every axis.
SMALLER = ["model.num_layers=2", "model.engram.layer_ids=[1]"]
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"]


def config(*overrides: str):
    return run_preset("tiny").override([*SMALLER, *MESH, *overrides])


@pytest.fixture(scope="module")
def report():
    assert jax.device_count() == 8
    return dry_run.dry_run(config())


@pytest.fixture(scope="module")
def host_report():
    before = {id(x) for x in jax.live_arrays()}
    report = dry_run.dry_run(config("model.engram.placement=host"))
    return report, [x for x in jax.live_arrays() if id(x) not in before]


def test_state_bytes_are_the_sums_of_the_shard_sizes(report):
    steps = build_steps(config())
    state = steps.abstract_with_sharding()
    params = sum(math.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(state.params))
    total = sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(state.params))
    assert report["state_bytes"]["params"] == params
    assert total / 8 <= params < total  # split over fsdp and expert, replicated over data
    rows = sum(math.prod(s.shape) * s.dtype.itemsize for s in state.tables.rows.values())
    assert report["state_bytes"]["table_rows"] == rows // 8  # rows split over every device


def test_state_and_batch_are_the_compiled_programs_arguments(report):
    c = report["compiled"]
    assert sum(report["state_bytes"].values()) == c["argument"]
    assert report["state_bytes"]["batch"] == 16 * 128 * 4 * (4 + 8) // 8  # 4 x [B, T] + hash ids [B, T, H=8]
    assert c["temp"] > 0
    assert c["alias"] >= sum(report["state_bytes"].values()) - report["state_bytes"]["batch"]  # state donated
    assert report["device_total"] == c["argument"] + c["output"] - c["alias"] + c["temp"]
    assert report["mesh"] == {"data": 2, "fsdp": 2, "expert": 2}
    assert report["compile_s"] > 0
    assert report["collective_bytes"]["all-to-all"] > 0  # expert parallelism and the table lookup
    assert report["largest_buffers"][0]["bytes"] >= report["largest_buffers"][-1]["bytes"] > 0


def test_host_tables_are_host_memory_and_nothing_is_allocated(report, host_report):
    host, allocated = host_report
    assert allocated == []
    tables = report["state_bytes"]["table_rows"] + report["state_bytes"]["table_slots"]
    assert host["state_bytes"]["table_rows"] == host["state_bytes"]["table_slots"] == 0
    assert host["host_total"] == host["state_host_bytes"]["table_rows"] + host["state_host_bytes"]["table_slots"]
    assert host["host_total"] == tables  # the same shards, in pinned host memory
    c = host["compiled"]
    assert host["device_total"] == c["argument"] - host["host_in_arguments"] + c["output"] - c["alias"] + c["temp"]
    assert "pinned host memory" in dry_run.format_report(host)
    # The init is compiled too: its device program makes the dense state only.
    assert host["init"]["temp"] == report["init"]["temp"] > 0
    assert host["init"]["table_shard_on_host"] == max(
        dry_run._shard_bytes(x) for x in jax.tree.leaves(build_steps(config()).abstract_with_sharding().tables))
    assert "tables drawn on the host shard by shard" in dry_run.format_report(host)


def test_the_verdict_follows_the_device_memory(report):
    assert dry_run.fits(report) is None
    small = dry_run.dry_run(config("mesh.device_memory_gb=0.001"))  # measured once: no second compile
    large = dry_run.dry_run(config("mesh.device_memory_gb=80"))
    assert small["compile_s"] == large["compile_s"] == report["compile_s"]
    assert dry_run.fits(small) is False and dry_run.fits(large) is True
    assert "DOES NOT FIT" in dry_run.format_report(small)


def test_the_command_line_exit_code_says_whether_it_fits(report, capsys):
    argv = ["--config", "tiny", "--dry-run", *(f"--set={s}" for s in SMALLER + MESH)]
    assert train_main([*argv, "--set", "mesh.device_memory_gb=0.001"]) == dry_run.DOES_NOT_FIT
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "mesh data 2 x fsdp 2 x expert 2" in out
    assert train_main([*argv, "--set", "mesh.device_memory_gb=80"]) == 0
    assert "fits in 80.00 GiB" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--devices", "8", "--set", "mesh.fsdp=3"], "does not divide the 8 devices"),
    (["--set", "mesh.fsdp=3", "--set", "mesh.data=1"], "data.batch_size = 16 does not split over the 3 devices"),
    (["--devices", "0"], "--devices must be >= 1"),
])
def test_a_mesh_that_does_not_match_is_one_clear_line(args, message, capsys):
    assert train_main(["--config", "tiny", "--dry-run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("engram-train: error:") and message in err and "\n" not in err


def test_devices_needs_dry_run():
    with pytest.raises(SystemExit):
        train_main(["--config", "tiny", "--devices", "8"])


def test_the_abstract_batch_has_the_pipelines_keys():
    steps = build_steps(config("model.engram.hash_on_device=true", "data.segment_ids=false"))
    batch = dry_run.abstract_batch(config("model.engram.hash_on_device=true", "data.segment_ids=false"), steps.mesh)
    assert set(batch) == {"inputs", "targets", "hash_ids"} and batch["hash_ids"] == {}
    batch = dry_run.abstract_batch(config(), steps.mesh)
    assert set(batch) == {"inputs", "targets", "hash_ids", "segment_ids", "positions"}
    assert batch["hash_ids"][1].shape == (16, 128, 8) and batch["hash_ids"][1].dtype == np.int32


@pytest.mark.slow
def test_more_devices_than_this_process_has_run_in_a_subprocess(capsys):
    # 16 devices from a process of 8: `python -m train.dry_run` with JAX_NUM_CPU_DEVICES=16.
    out = dry_run.dry_run(config("mesh.data=4", "data.batch_size=16"))
    assert out["devices"] == 16 and out["mesh"] == {"data": 4, "fsdp": 2, "expert": 2}
    assert out["compiled"]["temp"] > 0
    with pytest.raises(ValueError, match="does not split over the 3 devices"):  # errors come back as one line
        dry_run._in_subprocess(config("mesh.data=1", "mesh.fsdp=3", "mesh.expert=1"), 3)
