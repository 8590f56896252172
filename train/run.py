"""Training runs: the run config, its presets, and `train(config, workdir)`.

    python -m train --config tiny                         # or: engram-train --config tiny
    python -m train --config tiny --set optim.learning_rate=1e-3 --set steps=2000
    python -m train --config tiny-baseline                # the iso-parameter baseline

A run folder (default `runs/<name>`) holds `config.json`, `tokenizer.json`,
`metrics.jsonl` (one line per logged step and per validation), TensorBoard events when
tensorboardX is installed, Orbax checkpoints under `checkpoints/`, the run's `lock` and
`engram-train.log` (libraries' warnings and tracebacks; train/preemption.py). Running again
in the same folder resumes from the latest checkpoint that reads; one that does not is
renamed `<step>.corrupt`, with a warning. A resumed run keeps its model, data, optimizer
and length (`steps`, which shapes the learning-rate schedule): changing one is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from engram_jax import configs, data, model, optim, sharding, training
from engram_jax.checkpoint import CheckpointError, Checkpoints, UnreadableCheckpoint, config_differences
from engram_jax.config_base import Config
from engram_jax.data import DataConfig
from engram_jax.hashing_device import DeviceHasher
from engram_jax.model import ModelConfig
from engram_jax.optim import OptimConfig
from engram_jax.sharding import MeshConfig
from engram_jax.table import Tables
from train import preemption
from train.validation import Validation

log = logging.getLogger("engram_jax.train")

# Peak dense bf16 FLOP/s per device, for MFU (vendor datasheets).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


@dataclasses.dataclass(frozen=True)
class RunConfig(Config):
    """A training run.

    Attributes:
      name: the run's name (default output folder `runs/<name>`).
      model, data, optim, mesh: the parts' configs.
      steps: optimizer steps.
      eval_every: validate every this many steps (and at the end).
      eval_batches: validation batches per evaluation.
      save_every: checkpoint every this many steps (and at the end).
      keep_checkpoints: how many checkpoints to keep.
      log_every: write metrics every this many steps.
      seed: parameter initialisation seed (the data order has its own, data.seed).
    """

    name: str = "tiny"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    steps: int = 1000
    eval_every: int = 250
    eval_batches: int = 8
    save_every: int = 250
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0

    def validate(self) -> None:
        for field in ("steps", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "log_every"):
            self.check(getattr(self, field) >= 1, field, "must be >= 1")
        if not self.data.tokenizer:
            self.check(self.data.vocab_size == self.model.vocab_size, "data",
                       f"data.vocab_size = {self.data.vocab_size} (the BPE to train) must equal "
                       f"model.vocab_size = {self.model.vocab_size}")

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.data.seq_len


def _tiny_run(name: str) -> RunConfig:
    # Sized so that `engram-train --config tiny` ends within 10 minutes on 2 CPU cores;
    # the learning rate comes from a 1.5e-3..1.2e-2 sweep (benchmarks/RESULTS.md): the
    # baseline's best, within 0.02 nats of tiny's best (1.2e-2).
    return RunConfig(name=name, model=configs.get(name),
                     data=DataConfig(vocab_size=4096, seq_len=128, batch_size=16),
                     optim=OptimConfig(algorithm="adamw", learning_rate=6e-3, warmup_steps=50, schedule="cosine"),
                     steps=400, eval_every=100, eval_batches=8, save_every=100, log_every=10)


def _small_run(name: str) -> RunConfig:
    return RunConfig(name=name, model=configs.get(name),
                     data=DataConfig(vocab_size=16384, seq_len=512, batch_size=32),
                     optim=OptimConfig(algorithm="adamw", learning_rate=1e-3, warmup_steps=500),
                     steps=20_000, eval_every=1000, eval_batches=20, save_every=1000, log_every=50)


def _paper_run(name: str) -> RunConfig:
    # Paper section 4.1: Muon, base LR 4e-4, step decay, weight decay 0.1; Engram tables
    # Adam at 5x; 1280 x 4096 tokens per step. The DeepSeek-V3 tokenizer needs the Hub.
    steps = 50_000 if "27b" in name or "40b" in name else 24_000  # 262B / 100B tokens
    batch = 1280 if steps == 50_000 else 1024
    return RunConfig(name=name, model=configs.get(name),
                     data=DataConfig(tokenizer="deepseek-ai/DeepSeek-V3", vocab_size=129_280, seq_len=4096,
                                     batch_size=batch, num_workers=8),
                     optim=OptimConfig(algorithm="muon", learning_rate=4e-4, warmup_steps=2000, schedule="step"),
                     steps=steps, eval_every=1000, eval_batches=50, save_every=1000, log_every=20)


# Run fields that shape the learning-rate curve, and why, checked in one line each on
# resume (model and data, another run's folder, are checked by `Checkpoints.check_config`,
# less RUNTIME_FIELDS).
# The rest (name, mesh, seed, eval_every, eval_batches, save_every, keep_checkpoints,
# log_every) may change: they do not alter the resumed state's path.
SCHEDULE_FIELDS = {"steps": "the learning-rate schedule depends on it",
                   "optim": "the optimizer state and learning-rate schedule depend on it"}


# Model fields that change how a step runs, not what it computes or stores: where the
# tables live, bucket capacities, where hashing runs. A run may resume with other values
# (as with another mesh); the checkpoint restores onto any placement.
RUNTIME_FIELDS = ("model.engram.placement", "model.engram.lookup_capacity_factor", "model.engram.hash_on_device",
                  "model.moe.capacity_factor")


def check_resumable(checkpoints: Checkpoints, config: RunConfig) -> None:
    """Raises CheckpointError if `config` cannot continue the run saved in `checkpoints`."""
    current = config.to_dict()
    step = _newest_readable_config(checkpoints)
    for part in ("model", "data"):
        checkpoints.check_config(current, step, key=part, ignore=RUNTIME_FIELDS)
    saved = checkpoints.read_config(step)
    for key, why in SCHEDULE_FIELDS.items():
        diff = config_differences(saved.get(key), current[key], f"{key}.")
        if diff:
            raise CheckpointError(f"{'; '.join(diff)}; {why}: use a new --workdir")


def _newest_readable_config(checkpoints: Checkpoints) -> int:
    """The newest step whose config reads (a run's steps share the checked fields)."""
    steps = sorted(checkpoints.steps(), reverse=True)
    for step in steps:
        try:
            checkpoints.read_config(step)
            return step
        except UnreadableCheckpoint:
            continue
    return steps[0]  # none reads: the check raises its error


def restore_newest_intact(checkpoints: Checkpoints, abstract_state, data_iterator):
    """The newest checkpoint that reads (and the data iterator, in place).

    A newer one that does not read is renamed `<step>.corrupt` (see
    `Checkpoints.set_aside`), with a one-line warning: kept on disk, but out of Orbax's
    way, so that the run saves those steps again. If no step reads, the newest one's
    error is raised and nothing is moved.
    """
    bad: list[UnreadableCheckpoint] = []
    for step in sorted(checkpoints.steps(), reverse=True):
        try:
            state = checkpoints.restore(abstract_state, step, data_iterator=data_iterator)
        except UnreadableCheckpoint as err:
            bad.append(err)
            continue
        for err in bad:
            aside = checkpoints.set_aside(err.step)
            log.warning("checkpoint %s cannot be read, so the run resumes from step %d; it is kept as %s: %s",
                        err.path, step, aside, err.reason)
        return state
    raise bad[0]


def make_tables(config: RunConfig, mesh) -> Tables | None:
    """The run's table engine on `mesh` (None for a model without Engram)."""
    if config.model.engram is None:
        return None
    return Tables(config.model.engram, mesh, optim.table_optimizer(config.optim), shard_axes=config.mesh.table_axes)


def run_preset(name: str) -> RunConfig:
    """The run preset `name`: a model preset of `engram_jax.configs` with its training setup."""
    if name not in configs.names():
        raise KeyError(f"unknown config {name!r}; known: {', '.join(configs.names())}")
    if name.startswith("tiny"):
        return _tiny_run(name)
    if name.startswith("small"):
        return _small_run(name)
    return _paper_run(name)


class DropCounts:
    """What full buckets dropped (`training.DROP_COUNTERS`), added up on the device every
    step (one small asynchronous add, no host round trip) and read at logging steps.

    `take()` returns the sums since the previous `take()`; `totals` since the start of
    this process's training (a resumed run starts from zero).
    """

    def __init__(self):
        self.pending: dict | None = None
        self.totals: dict[str, int] = {}
        self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))

    def add(self, metrics: dict) -> None:
        counts = {k: v for k, v in metrics.items() if training.is_drop_counter(k)}
        if counts:
            self.pending = counts if self.pending is None else self._add(self.pending, counts)

    def take(self) -> dict[str, int]:
        counts = {k: int(v) for k, v in jax.device_get(self.pending or {}).items()}
        self.pending = None
        for k, v in counts.items():
            self.totals[k] = self.totals.get(k, 0) + v
        return counts


class Throughput:
    """Training steps timed without the first (compilation) and without validation.

    `rate(done)` gives the tokens/s of the steps since the previous call (the logged
    `tokens_per_s`: a slow-down shows at once, instead of melting into an average since
    step 1); `mean()` the tokens/s of every timed step (the summary's).
    """

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.mark: tuple[float, int] | None = None  # (time, step) while the clock runs
        self.interval = self.total = (0.0, 0)  # (seconds, steps)

    def go(self, done: int) -> None:
        self.mark = (time.perf_counter(), done)

    def pause(self, done: int) -> None:
        if self.mark is not None:
            seconds, steps = time.perf_counter() - self.mark[0], done - self.mark[1]
            self.interval = (self.interval[0] + seconds, self.interval[1] + steps)
            self.total = (self.total[0] + seconds, self.total[1] + steps)
            self.mark = None

    def rate(self, done: int) -> float | None:
        running = self.mark is not None
        self.pause(done)
        (seconds, steps), self.interval = self.interval, (0.0, 0)
        if running:
            self.go(done)
        return self.tokens_per_step * steps / seconds if steps and seconds > 0 else None

    def mean(self) -> float | None:
        seconds, steps = self.total
        return self.tokens_per_step * steps / seconds if steps and seconds > 0 else None


class MetricsWriter:
    """JSON lines (always) and TensorBoard events (when tensorboardX is installed)."""

    def __init__(self, workdir: pathlib.Path, enabled: bool):
        self.enabled = enabled
        self.file = open(workdir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:
                pass

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):  # per-expert loads stay in the JSON lines
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _peak_flops() -> float | None:
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The model side of a run, built from its config alone (no tokenizer, no data).

    Attributes:
      mesh: the device mesh.
      tables: the Engram table engine (None without Engram).
      shapes: the boxed variable shapes (`model.variable_shapes`), logical axes included.
      schedule: the learning-rate schedule.
      tx: the backbone optimizer.
      init: () -> a fresh `TrainState`, placed by `state_sharding` (`training.StateInit`:
        `init.dense` is the jitted program of all but the tables, which are made on the host).
      abstract_state: the state's shapes and dtypes (`init.abstract()`).
      state_sharding: the state's NamedShardings (memory kinds included).
      train_step: jitted `(state, batch) -> (state, metrics)`, the state donated.
      eval_step: jitted `(state, batch) -> metrics`.
    """

    mesh: jax.sharding.Mesh
    tables: Tables | None
    shapes: dict
    schedule: Callable
    tx: optax.GradientTransformation
    init: training.StateInit
    abstract_state: training.TrainState
    state_sharding: training.TrainState
    train_step: Callable
    eval_step: Callable

    def abstract_with_sharding(self) -> training.TrainState:
        """The state as ShapeDtypeStructs carrying their shardings: nothing allocated."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.abstract_state, self.state_sharding)


def build_steps(config: RunConfig, hasher: DeviceHasher | None = None, devices=None) -> Steps:
    """Mesh, tables, optimizer, abstract state, shardings and the jitted steps of `config`.

    Nothing is allocated: shapes come from `jax.eval_shape`, and the steps are jitted
    but neither traced nor compiled until first called (or lowered).

    Args:
      config: the run.
      hasher: hashes tokens inside the step (`EngramConfig.hash_on_device`); None when
        the batches carry hash ids.
      devices: the mesh's devices (default: all of them).
    """
    mesh = sharding.make_mesh(config.mesh, devices)
    tables = make_tables(config, mesh)
    shapes = model.variable_shapes(config.model, mesh)
    axes = sharding.logical_axes(shapes)
    schedule = optim.schedule(config.optim, config.steps)
    tx = optim.build_optimizer(config.optim, axes["params"], config.steps)

    rng = jax.random.key(config.seed)
    abstract_state = training.StateInit(config.model, tx, tables, rng, mesh).abstract()
    state_sharding = _state_sharding(mesh, shapes, axes, abstract_state, tables)
    init = training.StateInit(config.model, tx, tables, rng, mesh, state_sharding)
    bias_rate = config.model.moe.bias_update_rate if config.model.moe else 0.0
    train_step, eval_step = training.jit_steps(
        config.model, tx, tables, schedule, bias_rate,
        table_lr_multiplier=config.optim.table_lr_multiplier, clip_norm=config.optim.clip_norm,
        state_sharding=state_sharding, batch_sharding=sharding.batch_sharding(mesh), hasher=hasher, mesh=mesh)
    return Steps(mesh=mesh, tables=tables, shapes=shapes, schedule=schedule, tx=tx, init=init,
                 abstract_state=abstract_state, state_sharding=state_sharding, train_step=train_step,
                 eval_step=eval_step)


def _state_sharding(mesh, shapes: dict, axes: dict, abstract_state: training.TrainState,
                    tables: Tables | None) -> training.TrainState:
    """Params and optimizer moments follow the params' logical axes; tables their
    placement; scalars replicate."""
    params = sharding.tree_shardings(mesh, axes["params"], nn.unbox(shapes)["params"])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt = sharding.like_params(abstract_state.opt_state, params, replicated)  # moments follow params
    bias = jax.tree.map(lambda _: replicated, abstract_state.moe_bias)
    table_shardings = tables.shardings() if tables else abstract_state.tables
    return training.TrainState(step=replicated, params=params, moe_bias=bias, opt_state=opt,
                               tables=table_shardings)


class Run:
    """What a run needs besides the state: tokenizer, hasher, mesh, optimizer, data."""

    def __init__(self, config: RunConfig, workdir: pathlib.Path):
        self.config, self.workdir = config, workdir
        # Built on process 0 and sent to the others; then every process's data is checked alike.
        self.tokenizer = data.shared_tokenizer(config.data)
        vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab > config.model.vocab_size:
            raise ValueError(f"the tokenizer has {vocab} ids but model.vocab_size is {config.model.vocab_size}; "
                             f"set --set model.vocab_size={vocab}")
        self.hasher = compression = None
        if config.model.engram is not None:
            compression = data.shared_compression(self.tokenizer, config.data.cache_root)
            log.info("tokenizer compression: %d -> %d ids (%.1f%% fewer)", compression.vocab_size,
                     compression.num_compressed, 100 * compression.ratio)
            self.hasher = config.model.engram.make_hasher(compression.lookup)
        data.check_same_data(config.data, self.tokenizer, compression)
        # With hash_on_device the pipeline carries tokens only and the step hashes them.
        on_device = config.model.engram is not None and config.model.engram.hash_on_device
        self.device_hasher = self.hasher.on_device() if on_device else None
        self.pipeline_hasher = None if on_device else self.hasher
        self.validation = Validation(config, self.tokenizer, self.pipeline_hasher)
        self.steps = steps = build_steps(config, self.device_hasher)
        self.mesh, self.tables, self.tx, self.schedule = steps.mesh, steps.tables, steps.tx, steps.schedule
        self._init, self.abstract_state, self.state_sharding = steps.init, steps.abstract_state, steps.state_sharding
        self.train_step, self.eval_step = steps.train_step, steps.eval_step

    def init_state(self) -> training.TrainState:
        return self._init()

    def abstract_with_sharding(self) -> training.TrainState:
        return self.steps.abstract_with_sharding()

    def batches(self, split: str, num_batches: int | None = None):
        """A Grain iterator of this process's batches of `split`."""
        return data.Pipeline(self.config.data, self.tokenizer, self.pipeline_hasher, split).iterator(num_batches)

    def evaluate(self, state) -> dict:
        """Validation metrics of `state` (the same function `engram-eval` runs)."""
        return self.validation.metrics(lambda batch: self.eval_step(state, batch), self.mesh)


def train(config: RunConfig, workdir: str | pathlib.Path | None = None, *,
          stop_after: int | None = None) -> dict:
    """Trains (or resumes) a run; returns the final metrics, the checkpoint path,
    `dropped`: what full buckets dropped over this call's steps (`DropCounts`), and
    `tokens_per_s_mean` over its timed steps (`Throughput`; logged rates are per interval).

    The run holds `workdir`'s lock, and a SIGTERM or Ctrl-C stops it after the current
    step with a checkpoint (`stopped_by` in the result then names the signal); see
    train/preemption.py.

    Args:
      config: the run.
      workdir: the run folder; default `runs/<config.name>`.
      stop_after: end after this step (checkpointed) as if interrupted; a later call
        with the same config resumes exactly.
    """
    workdir = pathlib.Path(workdir or pathlib.Path("runs") / config.name).absolute()
    with preemption.guard(workdir) as (stop, _):
        return _train(config, workdir, stop_after, stop)


def _train(config: RunConfig, workdir: pathlib.Path, stop_after: int | None,
           stop: preemption.StopRequest) -> dict:
    lead = jax.process_index() == 0
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints, save_every=config.save_every)
    resume = checkpoints.latest_step() is not None
    if resume:  # before any work: a folder of another run is an error, not a restart
        check_resumable(checkpoints, config)
    run = Run(config, workdir)
    iterator = run.batches("train")
    if resume:
        try:
            state = restore_newest_intact(checkpoints, run.abstract_with_sharding(), iterator)
        except BaseException:
            iterator.close()
            checkpoints.close()
            raise
        log.info("resumed from %s at step %d", checkpoints.directory, int(state.step))
    else:
        state = run.init_state()
    if lead:
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
        (workdir / "tokenizer.json").write_text(run.tokenizer.to_str())

    writer = MetricsWriter(workdir, lead)
    start, end = int(state.step), config.steps if stop_after is None else min(config.steps, stop_after)
    flops = 3 * model.flops_per_token(config.model, config.data.seq_len)
    peak = _peak_flops()
    # A bar in terminals and notebooks; elsewhere (logs, CI) one plain line per logged step.
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    bar = tqdm(total=config.steps, initial=start, disable=not (lead and interactive), desc=config.name,
               dynamic_ncols=True, mininterval=2.0)
    final: dict = {}
    drops = DropCounts()
    batches = sharding.Prefetch(iterator, run.mesh)  # the next batches copy while a step runs
    clock = Throughput(config.tokens_per_step)  # runs from the end of the first step, which compiles
    stopped_by = None
    try:
        for step in range(start, end):
            batch = next(batches)
            state, metrics = run.train_step(state, batch)
            drops.add(metrics)
            done = step + 1
            if done % config.log_every == 0 or done == end:
                metrics = {k: np.asarray(v).tolist() for k, v in jax.device_get(metrics).items()}
                metrics.update(drops.take())  # every step's drops since the last log, not this step's
                tok_s = clock.rate(done)
                if tok_s is not None:
                    metrics["tokens_per_s"] = tok_s
                    if peak:
                        metrics["mfu"] = tok_s * flops / (peak * jax.device_count())
                writer.write(done, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics.get('tokens_per_s', 0):,.0f}")
                if lead and not interactive:
                    mfu = f", MFU {metrics['mfu']:.1%}" if "mfu" in metrics else ""
                    rate = (f"{metrics['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in metrics
                            else "tokens/s from the next log (this interval compiled)")
                    print(f"step {done}/{config.steps}: loss {metrics['loss']:.4f}, {rate}{mfu}", flush=True)
            if done == start + 1:
                jax.block_until_ready(state.step)
                clock.go(done)
            bar.update(1)
            if done % config.eval_every == 0 or done == config.steps:
                clock.pause(done)  # tokens/s counts training steps only
                final = run.evaluate(state)
                writer.write(done, final)
                if lead:
                    bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                            for k, v in final.items()))
            stopping = stop.reached(done) and done < end  # the same step on every process
            checkpoints.save(done, state, config.to_dict(), batches, force=done == end or stopping)
            if stopping:
                stopped_by = stop.signal_name
                break
            if clock.mark is None:
                clock.go(done)
    finally:
        iterator.close()
        bar.close()
        checkpoints.wait()
        writer.close()
    path = checkpoints.directory / str(checkpoints.latest_step())
    checkpoints.close()
    stopped = {"stopped_by": stopped_by} if stopped_by else {}
    mean = {"tokens_per_s_mean": clock.mean()} if clock.mean() is not None else {}
    return {"step": int(state.step), "checkpoint": str(path), "dropped": drops.totals, **mean, **stopped, **final}
