"""Orbax checkpoints over named sub-states.

Each step folder holds the items
- `model`: `{"params", "moe_bias", "tables"}`, all that inference needs: the Engram
  tables' rows are saved sharded, as they live;
- `opt`: `{"dense": the backbone optimizer's state, "table_slots": the tables' per-row
  optimizer slots}`;
- `data`: the Grain iterator's state, so a resumed run sees the batches it would have;
- `config`: the run config as JSON.
Evaluation restores `model` alone. Tables restore onto another device count or
placement: their padded row count depends on the number of shards, and the padding
rows (never addressed, always zero) are added or cut on restore. Nothing is pickled.
Problems (no checkpoint, a corrupt one, one written by another model config or by an
engram-jax whose tables were plain parameters) raise `CheckpointError` with the path
and the reason.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from engram_jax import data

MODEL, OPT, DATA, CONFIG = "model", "opt", "data", "config"


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint."""


def _short(value: Any) -> str:
    return "{...}" if isinstance(value, dict) else repr(value)


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """'key: saved -> current' lines for every differing config value (dotted keys)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        lines = []
        for k in sorted(set(saved) | set(current)):
            lines += config_differences(saved.get(k), current.get(k), f"{prefix}{k}.")
        return lines
    if saved == current:
        return []
    return [f"{prefix[:-1] or 'config'}: {_short(saved)} in the checkpoint, {_short(current)} now"]


class Checkpoints:
    """A folder of step checkpoints, saved every `save_every` steps, the last `keep` kept."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, save_every: int = 1,
                 read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint folder at {self.directory}")
        if read_only:  # nothing to keep or save (Orbax warns about any other value)
            options = ocp.CheckpointManagerOptions(max_to_keep=None, save_interval_steps=0, create=False,
                                                   read_only=True)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, config: dict, data_iterator=None, *, force: bool = False) -> bool:
        """Saves (asynchronously) when `step` is due or `force`; returns whether it did."""
        items = {MODEL: ocp.args.StandardSave(_model_item(state)),
                 OPT: ocp.args.StandardSave({"dense": state.opt_state, "table_slots": state.tables.slots}),
                 CONFIG: ocp.args.JsonSave(config)}
        if data_iterator is not None:
            items[DATA] = data.checkpoint_args(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def read_config(self, step: int | None = None) -> dict:
        """The run config saved with `step` (default: the latest)."""
        step = self._step(step)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
        except Exception as err:  # orbax raises many types; name the path and the cause
            raise CheckpointError(f"cannot read the config of {self.directory}/{step}: {err}") from err

    def check_config(self, current: dict, step: int | None = None, key: str = "model") -> None:
        """Raises CheckpointError if the saved config's `key` part differs from `current`'s."""
        diff = config_differences(self.read_config(step).get(key), current.get(key), f"{key}.")
        if diff:
            more = f"\n  ... and {len(diff) - 6} more" if len(diff) > 6 else ""
            raise CheckpointError(f"{self.directory} holds a checkpoint of a different {key} config "
                                  "(use another --workdir):\n  " + "\n  ".join(diff[:6]) + more)

    def restore(self, abstract_state, step: int | None = None, data_iterator=None):
        """Restores the full train state (and the data iterator in place)."""
        step = self._step(step)
        # strict=False: tables take the padded row count of the current shards.
        items = {MODEL: ocp.args.StandardRestore(_model_item(abstract_state), strict=False),
                 OPT: ocp.args.StandardRestore({"dense": abstract_state.opt_state,
                                                "table_slots": abstract_state.tables.slots}, strict=False)}
        if data_iterator is not None:
            items[DATA] = data.restore_args(data_iterator)
        restored = self._restore(step, items)
        model, opt = restored[MODEL], restored[OPT]
        step_sharding = getattr(abstract_state.step, "sharding", None)  # as every other restored leaf
        tables = abstract_state.tables.replace(rows=model["tables"], slots=opt["table_slots"])
        return abstract_state.replace(step=jax.device_put(np.int32(step), step_sharding), params=model["params"],
                                      moe_bias=model["moe_bias"], opt_state=opt["dense"], tables=tables)

    def restore_model(self, abstract_variables: dict, step: int | None = None) -> dict:
        """Restores only `{"params", "moe_bias", "tables"}` (table rows, without their
        optimizer slots): no optimizer state is read."""
        step = self._step(step)
        return self._restore(step, {MODEL: ocp.args.StandardRestore(abstract_variables, strict=False)})[MODEL]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def _step(self, step: int | None) -> int:
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is None:
            return max(steps)
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; steps: {sorted(steps)}")
        return step

    def _restore(self, step: int, items: dict) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # corrupt files, shape or structure mismatch, missing items
            if self._tables_were_params(step):
                raise CheckpointError(
                    f"{self.directory}/{step} was written by an engram-jax whose Engram tables were model "
                    "parameters (params/.../engram/table/embedding); this version keeps them as table state "
                    "and cannot read it: evaluate it with engram-jax 0.1.0 or train again") from None
            raise CheckpointError(f"cannot restore {self.directory}/{step}: {type(err).__name__}: {err}") from err

    def _tables_were_params(self, step: int) -> bool:
        """Whether `step` holds the old layout, a table inside the parameters."""
        metadata = self.directory / str(step) / MODEL / "_METADATA"
        try:
            return '"table"' in metadata.read_text() and '"tables"' not in metadata.read_text()
        except OSError:
            return False


def _model_item(state) -> dict:
    """What inference needs: parameters, balancing biases and the tables' rows."""
    return {"params": state.params, "moe_bias": state.moe_bias, "tables": state.tables.rows}
