"""A test-only fault hook: `FERRYLINK_FAULT_POINT=<name>` makes the process SIGKILL itself
the first time it reaches `fault_point(<name>)`.

Crash-point tests start a process per point and count, at the real destination, that every
file arrived exactly once after the crash and a restart. Unset (always, in production),
`fault_point` is one string comparison.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

FAULT_POINT_ENV = "FERRYLINK_FAULT_POINT"
_POINT = os.environ.get(FAULT_POINT_ENV, "")


def fault_point(name: str) -> None:
    if _POINT and name == _POINT:
        log.critical("fault point %s reached: SIGKILL", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
