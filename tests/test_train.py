"""Training end to end: resume is exact, loss falls, evaluation agrees, errors are clear."""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from engram_jax import table
from engram_jax.attention import AttentionConfig
from engram_jax.checkpoint import CheckpointError
from engram_jax.data import DataConfig
from engram_jax.engram import EngramConfig
from engram_jax.mhc import MHCConfig
from engram_jax.model import ModelConfig
from engram_jax.moe import MoEConfig
from engram_jax.optim import OptimConfig
from train.evaluate import Trained
from train.run import RunConfig, run_preset, train

pytestmark = pytest.mark.slow

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()


def write_corpus(root: pathlib.Path) -> pathlib.Path:
    """Twelve small files of patterned text in `root`: learnable, so the loss can fall."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        lines = [" ".join(WORDS[(j + k * 3) % len(WORDS)] for k in range(8)) + f" = {j % 7}"
                 for j in rng.integers(0, 50, 200)]
        (root / f"doc{i}.txt").write_text("\n".join(lines))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def micro_config(corpus: pathlib.Path, cache: pathlib.Path, **overrides) -> RunConfig:
    return RunConfig(
        name="micro",
        model=ModelConfig(vocab_size=300, hidden_size=32, num_layers=2,
                          attention=AttentionConfig(num_heads=2, head_dim=16), mlp_dim=64,
                          moe=MoEConfig(num_experts=4, num_shared=1, top_k=2, expert_dim=16), dense_layers=1,
                          mhc=MHCConfig(branches=2), embed_init_std=0.02,
                          engram=EngramConfig(layer_ids=(1,), heads_per_ngram=2, embed_per_ngram=16,
                                              table_sizes=(101, 103), pad_id=1)),
        data=DataConfig(source=str(corpus), vocab_size=300, seq_len=32, batch_size=8, val_fraction=0.2,
                        cache_dir=str(cache)),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=2),
        steps=8, eval_every=4, eval_batches=2, save_every=4, log_every=1,
    ).override(overrides)


def metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def train_losses(workdir: pathlib.Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(workdir) if "loss" in m}


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """A run of 8 steps without interruption."""
    root = tmp_path_factory.mktemp("runs")
    config = micro_config(corpus, root / "cache")
    result = train(config, root / "straight")
    return config, root, result


def test_resumed_run_has_identical_losses_at_every_step(straight):
    config, root, _ = straight
    train(config, root / "resumed", stop_after=3)  # interrupted after step 3 (not a save step)
    assert max(train_losses(root / "resumed")) == 3
    train(config, root / "resumed")
    assert train_losses(root / "resumed") == train_losses(root / "straight")
    assert len(train_losses(root / "straight")) == 8


def test_training_lowers_the_loss(straight):
    _, root, result = straight
    losses = train_losses(root / "straight")
    assert np.mean([losses[7], losses[8]]) < np.mean([losses[1], losses[2]]) - 0.3
    validations = [m["val_loss"] for m in metrics(root / "straight") if "val_loss" in m]
    assert len(validations) == 2 and validations[1] < validations[0]
    assert result["val_loss"] == validations[1]


def test_evaluating_the_checkpoint_gives_the_loss_training_reported(straight):
    _, root, result = straight
    trained = Trained(root / "straight")
    assert trained.step == 8
    assert trained.validate()["val_loss"] == pytest.approx(result["val_loss"], rel=1e-6)


def test_generation_hashes_new_tokens_from_their_last_ngram(straight):
    _, root, _ = straight
    trained = Trained(root / "straight")
    tokens = trained.encode("alpha beta gamma delta")
    full = trained.hasher(np.asarray([tokens]))
    for position in range(len(tokens)):
        window = trained.hash_window(tokens, position)
        for layer, ids in full.items():
            np.testing.assert_array_equal(window[layer], ids[0, position])
    text = trained.generate("alpha beta", max_new_tokens=6)
    assert text.startswith("alpha beta")


def test_gate_picture_is_written(straight, tmp_path):
    from train.evaluate import gate_picture

    _, root, _ = straight
    path = gate_picture(Trained(root / "straight"), ["alpha beta gamma", "mu nu xi"], tmp_path / "gates.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_a_run_of_another_config_is_refused(straight):
    config, root, _ = straight
    with pytest.raises(CheckpointError, match=r"model.moe.num_experts: 4 in the checkpoint, 5 now"):
        train(config.override(["model.moe.num_experts=5"]), root / "straight")


def copy_run(root: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of the straight run's folder (checkpoints 1, 4 and 8), to spoil or resume."""
    return pathlib.Path(shutil.copytree(root / "straight", tmp_path / "run"))


@pytest.mark.parametrize("override, message", [
    ("steps=16", "steps: 8 in the checkpoint, 16 now; the learning-rate schedule depends on it"),
    ("optim.warmup_steps=3", ("optim.warmup_steps: 2 in the checkpoint, 3 now; the optimizer state and "
                              "learning-rate schedule depend on it")),
    ("optim.schedule=constant", ("optim.schedule: 'cosine' in the checkpoint, 'constant' now; the optimizer "
                                 "state and learning-rate schedule depend on it")),
])
def test_resuming_with_another_schedule_is_refused_in_one_line(straight, tmp_path, override, message):
    config, root, _ = straight
    workdir = copy_run(root, tmp_path)
    before = (workdir / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError) as err:
        train(config.override([override]), workdir)
    assert str(err.value) == f"{message}: use a new --workdir"
    assert (workdir / "metrics.jsonl").read_text() == before  # refused before any work


def test_resuming_with_other_reporting_settings_is_allowed(straight, tmp_path):
    config, root, _ = straight
    workdir = copy_run(root, tmp_path)
    free = config.override(["name=renamed", "eval_every=2", "log_every=3", "save_every=2", "keep_checkpoints=5",
                            "eval_batches=1"])
    assert train(free, workdir)["step"] == 8


def test_resuming_with_other_runtime_settings_trains_on_with_identical_numbers(straight, tmp_path):
    """A device-placed run resumed with its tables in host memory (and other bucket
    capacities, hashing in the step) computes what the straight run computed."""
    config, root, straight_result = straight
    workdir = copy_run(root, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "8")
    logged = len(metrics(workdir))
    runtime = config.override(["model.engram.placement=host", "model.engram.lookup_capacity_factor=0",
                               "model.engram.hash_on_device=true", "model.moe.capacity_factor=3"])
    result = train(runtime, workdir)
    resumed = {m["step"]: m["loss"] for m in metrics(workdir)[logged:] if "loss" in m}
    assert sorted(resumed) == [5, 6, 7, 8]
    assert resumed == {k: v for k, v in train_losses(root / "straight").items() if k > 4}
    assert result["val_loss"] == straight_result["val_loss"]


def test_drops_of_every_step_are_logged_and_validated(corpus, tmp_path, monkeypatch):
    """Buckets of 4 ids force drops; the logged counts add up every step's, whatever log_every."""
    monkeypatch.setattr(table, "_MIN_CAPACITY", 1)
    logs, results = {}, {}
    for every in (1, 3):
        config = micro_config(corpus, tmp_path / "cache", **{"model.engram.lookup_capacity_factor": 0.25,
                                                            "log_every": every})
        results[every] = train(config, tmp_path / f"every{every}", stop_after=4)
        logs[every] = {m["step"]: m for m in metrics(tmp_path / f"every{every}") if "loss" in m}
    per_step = [logs[1][s]["engram_dropped/1"] for s in (1, 2, 3, 4)]
    assert min(per_step) > 0
    assert sorted(logs[3]) == [3, 4]
    assert logs[3][3]["engram_dropped/1"] == sum(per_step[:3]) and logs[3][4]["engram_dropped/1"] == per_step[3]
    assert results[3]["dropped"]["engram_dropped/1"] == sum(per_step) == results[1]["dropped"]["engram_dropped/1"]
    assert results[3]["val_engram_dropped/1"] > 0  # validation reports its own drops
    assert logs[3][4]["engram_dropped_ids/1"] > 0


def spoil(step_folder: pathlib.Path) -> None:
    """Flips the middle half of the bytes of each array file of the `model` item."""
    for f in (step_folder / "model" / "d").iterdir():
        data = bytearray(f.read_bytes())
        for i in range(len(data) // 4, 3 * len(data) // 4):
            data[i] ^= 0xFF
        f.write_bytes(bytes(data))


# `engram-train`'s path (logging set up as main() does) with a RunConfig given as JSON.
TRAIN_FROM_JSON = ("import json, sys; from train.main import _setup_logging; from train.run import RunConfig, train; "
                   "_setup_logging(); train(RunConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2])")


def test_training_resumes_from_the_newest_intact_checkpoint(straight, tmp_path):
    config, root, _ = straight
    workdir = copy_run(root, tmp_path)
    checkpoints = workdir / "checkpoints"
    spoil(checkpoints / "8")
    spoiled = {f.name: f.read_bytes() for f in (checkpoints / "8" / "model" / "d").iterdir()}
    result = subprocess.run([sys.executable, "-c", TRAIN_FROM_JSON, json.dumps(config.to_dict()), str(workdir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "cannot be read" in line]
    assert len(warnings) == 1 and warnings[0].split(" ", 1)[1].startswith(
        f"checkpoint {checkpoints / '8'} cannot be read, so the run resumes from step 4; "
        f"it is kept as {checkpoints / '8.corrupt'}: ")
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
    # The bad checkpoint is kept, aside; steps 5 to 8 ran again, as the straight run did.
    assert {f.name: f.read_bytes() for f in (checkpoints / "8.corrupt" / "model" / "d").iterdir()} == spoiled
    assert sorted(p.name for p in checkpoints.iterdir()) == ["1", "4", "8", "8.corrupt"]
    assert train_losses(workdir) == train_losses(root / "straight")
    assert Trained(workdir).step == 8


def eval_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from train.main import eval_main; sys.exit(eval_main())",
                           *args], capture_output=True, text=True, timeout=300)


def test_evaluating_a_corrupt_checkpoint_names_it_and_the_intact_steps(straight, tmp_path):
    _, root, _ = straight
    workdir = copy_run(root, tmp_path)
    checkpoints = workdir / "checkpoints"
    spoil(checkpoints / "8")
    result = eval_cli("--checkpoint", str(workdir), "--no-validation")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"engram-eval: error: checkpoint {checkpoints / '8'} cannot be read "
                                    "(intact steps: 1, 4; --step N picks one): ")
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
    assert (checkpoints / "8").is_dir()  # evaluation reads, never moves


def test_evaluation_shows_no_read_only_notice(straight):
    _, root, _ = straight
    result = eval_cli("--checkpoint", str(root / "straight"), "--step", "4", "--no-validation")
    assert result.returncode == 0 and result.stdout.startswith("restored step 4 of micro")
    assert "Given directory is read only" not in result.stderr


def test_engram_eval_generates_a_prompts_file_from_host_tables_and_hot_rows(straight, tmp_path):
    _, root, _ = straight
    prompts = ["alpha beta", "gamma delta epsilon zeta", "mu"]
    (tmp_path / "prompts.txt").write_text(f"{prompts[0]}\n\n{prompts[1]}\n{prompts[2]}\n")
    result = eval_cli("--checkpoint", str(root / "straight"), "--no-validation", "--max-new-tokens", "5",
                      "--prompts-file", str(tmp_path / "prompts.txt"), "--output", str(tmp_path / "out.jsonl"),
                      "--set", "model.engram.placement=host", "--hot-rows", "64")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout and "hot rows: 64 per layer" in result.stdout
    assert re.search(r"host table reads: [\d.,]+ rows \([\d,]+ bytes\) per new token", result.stdout)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == prompts
    # The run's device tables, no hot rows, in this process: the same greedy continuations.
    trained = Trained(root / "straight")
    assert trained.tables.host is False
    assert [line["text"] for line in lines] == trained.generate(prompts, max_new_tokens=5)
    assert [line["new_tokens"] for line in lines] == [len(t) for t in trained.last_generation.tokens]


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--prompt", "x", "--top-p", "0"], "SamplingConfig.top_p = 0.0: must be in (0, 1]"),
    (["--prompt", " ".join(WORDS), "--cache-length", "16"], "longer than the cache's 16"),
    (["--prompt", "x", "--set", "model.hidden_size=64"], "--set model.hidden_size: a checkpoint is evaluated"),
    (["--prompt", "x", "--set", "model.engram.placement=host", "--hot-rows", "1000"],
     "--hot-rows 1,000 is larger than layer 1's table of"),
])
def test_bad_generation_input_is_one_line(straight, capsys, args, message):
    from train.main import eval_main

    _, root, _ = straight
    assert eval_main(["--checkpoint", str(root / "straight"), "--no-validation", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("engram-eval: error: ") and message in err and len(err.splitlines()) == 1


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--config", "tiny2"], "unknown config 'tiny2'"),
    (["--config", "tiny", "--set", "optim.lr=1"], "unknown key RunConfig.optim.lr"),
    (["--config", "tiny", "--set", "steps=0"], "RunConfig.steps = 0: must be >= 1"),
])
def test_bad_command_lines_fail_with_one_clear_line(args, message):
    result = cli(*args)
    assert result.returncode == 2
    assert f"engram-train: error: {message}" in result.stderr and "Traceback" not in result.stderr


def test_an_empty_corpus_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("--config", "tiny", "--set", f"data.source={tmp_path / 'empty'}",
                 "--workdir", str(tmp_path / "run"))
    assert result.returncode == 2 and "holds no usable files" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_checkpoint_of_another_config_is_a_clear_error(straight):
    _, root, _ = straight
    result = cli("--config", "tiny-baseline", "--workdir", str(root / "straight"))
    assert result.returncode == 2 and "different model config" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluating_a_missing_or_corrupt_checkpoint_is_a_clear_error(straight, tmp_path):
    from train.main import eval_main

    assert eval_main(["--checkpoint", str(tmp_path / "nothing")]) == 2
    _, root, _ = straight
    corrupt = tmp_path / "corrupt"
    shutil.copytree(root / "straight", corrupt)
    step = max(int(p.name) for p in (corrupt / "checkpoints").iterdir() if p.name.isdigit())
    for f in (corrupt / "checkpoints" / str(step) / "model").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"\0" * 64)
    assert eval_main(["--checkpoint", str(corrupt), "--no-validation"]) == 2


def test_every_run_preset_resolves():
    from engram_jax import configs

    for name in configs.names():
        config = run_preset(name)
        assert config.model == configs.get(name) and config.steps >= 1


def test_logged_throughput_is_per_interval_and_the_summary_is_the_mean(monkeypatch):
    """Steps 2-3 take 1 s each, validation 10 s (left out), steps 4-5 take 3 s each."""
    from train import run as run_module

    now = [0.0]
    monkeypatch.setattr(run_module.time, "perf_counter", lambda: now[0])
    clock = run_module.Throughput(tokens_per_step=100)
    clock.go(1)  # after the first (compiling) step
    now[0] = 2.0
    assert clock.rate(3) == pytest.approx(100.0)
    clock.pause(3)
    now[0] = 12.0  # validation
    clock.go(3)
    now[0] = 18.0
    assert clock.rate(5) == pytest.approx(100 * 2 / 6)  # this interval only, not since step 1
    assert clock.mean() == pytest.approx(100 * 4 / 8)
