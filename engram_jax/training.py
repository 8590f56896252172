"""The train state and the pure, jit-compiled train and eval steps.

State is one pytree: parameters, the Engram tables with their per-row optimizer slots
(`table.TableState`), the dense optimizer state, the MoE balancing biases and the
step. `train_step(state, batch) -> (state, metrics)` has one code path; where arrays
live (devices, host memory, data parallelism) is decided by the shardings the caller
jits it with and by the table engine's placement, never by branches here:

    memory = lookup(tables, hash_ids)                    only the addressed rows move
    loss, (g_params, g_memory) = value_and_grad(...)
    pushed = push(hash_ids, g_memory)                    row gradients to their owners
    scale  = clip(|g_params|, |pushed|)                  one global norm
    params = optax update;  tables = row optimizer on the pushed rows only

A batch is `{"inputs": [B, T], "targets": [B, T], "hash_ids": {layer: [B, T, H]}}`.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from engram_jax import model as model_lib
from engram_jax.hashing_device import DeviceHasher
from engram_jax.model import Model, ModelConfig
from engram_jax.moe import update_bias
from engram_jax.optim import clip_scale
from engram_jax.table import Tables, TableState


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: number of updates applied (int32 scalar).
      params: model parameters (the Engram tables are in `tables`).
      moe_bias: per-expert selection biases of every MoE layer (the `moe_bias`
        collection), nudged toward balanced load after each step; not trained by
        gradients (DeepSeek-V3's auxiliary-loss-free balancing).
      opt_state: the backbone optimizer's state.
      tables: the Engram tables and their row-optimizer slots (empty without Engram).
    """

    step: jax.Array
    params: Any
    moe_bias: Any
    opt_state: Any
    tables: TableState


def init_dense(config: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array,
               mesh: Mesh | None = None) -> TrainState:
    """A fresh state but for the Engram tables (left empty): pure and jittable.

    `mesh`: the train step's (expert kernels are stored padded for its `expert` axis).
    """
    variables = nn.unbox(model_lib.init_variables(config, rng, mesh))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, moe_bias=variables.get("moe_bias", {}),
                      opt_state=tx.init(params), tables=TableState(rows={}, slots={}))


class StateInit:
    """Makes fresh train states where they live.

    The dense part (parameters, optimizer state, biases) is one jitted program with
    `out_shardings`, so each device computes only its own shards; the Engram tables are
    made shard by shard on the host (`Tables.create`), so that no device program holds
    a table-sized temporary, whatever the placement. `init()` returns the state.

    Args:
      config, tx, tables: the model, the backbone optimizer, the table engine (or None).
      rng: the run's key; split into the model's and the tables'.
      mesh: the train step's mesh (expert parallelism).
      sharding: the state's shardings (a `TrainState` of NamedSharding); None: default.
    """

    def __init__(self, config: ModelConfig, tx: optax.GradientTransformation, tables: Tables | None,
                 rng: jax.Array, mesh: Mesh | None = None, sharding: TrainState | None = None):
        self.tables = tables
        self.model_rng, self.table_rng = jax.random.split(rng)
        self._init_dense = functools.partial(init_dense, config, tx, mesh=mesh)
        empty = TableState(rows={}, slots={})
        self.dense = jax.jit(self._init_dense,
                             out_shardings=sharding.replace(tables=empty) if sharding is not None else None)

    def __call__(self) -> TrainState:
        state = self.dense(self.model_rng)
        if self.tables is None:
            return state
        return state.replace(tables=self.tables.create(self.table_rng))

    def abstract(self) -> TrainState:
        """Shapes and dtypes of the state (the tables' with their shardings); nothing allocated."""
        state = jax.eval_shape(self._init_dense, self.model_rng)
        return state.replace(tables=self.tables.abstract_state()) if self.tables is not None else state


def _module_values(tree: dict, name: str) -> dict[tuple[str, ...], jax.Array]:
    """{module path: array} of the sown intermediate `name` (its first sow per module)."""
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        if name in keys:
            found[keys[: keys.index(name)]] = leaf
    return found


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross entropy in nats: logits [B, T, V], targets [B, T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def chunked_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """`cross_entropy` of the logits hidden @ kernel, computed `chunk` time steps at a time.

    A scan over time chunks whose body is rematerialised: the float32 logits of one
    chunk, [B, chunk, V], are all that exists at a time, forward and backward (each
    chunk's are computed twice: one more LM-head matmul). Time, not batch, is chunked
    so that the batch keeps its sharding. A last partial chunk is padded and masked.

    Args:
      hidden: [B, T, D] final hidden states; kernel: [D, V] the LM head (both in the
        dtype the head computes in: `Model(..., return_hidden=True)`).
      targets: [B, T] integer next tokens.
      chunk: time steps per chunk; 0 (or >= T) computes all logits at once.

    Returns:
      The mean loss over the B x T tokens, a float32 scalar.
    """
    b, t, d = hidden.shape
    chex.assert_shape(targets, (b, t))
    chex.assert_shape(kernel, (d, None))
    if not chunk or chunk >= t:
        return cross_entropy(model_lib.logits_of(hidden, kernel), targets)
    n = -(-t // chunk)
    pad = n * chunk - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, B, C, D]
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, C]
    valid = (jnp.arange(n * chunk) < t).reshape(n, 1, chunk)  # [n, 1, C]

    @jax.checkpoint  # inside a scan: no CSE can undo it, so no barrier is needed
    def body(total, xs):
        h, y, keep = xs  # [B, C, D], [B, C], [1, C]
        losses = optax.softmax_cross_entropy_with_integer_labels(model_lib.logits_of(h, kernel), y)  # [B, C]
        return total + jnp.sum(jnp.where(keep, losses, 0.0)), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden, targets, valid))
    return total / (b * t)


def forward(config: ModelConfig, params, moe_bias, batch, memory, mesh: Mesh | None = None,
            engram_off: tuple[int, ...] = ()) -> tuple[jax.Array, dict]:
    """Loss and the sown intermediates (gates, expert loads) of one batch.

    The loss never holds all [B, T, V] logits: `chunked_cross_entropy`, chunks of
    `config.loss_chunk` time steps.

    Args:
      batch: "inputs", "targets" and, for packed documents, "segment_ids" and "positions".
      memory: `{layer: [B, T, d_mem]}` the looked-up memory vectors (`Tables.lookup`).
      mesh: the step's mesh, for expert parallelism (None: one program, GSPMD).
      engram_off: Engram layers whose output is zeroed (`Model.engram_off`; evaluation).
    """
    (hidden, kernel), state = Model(config, mesh, engram_off).apply(
        {"params": params, "moe_bias": moe_bias}, batch["inputs"], memory, batch.get("segment_ids"),
        batch.get("positions"), return_hidden=True, mutable=["intermediates"])
    loss = chunked_cross_entropy(hidden, kernel, batch["targets"], config.loss_chunk)
    return loss, state.get("intermediates", {})


def hash_ids_of(batch: dict, hasher: DeviceHasher | None) -> dict:
    """The batch's hash ids: from the input pipeline, or hashed here from its tokens."""
    if batch.get("hash_ids") or hasher is None:
        return batch.get("hash_ids", {})
    return hasher(batch["inputs"])


def lookup(tables: Tables | None, rows, batch, dtype=jnp.float32, hasher: DeviceHasher | None = None,
           salt: jax.Array | int = 0) -> tuple[dict, dict]:
    """The batch's memory vectors and the lookup's counters (nothing without Engram)."""
    if tables is None:
        return {}, {}
    return tables.lookup(rows, hash_ids_of(batch, hasher), dtype, salt=salt)


def _per_layer(intermediates: dict, name: str) -> dict[int, jax.Array]:
    """{layer: value} of a sown intermediate, the values of nn.scan's stacked blocks
    (a leading axis of layers) unstacked."""
    out = {}
    for path, value in _module_values(intermediates, name).items():
        layers = model_lib.layers_of(path[0])
        if path[0].startswith("blocks_"):  # stacked: [L, ...]
            out.update({layer: value[i] for i, layer in enumerate(layers)})
        else:
            out[layers[0]] = value
    return out


def _summaries(intermediates: dict) -> dict[str, jax.Array]:
    """Per MoE layer the experts' shares of the routed slots and the largest share x E
    (1 is balanced); per Engram layer the mean gate. Named by layer (`block_5`),
    whether or not the block was stacked by nn.scan."""
    out = {}
    for layer, load in _per_layer(intermediates, "expert_load").items():
        out[f"moe_load/block_{layer}"] = load
        out[f"moe_load_max/block_{layer}"] = load.max() * load.shape[0]
    for layer, dropped in _per_layer(intermediates, "moe_dropped").items():
        out[f"moe_dropped/block_{layer}"] = dropped
    for layer, gate in _per_layer(intermediates, "gate").items():
        out[f"engram_gate/block_{layer}"] = gate.mean()
    return out


def train_step(state: TrainState, batch: dict, *, config: ModelConfig, tx: optax.GradientTransformation,
               tables: Tables | None, lr_schedule: optax.Schedule, table_lr_multiplier: float,
               clip_norm: float, bias_rate: float, hasher: DeviceHasher | None = None,
               mesh: Mesh | None = None) -> tuple[TrainState, dict]:
    """One update: lookup, gradients, clipping, both optimizers, and the biases' balancing.

    Args:
      hasher: hashes the batch's tokens in the step when the batch has no hash ids
        (`EngramConfig.hash_on_device`).
      mesh: the step's mesh, for expert parallelism (see `forward`).
    """
    batch = {**batch, "hash_ids": hash_ids_of(batch, hasher)}
    memory, lookup_stats = lookup(tables, state.tables.rows, batch, salt=state.step)
    (loss, inter), (grads, g_memory) = jax.value_and_grad(
        lambda p, e: forward(config, p, state.moe_bias, batch, e, mesh), argnums=(0, 1), has_aux=True)(
        state.params, memory)
    squared = optax.tree.norm(grads, squared=True)
    table_state = state.tables
    if tables is not None:
        pushed = tables.push(batch["hash_ids"], g_memory, salt=state.step)
        squared = squared + tables.squared_norm(pushed)
    grad_norm = jnp.sqrt(squared)
    scale = clip_scale(grad_norm, clip_norm)
    if tables is not None:
        table_lr = table_lr_multiplier * lr_schedule(state.step)
        table_state = tables.apply(state.tables, pushed, table_lr, state.step, scale)
    grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loads = _module_values(inter, "expert_load")

    def nudge(path, bias):  # bias and load [E], or [L, E] for blocks stacked by nn.scan
        keys = tuple(getattr(k, "key", None) for k in path)
        update = functools.partial(update_bias, rate=bias_rate)
        for _ in range(bias.ndim - 1):  # each layer balances its own experts
            update = jax.vmap(update)
        return update(bias, loads[keys[:-1]])

    moe_bias = jax.tree_util.tree_map_with_path(nudge, state.moe_bias)
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr_schedule(state.step),
               **_summaries(inter), **_lookup_summaries(lookup_stats, batch)}
    return state.replace(step=state.step + 1, params=params, moe_bias=moe_bias, opt_state=opt_state,
                         tables=table_state), metrics


# Metrics that count what full buckets dropped: Engram lookups (token positions, distinct
# ids) and MoE dispatch (token copies). Per step values; callers add them up over steps.
DROP_COUNTERS = ("engram_dropped", "engram_dropped_ids", "moe_dropped")


def is_drop_counter(name: str) -> bool:
    """Whether the metric `name` (`<kind>/<layer>`) counts drops (a sum, not a level)."""
    return name.split("/")[0] in DROP_COUNTERS


def _lookup_summaries(stats: dict, batch: dict) -> dict:
    """Per Engram layer: token positions and distinct ids dropped by full lookup buckets
    (0 unless the capacity factor is too small), and the share of ids fetched after
    de-duplication on each device."""
    out = {}
    for key, value in stats.items():
        kind, layer = key.split("/")
        if kind == "engram_unique":
            out[f"engram_fetched/{layer}"] = value / batch["hash_ids"][int(layer)].size
        else:
            out[key] = value
    return out


def eval_step(params, moe_bias, rows, batch: dict, *, config: ModelConfig, tables: Tables | None,
              hasher: DeviceHasher | None = None, mesh: Mesh | None = None,
              engram_off: tuple[int, ...] = ()) -> dict:
    """Summed loss and token count of one batch (sum, so that batches average exactly),
    and what full buckets dropped (`DROP_COUNTERS`), so that validation reports it.

    Args:
      rows: `TableState.rows` (the optimizer slots are not needed).
      engram_off: Engram layers whose output is zeroed (`Model.engram_off`).
    """
    memory, stats = lookup(tables, rows, batch, hasher=hasher)
    loss, inter = forward(config, params, moe_bias, batch, memory, mesh, engram_off)
    tokens = batch["targets"].size
    drops = {k: v for k, v in stats.items() if is_drop_counter(k)}  # the MoE's are in the summaries
    return {"loss_sum": loss * tokens, "tokens": jnp.asarray(tokens, jnp.float32), **_summaries(inter), **drops}


def jit_steps(config: ModelConfig, tx: optax.GradientTransformation, tables: Tables | None,
              lr_schedule: optax.Schedule, bias_rate: float, *, table_lr_multiplier: float = 5.0,
              clip_norm: float = 1.0, state_sharding=None, batch_sharding=None, hasher: DeviceHasher | None = None,
              mesh: Mesh | None = None):
    """The train and eval steps, jitted once with explicit shardings; the state is donated.

    Args:
      tables: the table engine (None without Engram); its mesh is the steps' mesh.
      hasher: hashes batches that carry only tokens, in the step.
      mesh: the steps' mesh, for expert parallelism (None: GSPMD decides).

    Returns:
      (train(state, batch) -> (state, metrics), evaluate(state, batch) -> metrics).
    """
    train = jax.jit(functools.partial(train_step, config=config, tx=tx, tables=tables, lr_schedule=lr_schedule,
                                      table_lr_multiplier=table_lr_multiplier, clip_norm=clip_norm,
                                      bias_rate=bias_rate, hasher=hasher, mesh=mesh),
                    in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None),
                    donate_argnums=0)
    evaluate = jax.jit(lambda state, batch: eval_step(state.params, state.moe_bias, state.tables.rows, batch,
                                                      config=config, tables=tables, hasher=hasher, mesh=mesh),
                       in_shardings=(state_sharding, batch_sharding))
    return train, evaluate
