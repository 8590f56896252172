"""What a run does about the world ending it: preemption notices, other runs, failures.

- `StopRequest`: SIGTERM (a Cloud TPU spot VM's preemption notice, about 30 s ahead) or
  a first Ctrl-C asks the run to stop after the current step with a checkpoint at a
  step every process agrees on; a second Ctrl-C ends the process at once.
- `LibraryLog`: Orbax's, TensorStore's and asyncio's warnings and tracebacks go to a
  log file in the run folder, so that the terminal shows one line per failure.
- `guard(workdir)`: both, plus the workdir lock and the removal of unfinished
  checkpoint folders, around a training run.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pathlib
import shutil
import signal
import sys
import threading
import traceback

import jax

from engram_jax.checkpoint import TMP_MARK
from train.workdir_lock import WorkdirLock

log = logging.getLogger("engram_jax.train")

LOG_NAME = "engram-train.log"
# Loggers whose records are the libraries' business: kept in the log file, off the terminal.
# "py.warnings": Python warnings while a run is routed (`logging.captureWarnings`), such as
# a failed save's coroutines that are never awaited, reported when the process ends.
LIBRARY_LOGGERS = ("absl", "orbax", "asyncio", "tensorstore", "grain", "py.warnings")


def _distributed() -> bool:
    from jax._src import distributed

    return distributed.global_state.client is not None


class StopRequest:
    """SIGTERM and the first Ctrl-C ask for a stop; `reached(step)` says when to stop.

    With `jax.distributed` initialized the decision is JAX's preemption sync point: JAX
    catches SIGTERM itself (its preemption notifier) and tells every process, which agree
    on the first step that all of them can still reach; a Ctrl-C on one process is passed
    to that notifier as a SIGTERM. A single process decides alone: the step in progress
    when the signal came. Handlers can only be installed from the main thread; elsewhere
    signals keep their usual effect.
    """

    def __init__(self):
        self.received: str | None = None
        self.distributed = _distributed()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
            if not self.distributed:  # JAX's notifier owns SIGTERM there
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_sigterm(self, signum, frame) -> None:
        self._notice("SIGTERM")

    def _on_sigint(self, signum, frame) -> None:
        # The second Ctrl-C gets the default action: the process ends at once, mid-step or
        # mid-save. That is as safe as kill -9: the last finished checkpoint stays, and an
        # unfinished one is removed on the next start.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        self._notice("SIGINT", " (Ctrl-C again to abort now)")
        if self.distributed:
            os.kill(os.getpid(), signal.SIGTERM)

    def _notice(self, name: str, more: str = "") -> None:
        self.received = self.received or name
        print(f"engram-train: {name}: finishing this step, then saving a checkpoint{more}", file=sys.stderr,
              flush=True)

    def reached(self, step: int) -> bool:
        """Whether to stop after `step` (finished); every process gets the same answer."""
        if self.distributed:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.received is not None

    @property
    def signal_name(self) -> str:
        return self.received or "a preemption notice"


class _QuietFileHandler(logging.FileHandler):
    """A file handler that says nothing when it cannot write: the disk may be the one that is full."""

    def handleError(self, record) -> None:  # noqa: N802 (logging's name)
        pass

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            super().flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            super().close()


# Where exceptions that Python cannot raise go, once a LibraryLog was entered (see _unraisable).
_unraisable_log: list[pathlib.Path] = []


def _unraisable(unraisable) -> None:
    """Appends an unraisable exception to the latest run's log file.

    Kept installed after the run: a failed save's or restore's last callbacks and
    coroutines end later, some at interpreter exit, when most of Python is gone; then
    they are dropped rather than printed.
    """
    try:
        text = "".join(traceback.format_exception(unraisable.exc_type, unraisable.exc_value,
                                                  unraisable.exc_traceback))
        with open(_unraisable_log[-1], "a") as f:
            f.write(f"unraisable exception ({unraisable.err_msg or 'ignored'}):\n{text}")
    except Exception:  # noqa: BLE001, S110 (shutting down, or the disk is full: nowhere to say it)
        pass


# The handler a finished run left on the asyncio logger (see LibraryLog.__exit__).
_asyncio_left: list[logging.Handler] = []


class LibraryLog:
    """Library records and tracebacks to `path` instead of the terminal (while entered;
    asyncio's until the process ends or another run starts, see `__exit__`).

    The records of `LIBRARY_LOGGERS` stop propagating to the terminal's handlers; our own
    `engram_jax` lines are copied to the file too, so that it reads in order. Exceptions
    Python cannot raise anywhere (`sys.unraisablehook`: callbacks of a failed restore's
    other reads, a failed save's coroutines) are appended to the file, also after the
    run. `exception()` adds a traceback.
    """

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.handler = _QuietFileHandler(path, delay=True)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self._saved: dict[str, bool] = {}

    def __enter__(self) -> LibraryLog:
        while _asyncio_left:  # an earlier run's handler, left for late task reports: this run's takes over
            left = _asyncio_left.pop()
            logging.getLogger("asyncio").removeHandler(left)
            left.close()
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            self._saved[name] = logger.propagate
            logger.propagate = False
            logger.addHandler(self.handler)
        logging.getLogger("engram_jax").addHandler(self.handler)
        logging.captureWarnings(True)
        _unraisable_log.append(self.path)
        sys.unraisablehook = _unraisable
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            # A failed save or restore leaves tasks that report their errors when collected,
            # after the run: they go to the file too (a command line ends soon after).
            self.handler.flush()
            return
        # A restore that failed during the run (a checkpoint set aside) leaves asyncio tasks
        # whose errors are reported when they are collected: collect them now, and keep
        # asyncio's records in the file for the rest of the process, for any collected later.
        gc.collect()
        for name, propagate in self._saved.items():
            if name != "asyncio":
                logging.getLogger(name).removeHandler(self.handler)
                logging.getLogger(name).propagate = propagate
        logging.getLogger("engram_jax").removeHandler(self.handler)
        logging.captureWarnings(False)
        self.handler.flush()
        _asyncio_left.append(self.handler)

    def exception(self, err: BaseException) -> None:
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        self.handler.emit(logging.LogRecord("engram_jax.train", logging.ERROR, __file__, 0, text, None, None))


def remove_unfinished_checkpoints(directory: pathlib.Path) -> None:
    """Deletes step folders that a save interrupted mid-way left behind, and says so.

    Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it when
    complete, so such a folder is never a checkpoint: its step is saved again.
    """
    left = sorted(p for p in directory.iterdir() if TMP_MARK in p.name) if directory.is_dir() else []
    if left and jax.process_index() == 0:
        for path in left:
            shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %d unfinished checkpoint folder(s) left by an interrupted save: %s", len(left),
                    ", ".join(p.name for p in left))
    if jax.process_count() > 1:  # every process, whatever it sees, so that none waits alone
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("engram_jax removed unfinished checkpoints")


@contextlib.contextmanager
def guard(workdir: pathlib.Path):
    """Around a training run in `workdir` (created): the lock, the log file, stop requests.

    Yields `(StopRequest, LibraryLog)`. An exception leaving the run is written, with its
    traceback, to the log file before it goes on to the caller.
    """
    workdir.mkdir(parents=True, exist_ok=True)  # every process writes its own log file here
    lock = WorkdirLock(workdir)
    lock.acquire()
    name = LOG_NAME if jax.process_count() == 1 else f"engram-train.{jax.process_index()}.log"
    try:
        with LibraryLog(workdir / name) as library, StopRequest() as stop:
            remove_unfinished_checkpoints(workdir / "checkpoints")
            try:
                yield stop, library
            except BaseException as err:
                library.exception(err)
                raise
    finally:
        lock.release()
