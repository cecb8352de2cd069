"""A test-only fault hook: `FERRYLINK_FAULT_POINT=<name>` makes the process SIGKILL itself
the first time it reaches `fault_point(<name>)`; with `FERRYLINK_FAULT_ACTION=stop` it
SIGSTOPs itself there instead (a frozen process: the test sends SIGCONT), once. With
`FERRYLINK_FAULT_MIN_BATCH=n`, only a passage in a batch of at least n events acts (a
batch's points pass their size): a crash inside a batch, whatever size the first one had.

Crash-point tests start a process per point and count, at the real destination, that every
file arrived exactly once after the crash and a restart; the fencing test freezes a primary
between a write and its commit. Unset (always, in production), `fault_point` is one string
comparison.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

FAULT_POINT_ENV = "FERRYLINK_FAULT_POINT"
FAULT_ACTION_ENV = "FERRYLINK_FAULT_ACTION"
_POINT = os.environ.get(FAULT_POINT_ENV, "")
FAULT_MIN_BATCH_ENV = "FERRYLINK_FAULT_MIN_BATCH"
_STOP = os.environ.get(FAULT_ACTION_ENV, "kill") == "stop"
_MIN_BATCH = int(os.environ.get(FAULT_MIN_BATCH_ENV, "1") or "1")
_reached = False


def fault_point(name: str, batch: int = 1) -> None:
    """The point `name`, passed by work on `batch` events at once."""
    global _reached
    if _POINT and name == _POINT and batch >= _MIN_BATCH and not _reached:
        _reached = True
        log.critical("fault point %s reached: %s", name, "SIGSTOP" if _STOP else "SIGKILL")
        for handler in logging.getLogger().handlers:
            handler.flush()
        if not _STOP:
            os.kill(os.getpid(), signal.SIGKILL)
            return
        # Stopped from this very thread, which then waits in a system call: a process-wide
        # SIGSTOP can take effect a few instructions late, past the point (seen under load:
        # the scheduler went on to write its claim before it stopped).
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        time.sleep(0.5)
