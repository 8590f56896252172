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
Problems (no checkpoint, one written by another model config or by an engram-jax whose
tables were plain parameters) raise `CheckpointError` with the path and the reason; a
step that cannot be read (corrupt or truncated files) raises its subclass
`UnreadableCheckpoint`, so that callers can turn to another step (`set_aside` moves the
bad one out of Orbax's sight, keeping it on disk).
"""

from __future__ import annotations

import errno
import logging
import pathlib
import re
import shutil
import sys
import traceback
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from engram_jax import data

MODEL, OPT, DATA, CONFIG = "model", "opt", "data", "config"
# In the name of a step folder Orbax is still writing (renamed to `<step>` once complete).
TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint."""


class SaveFailed(CheckpointError):
    """A save that did not reach the disk: one line with the step, the cause and where a rerun resumes."""


class UnreadableCheckpoint(CheckpointError):
    """A step whose files cannot be read (corrupt or truncated), with `step`, `path` and `reason`."""

    def __init__(self, step: int, path: pathlib.Path, reason: str):
        super().__init__(f"{path} cannot be read: {reason}")
        self.step, self.path, self.reason = step, path, reason


def _describe(err: BaseException, limit: int = 600) -> str:
    """One line: `err` and the exceptions that caused it, without TensorStore's spec dumps."""
    parts: list[str] = [type(err).__name__]
    while err is not None and len(parts) < 4:
        text = " ".join(re.split(r" \[tensorstore_spec|\. See full TensorStore details", str(err))[0].split())
        if text and not any(text in part for part in parts[1:]):
            parts.append(text)
        err = err.__cause__
    line = ": ".join(parts)
    return line if len(line) <= limit else line[: limit // 2] + " ... " + line[-limit // 2:]


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# Orbax warns (absl) about every read-only manager; evaluation opens them so on purpose.
_READ_ONLY_NOTICE = _DropMessage("Given directory is read only")


def _closed_loop_callback(unraisable) -> bool:
    """Whether an unraisable error is a callback meeting an event loop that is already closed."""
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        return False
    frames = [frame.name for frame in traceback.extract_tb(unraisable.exc_traceback)]
    return frames[-2:] == ["call_soon_threadsafe", "_check_closed"]


def _quiet_reads_of_failed_restores() -> None:
    """Drops the "Event loop is closed" tracebacks that a failed restore leaves behind.

    Orbax runs a restore on a fresh asyncio loop and closes the loop as soon as one read
    fails. TensorStore finishes the other reads later, on its own threads, and each
    done-callback then calls `call_soon_threadsafe` on the closed loop: Python prints
    the RuntimeError as unraisable, dozens of tracebacks after the one error that
    matters (which the caller has already received). Only that exception, raised from
    that call, is dropped; every other one reaches the previous hook. Installed before
    the first restore (the loop is closed before the error reaches us) and kept, since
    the callbacks come late.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable) -> None:
        if not _closed_loop_callback(unraisable):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


def _no_space(err: BaseException | None) -> bool:
    """Whether `err` or a cause of it is a full file system (Python's ENOSPC or TensorStore's text of it)."""
    while err is not None:
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _written_file(err: BaseException | None) -> str | None:
    """The file a failed write names (TensorStore's "Failed writing: "<file>"" or an OSError's)."""
    while err is not None:
        if isinstance(err, OSError) and err.filename:
            return str(err.filename)
        found = re.search(r'(?:Failed writing:|Error writing local file) "([^"]+)"', str(err))
        if found:
            return found.group(1)
        err = err.__cause__ or err.__context__
    return None


def _size(n: float) -> str:
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} bytes" if i == 0 else f"{n:.1f} {units[i]}"


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
            logging.getLogger("absl").addFilter(_READ_ONLY_NOTICE)  # added once: filters are a set
            options = ocp.CheckpointManagerOptions(max_to_keep=None, save_interval_steps=0, create=False,
                                                   read_only=True)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._in_flight: tuple[int, int] | None = None  # (step, bytes) of the last save started
        self._failure: SaveFailed | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, config: dict, data_iterator=None, *, force: bool = False) -> bool:
        """Saves (asynchronously) when `step` is due or `force`; returns whether it did.

        Raises SaveFailed when this save, or the one before it (still being written), fails.
        """
        if not (force or self.manager.should_save(step)):
            return False
        self.wait()  # Orbax waits for the previous save anyway: its failure is reported under its own step
        items = {MODEL: ocp.args.StandardSave(_model_item(state)),
                 OPT: ocp.args.StandardSave({"dense": state.opt_state, "table_slots": state.tables.slots}),
                 CONFIG: ocp.args.JsonSave(config)}
        if data_iterator is not None:
            items[DATA] = data.checkpoint_args(data_iterator)
        self._in_flight = (step, sum(x.nbytes for x in jax.tree.leaves(state)))
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as err:
            self._failure = self._save_failed(err)
            raise self._failure from err

    def read_config(self, step: int | None = None) -> dict:
        """The run config saved with `step` (default: the latest)."""
        step = self.resolve(step)
        return self._restore(step, {CONFIG: ocp.args.JsonRestore()})[CONFIG]

    def check_config(self, current: dict, step: int | None = None, key: str = "model",
                     ignore: tuple[str, ...] = ()) -> None:
        """Raises CheckpointError if the saved config's `key` part differs from `current`'s.

        Args:
          ignore: dotted keys (`model.engram.placement`) that may differ.
        """
        diff = [line for line in config_differences(self.read_config(step).get(key), current.get(key), f"{key}.")
                if line.split(":")[0] not in ignore]
        if diff:
            more = f"\n  ... and {len(diff) - 6} more" if len(diff) > 6 else ""
            raise CheckpointError(f"{self.directory} holds a checkpoint of a different {key} config "
                                  "(use another --workdir):\n  " + "\n  ".join(diff[:6]) + more)

    def restore(self, abstract_state, step: int | None = None, data_iterator=None):
        """Restores the full train state (and the data iterator in place)."""
        step = self.resolve(step)
        # strict=False: tables take the padded row count of the current shards.
        items = {MODEL: ocp.args.StandardRestore(_model_item(abstract_state), strict=False),
                 OPT: ocp.args.StandardRestore({"dense": abstract_state.opt_state,
                                                "table_slots": abstract_state.tables.slots}, strict=False),
                 CONFIG: ocp.args.JsonRestore()}  # read too, so that a step is intact only if all of it reads
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
        step = self.resolve(step)
        return self._restore(step, {MODEL: ocp.args.StandardRestore(abstract_variables, strict=False)})[MODEL]

    def wait(self) -> None:
        """Blocks until the save in flight is on disk; raises SaveFailed if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            if self._in_flight is not None:
                self._failure = self._save_failed(err)
                raise self._failure from err
            if self._failure is not None:  # Orbax raises a failed save's error again: report it once, alike
                raise self._failure from None
            raise
        self._in_flight = None

    def _save_failed(self, err: Exception) -> SaveFailed:
        """The error of the save in flight, in one line; it is no longer in flight."""
        (step, needed), self._in_flight = self._in_flight, None
        cause = _describe(err)
        if _no_space(err):
            # TensorStore names the file in some of its errors; else the folder being written.
            written = _written_file(err) or next(
                (str(p) for p in self.directory.glob(f"{step}{TMP_MARK}*")), None)
            where = f" (writing {written})" if written else ""
            cause = (f"no space left on device{where}: the checkpoint's arrays need about {_size(needed)}, "
                     f"{_size(shutil.disk_usage(self.directory).free)} are free")
        intact = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and int(p.name) != step)
        resume = f"a rerun resumes from step {intact[-1]}" if intact else "a rerun starts from step 0"
        return SaveFailed(f"saving the checkpoint of step {step} in {self.directory / str(step)} failed: {cause}; "
                          f"{resume}")

    def close(self) -> None:
        self.manager.close()

    def set_aside(self, step: int) -> pathlib.Path:
        """Renames step folder `step` to `<step>.corrupt`, a name Orbax does not take for a step.

        The files stay on disk for inspection, but Orbax no longer counts the step: left
        in place, it would be the run's latest checkpoint, so Orbax would skip every save
        up to it and refuse to write that step again.
        """
        source = self.directory / str(step)
        target, n = source.with_name(f"{step}.corrupt"), 1
        while target.exists():  # set aside before, in an earlier fallback
            n += 1
            target = source.with_name(f"{step}.corrupt{n}")
        if jax.process_index() == 0:
            source.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"engram_jax set aside checkpoint {step}")
        self.manager.reload()
        return target

    def resolve(self, step: int | None) -> int:
        """`step`, checked to exist, or the latest step when None."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is None:
            return max(steps)
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; steps: {sorted(steps)}")
        return step

    def _restore(self, step: int, items: dict) -> dict:
        _quiet_reads_of_failed_restores()
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # corrupt files, shape or structure mismatch, missing items
            if self._tables_were_params(step):
                raise CheckpointError(
                    f"{self.directory}/{step} was written by an engram-jax whose Engram tables were model "
                    "parameters (params/.../engram/table/embedding); this version keeps them as table state "
                    "and cannot read it: evaluate it with engram-jax 0.1.0 or train again") from None
            raise UnreadableCheckpoint(step, self.directory / str(step), _describe(err)) from err

    def _tables_were_params(self, step: int) -> bool:
        """Whether `step` holds the old layout, a table inside the parameters."""
        metadata = self.directory / str(step) / MODEL / "_METADATA"
        try:
            text = metadata.read_text()
        except (OSError, UnicodeDecodeError):  # missing, or corrupt itself
            return False
        return '"table"' in text and '"tables"' not in text


def _model_item(state) -> dict:
    """What inference needs: parameters, balancing biases and the tables' rows."""
    return {"params": state.params, "moe_bias": state.moe_bias, "tables": state.tables.rows}
