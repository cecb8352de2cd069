"""ferrylink_ops.processes.time_of_death, which failover tests and benchmarks time from: the
moment the last watched process is gone, not when the command that kills it was started."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from ferrylink_ops.processes import pid_alive, time_of_death


def test_the_moment_the_last_process_died() -> None:
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    pids = [p.pid for p in sleepers]
    moments: list[float] = []

    def kill_slowly() -> None:
        os.kill(pids[0], signal.SIGKILL)
        sleepers[0].wait()
        time.sleep(0.3)  # a slow killer: the second death comes later
        moments.append(time.time())
        os.kill(pids[1], signal.SIGKILL)
        sleepers[1].wait()

    died = time_of_death(pids, kill_slowly)
    assert not any(pid_alive(pid) for pid in pids)
    assert moments[0] <= died < moments[0] + 0.5


def test_a_survivor_is_an_error() -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with pytest.raises(TimeoutError, match=str(sleeper.pid)):
            time_of_death([sleeper.pid], lambda: None, timeout=0.2)
    finally:
        sleeper.kill()
        sleeper.wait()
