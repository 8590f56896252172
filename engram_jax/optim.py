"""Optimizers, built by one function from labelled parameter groups (paper section 4.1).

- `backbone`: AdamW, or Muon (`optax.contrib.muon`) on the weight matrices with AdamW
  for the rest, weight decay 0.1 on matrices; warmup then cosine or step decay.
- `table`: the Engram tables, with Adam at 5x the backbone learning rate and no weight
  decay (the paper's "Engram optimizer": Adam, LR x5, WD 0).
Gradients are clipped by global norm first. Groups are decided from the parameters'
logical axis names (a table is what has the axes `engram_rows`, `engram_dim`), so the
train step never special-cases a parameter by name.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from engram_jax.config_base import Config
from engram_jax.sharding import is_axes
from engram_jax.table import DIM, ROWS

TABLE, BACKBONE = "table", "backbone"
# Axes a kernel reads from (its matmul's reduction side) when they come first; see
# `muon_dimensions`. Kernels are laid out [inputs..., outputs...] throughout.
_EXPERTS, _EMBED = "experts", "embed"
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
      clip_norm: global gradient-norm clipping; 0 disables it.
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
    clip_norm: float = 1.0
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


def param_labels(axes) -> dict:
    """`table` for Engram tables, `backbone` for every other parameter.

    Args:
      axes: a pytree of logical axis-name tuples, one per parameter (`logical_axes`).
    """
    return jax.tree.map(lambda names: TABLE if tuple(names) == (ROWS, DIM) else BACKBONE, axes,
                        is_leaf=is_axes)


def muon_dimensions(names: tuple) -> optax.contrib.MuonDimensionNumbers | None:
    """How Muon sees a kernel as matrices, from its logical axes; None: use Adam.

    A leading `experts` axis is a batch of matrices. A kernel that writes the model width
    (last axis `embed`, e.g. heads x head_dim -> embed) reduces over all its other
    axes; any other kernel reduces over its first axis (embed -> heads x head_dim).
    Vectors, the token embedding and the LM head (which touch the vocabulary) and the
    Engram tables stay with Adam, as is usual for Muon.
    """
    names = tuple(names)
    if len(names) < 2 or "vocab" in names or names == (ROWS, DIM):
        return None
    start = 1 if names[0] == _EXPERTS else 0
    axes = tuple(range(start, len(names)))
    if len(axes) < 2:
        return None
    if names[-1] == _EMBED and _EMBED not in names[start:-1] and "engram_slot" not in names:
        return optax.contrib.MuonDimensionNumbers(reduction_axis=axes[:-1], output_axis=axes[-1])
    return optax.contrib.MuonDimensionNumbers(reduction_axis=axes[0], output_axis=axes[1:])


def build_optimizer(config: OptimConfig, axes, total_steps: int) -> optax.GradientTransformation:
    """The whole optimizer: clipping, then the backbone and table groups.

    Args:
      config: the optimizer config.
      axes: pytree of logical axis names, one tuple per parameter (`logical_axes`).
      total_steps: training length, for the schedule.
    """
    lr = schedule(config, total_steps)
    table_lr = lambda step: config.table_lr_multiplier * lr(step)  # noqa: E731
    matrices = jax.tree.map(lambda names: len(names) >= 2, axes, is_leaf=is_axes)
    if config.algorithm == "muon":
        backbone = optax.contrib.muon(
            lr, beta=config.muon_momentum, weight_decay=config.weight_decay, weight_decay_mask=matrices,
            # Muon's Adam side (embeddings, LM head, vectors) takes an unmasked decay:
            # keep it at 0 so that norms and biases are never decayed.
            adam_b1=config.b1, adam_b2=config.b2, adam_weight_decay=0.0,
            muon_weight_dimension_numbers=jax.tree.map(muon_dimensions, axes, is_leaf=is_axes))
    else:
        backbone = optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                               weight_decay=config.weight_decay, mask=matrices)
    table = optax.adamw(table_lr, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.table_weight_decay)
    parts = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
    parts.append(optax.multi_transform({BACKBONE: backbone, TABLE: table}, param_labels(axes)))
    return optax.chain(*parts)
