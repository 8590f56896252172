"""One writer per run folder: an advisory lock on `<workdir>/lock`, held for a run's life.

`fcntl.flock` locks belong to the open file, so the operating system drops the lock when
the holding process exits in any way (kill -9, a crash, a preempted VM): no stale lock
ever blocks a rerun, and nothing has to be cleaned. The file keeps the holder's host,
pid and start time for the message a second run prints.

In a multi-process run only process 0 takes the lock (on a shared file system the
other hosts may not even see the same lock table), then tells every process whether it
got it, so that a second run's processes all stop, not process 0 alone. The processes
of one run therefore share the folder without contending for it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import socket

LOCK_NAME = "lock"


class WorkdirInUse(RuntimeError):
    """Another run holds the folder."""


class WorkdirLock:
    """The lock on `workdir` (taken by `acquire`, dropped by `release` or by the process ending)."""

    def __init__(self, workdir: pathlib.Path):
        self.path = pathlib.Path(workdir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirInUse naming the holder (on every process)."""
        import jax  # here: train/main.py imports this module before JAX may start

        holder = self._try_lock() if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            busy = multihost_utils.broadcast_one_to_all(np.int32(holder is not None))
            if busy and holder is None:
                holder = "another run (process 0 of this run found its lock)"
        if holder is not None:
            raise WorkdirInUse(f"{self.path.parent} is in use by {holder}; wait for it to end or use another "
                               f"--workdir (the lock, {self.path}, goes when that process exits)")

    def _try_lock(self) -> str | None:
        """None once locked; else a description of the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return _describe_holder(self.path)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (info + "\n").encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # no holder named once it is free
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _describe_holder(path: pathlib.Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"the run of host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder locked but has not written yet
        return "another run (its details are not written yet)"
