"""What a user sees around checkpoints: only the noise of a failed restore and of a
read-only folder is dropped, nothing else (end-to-end cases: tests/test_train.py)."""

import asyncio
import logging
import sys
import types

from engram_jax.checkpoint import Checkpoints, _quiet_reads_of_failed_restores


def unraisable(err: BaseException) -> types.SimpleNamespace:
    """What Python hands `sys.unraisablehook` for `err` (object None, as TensorStore's callbacks give)."""
    return types.SimpleNamespace(exc_type=type(err), exc_value=err, exc_traceback=err.__traceback__,
                                 err_msg=None, object=None)


def test_only_callbacks_on_a_closed_event_loop_are_dropped(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    _quiet_reads_of_failed_restores()
    _quiet_reads_of_failed_restores()  # installed once, however many restores fail
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)  # what a read finishing after a failed restore does
    except RuntimeError as err:
        late = unraisable(err)
    try:
        raise RuntimeError("Event loop is closed")  # same text, raised elsewhere: a real error
    except RuntimeError as err:
        elsewhere = unraisable(err)
    other = unraisable(ValueError("boom"))
    for args in (late, elsewhere, other):
        sys.unraisablehook(args)
    assert seen == [elsewhere, other]


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_read_only_notice_alone_is_silenced(tmp_path):
    absl = logging.getLogger("absl")
    records = Records()
    absl.addHandler(records)
    try:
        Checkpoints(tmp_path, read_only=True).close()
        absl.warning("Given directory is writable, another warning")
    finally:
        absl.removeHandler(records)
    assert not any("read only" in m for m in records.messages)
    assert "Given directory is writable, another warning" in records.messages
