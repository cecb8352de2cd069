"""Waiting for a condition by polling with a deadline (never a bare sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 30.0,
    what: str = "",
    interval: float = 0.05,
) -> T:
    """Poll `predicate` until it returns something truthy and return that; raise
    TimeoutError (an AssertionError too, for tests) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:.1f} s waiting for {what or predicate}")
        time.sleep(interval)


class WaitTimeout(TimeoutError, AssertionError):
    """The condition did not come true in time."""
