"""Optimizers (paper section 4.1): the backbone's from optax, the Engram tables' by row.

- Backbone parameters: AdamW, or Muon (`optax.contrib.muon`) on the weight matrices
  with AdamW for the rest, weight decay 0.1 on matrices; warmup then cosine or step
  decay. Which matrices Muon sees, and how, is decided from the parameters' logical
  axis names (`muon_dimensions`), so the train step never special-cases a parameter.
- Engram tables: not parameters but state of their own (`table.py`), updated row by
  row where they live by a `table_optim.RowOptimizer` (default lazy Adam) at 5x the
  backbone learning rate and no weight decay (the paper's "Engram optimizer").
Gradients are clipped by their global norm over both (`clip_scale`): the train step
scales the backbone's gradients and the tables' row gradients by the same factor.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from engram_jax.config_base import Config
from engram_jax.sharding import is_axes
from engram_jax.table_optim import ALGORITHMS, RowOptimizer

# Axes a kernel reads from (its matmul's reduction side) when they come first; see
# `muon_dimensions`. Kernels are laid out [inputs..., outputs...] throughout.
_EXPERTS, _EMBED = "experts", "embed"
# Leading axes that index a batch of matrices, in this order: blocks stacked by
# nn.scan (`model.LAYERS`), then the routed experts of a MoE.
_BATCH_AXES = ("layers", _EXPERTS)
# Moonlight (Liu et al. 2025, "Muon is scalable for LLM training"): Muon's orthogonalised
# update rescaled to RMS 0.2 x the learning rate, AdamW's typical update RMS, so that
# AdamW hyperparameters (the paper's 4e-4 and weight decay 0.1) carry over.
MOONLIGHT_RMS = 0.2
# DeepSeek LLM's multi-step schedule (Bi et al. 2024), cited by the paper: the learning
# rate drops to 31.6% after 80% of training and to 10% after 90%.
_STEP_DECAY = ((0.8, 0.316), (0.9, 0.1))


@dataclasses.dataclass(frozen=True)
class OptimConfig(Config):
    """Optimizer and learning-rate schedule.

    Attributes:
      algorithm: backbone optimizer, "adamw" or "muon".
      learning_rate: peak backbone learning rate.
      warmup_steps: linear warmup from 0.
      schedule: after warmup: "cosine" (to `min_lr_ratio`), "step" (DeepSeek's step
        decay) or "constant".
      min_lr_ratio: the cosine schedule's final fraction of the peak.
      weight_decay: decoupled weight decay of backbone matrices (paper: 0.1).
      b1, b2, eps: Adam moments and epsilon (also Muon's Adam fallback).
      muon_momentum: Muon's momentum.
      muon_rms: RMS of Muon's update over the learning rate, whatever the matrix's
        shape (Moonlight's 0.2, matching AdamW); 0 keeps optax's default scaling, an
        RMS of about 1 / sqrt(max(m, n)) for an m x n matrix.
      clip_norm: global gradient-norm clipping (backbone and tables together); 0
        disables it.
      table_algorithm: the tables' row optimizer: "lazy_adam", "adagrad", "sgd" or
        "adam" (dense; see `table_optim`).
      table_lr_multiplier: Engram tables' learning rate over the backbone's (paper: 5).
      table_weight_decay: Engram tables' weight decay (paper: 0).
    """

    algorithm: str = "adamw"
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    muon_momentum: float = 0.95
    muon_rms: float = MOONLIGHT_RMS
    clip_norm: float = 1.0
    table_algorithm: str = "lazy_adam"
    table_lr_multiplier: float = 5.0
    table_weight_decay: float = 0.0

    def validate(self) -> None:
        self.check(self.algorithm in ("adamw", "muon"), "algorithm", "must be 'adamw' or 'muon'")
        self.check(self.schedule in ("cosine", "step", "constant"), "schedule",
                   "must be 'cosine', 'step' or 'constant'")
        self.check(self.learning_rate > 0, "learning_rate", "must be > 0")
        self.check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self.check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        self.check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self.check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "b1", "b1 and b2 must be in [0, 1)")
        self.check(self.clip_norm >= 0, "clip_norm", "must be >= 0")
        self.check(self.muon_rms >= 0, "muon_rms", "must be >= 0 (0: optax's default scaling)")
        self.check(self.table_algorithm in ALGORITHMS, "table_algorithm", f"must be one of {', '.join(ALGORITHMS)}")
        self.check(self.table_lr_multiplier > 0, "table_lr_multiplier", "must be > 0")
        self.check(self.table_weight_decay >= 0, "table_weight_decay", "must be >= 0")


def schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """The backbone learning rate at each step."""
    peak, warmup = config.learning_rate, min(config.warmup_steps, max(total_steps - 1, 0))
    ramp = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    rest = max(total_steps - warmup, 1)
    if config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=config.min_lr_ratio)
    elif config.schedule == "step":
        after = optax.piecewise_constant_schedule(
            peak, {int(at * total_steps) - warmup: ratio / prev
                   for (at, ratio), prev in zip(_STEP_DECAY, (1.0,) + tuple(r for _, r in _STEP_DECAY))})
    else:
        after = optax.constant_schedule(peak)
    return optax.join_schedules([ramp, after], [warmup])


def muon_dimensions(names: tuple) -> optax.contrib.MuonDimensionNumbers | None:
    """How Muon sees a kernel as matrices, from its logical axes; None: use Adam.

    Leading `layers` (blocks stacked by nn.scan) and `experts` axes are a batch of
    matrices; what is left decides. A kernel that writes the model width
    (last axis `embed`, e.g. heads x head_dim -> embed) reduces over all its other
    axes; any other kernel reduces over its first axis (embed -> heads x head_dim).
    Vectors, the token embedding and the LM head (which touch the vocabulary) stay with
    Adam, as is usual for Muon. Muon sees every other kernel: attention and expert
    kernels, the router, the mHC maps, and Engram's fused value/key projection
    [d_mem, 1 + G, D] as one d_mem x (1 + G) D matrix.
    """
    names = tuple(names)
    if "vocab" in names:
        return None
    start = _batch_dims(names)
    axes = tuple(range(start, len(names)))
    if len(axes) < 2:
        return None
    if names[-1] == _EMBED and _EMBED not in names[start:-1] and "engram_slot" not in names:
        return optax.contrib.MuonDimensionNumbers(reduction_axis=axes[:-1], output_axis=axes[-1])
    return optax.contrib.MuonDimensionNumbers(reduction_axis=axes[0], output_axis=axes[1:])


def _batch_dims(names: tuple) -> int:
    """How many leading axes of a parameter index a batch of matrices (`_BATCH_AXES`)."""
    start = 0
    for axis in _BATCH_AXES:
        if names[start:start + 1] == (axis,):
            start += 1
    return start


def is_matrix(names: tuple) -> bool:
    """Whether a parameter is (a batch of) matrices: weight decay applies to these only,
    not to vectors such as norm scales, stacked [L, D] ones included."""
    names = tuple(names)
    return len(names) - _batch_dims(names) >= 2


def build_optimizer(config: OptimConfig, axes, total_steps: int) -> optax.GradientTransformation:
    """The backbone's optimizer (gradients arrive clipped: see `clip_scale`).

    Args:
      config: the optimizer config.
      axes: pytree of logical axis names, one tuple per parameter (`logical_axes`).
      total_steps: training length, for the schedule.
    """
    lr = schedule(config, total_steps)
    if config.algorithm != "muon":
        return optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                           mask=jax.tree.map(is_matrix, axes, is_leaf=is_axes))

    def muon(names):  # names: the axes tree the parameters (or their layers) have
        return optax.contrib.muon(
            lr, beta=config.muon_momentum, weight_decay=config.weight_decay,
            weight_decay_mask=jax.tree.map(is_matrix, names, is_leaf=is_axes),
            # Muon's Adam side (embeddings, LM head, vectors) takes an unmasked decay:
            # keep it at 0 so that norms and biases are never decayed.
            adam_b1=config.b1, adam_b2=config.b2, adam_weight_decay=0.0,
            muon_weight_dimension_numbers=jax.tree.map(muon_dimensions, names, is_leaf=is_axes),
            consistent_rms=config.muon_rms or None)

    stacked = jax.tree.map(lambda names: names[:1] == (_BATCH_AXES[0],), axes, is_leaf=is_axes)
    if not any(jax.tree.leaves(stacked)):
        return muon(axes)
    # Blocks stacked by nn.scan are updated one layer at a time: optax merges
    # a kernel's batch axes into one, and a replicated `layers` axis merged before a
    # sharded `experts` axis cannot stay sharded, so GSPMD gathers the whole stack
    # (measured: 74 GiB of temporaries per device for engram-27b on 8 devices).
    # One vmapped group per stacked module (runs of blocks differ in length).
    layer_axes = jax.tree.map(lambda names, s: names[1:] if s else names, axes, stacked, is_leaf=is_axes)
    labels = jax.tree_util.tree_map_with_path(lambda path, s: path[0].key if s else "single", stacked)
    per_layer = _per_layer(muon(layer_axes))
    groups = {label: per_layer for label in jax.tree.leaves(labels) if label != "single"}
    return optax.partition({"single": muon(axes), **groups}, labels)


def _per_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` on each layer of parameters stacked along their first axis: its state is
    stacked the same way (moments [L, ...] like the parameters, a step count per layer).
    All layers at once (vmap): a `lax.map` over them, whose loop copies the stacked
    inputs and outputs, measured 70 GiB of temporaries for engram-27b instead of 39."""

    def update(updates, state, params=None):
        return jax.vmap(inner.update)(updates, state, params)

    return optax.GradientTransformation(jax.vmap(inner.init), update)


def table_optimizer(config: OptimConfig) -> RowOptimizer:
    """The Engram tables' row optimizer (its learning rate: `table_lr_multiplier` x the schedule)."""
    return RowOptimizer(config.table_algorithm, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.table_weight_decay)


def clip_scale(norm: jax.Array, clip_norm: float) -> jax.Array:
    """The factor on every gradient that caps their global norm at `clip_norm` (0: none)."""
    if not clip_norm:
        return jnp.ones_like(norm)
    return jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))
