"""A lower CPU priority for a service that may lag (the sentinel link), so that on a busy
machine the event path gets the cores first.

Linux shares the CPU between scheduling groups before it shares a group's time between its
threads. With autogroups on (`/proc/sys/kernel/sched_autogroup_enabled`, the default of
most distributions) each session is a group, and the local runner starts every service in a
session of its own: a process's nice value alone then weighs only against its own threads,
not against the transaction manager. So the process's autogroup gets the nice value too.
In a container the container's cgroup is the group: its CPU weight is set where it is
deployed (`cpu_shares` in docker-compose.yml).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

AUTOGROUP = Path("/proc/self/autogroup")


def lower_cpu_priority(nice: int) -> list[str]:
    """Raise the nice value of every thread of this process to `nice` (0-19; Linux keeps one
    per thread, and a new thread takes its creator's), and its autogroup's when the
    autogroup is its own (it leads its session). Call it once the service has started: at
    a tenth of a core on a busy machine, its imports and connections would hold back the
    server's readiness. What was set, as words; nothing for `nice` 0."""
    if nice <= 0:
        return []
    tasks = Path("/proc/self/task")
    threads = [int(task.name) for task in tasks.iterdir()] if tasks.exists() else [0]
    refused: list[str] = []
    for thread in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, thread) < nice:
                os.setpriority(os.PRIO_PROCESS, thread, nice)
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except OSError as exc:  # e.g. a seccomp profile: a slower link is no reason to stop
            refused.append(f"{thread}: {exc}")
    if refused:
        log.warning("cannot lower the CPU priority of threads %s", "; ".join(refused))
        done = [f"nice {nice} on {len(threads) - len(refused)} of {len(threads)} threads"]
    else:
        done = [f"nice {nice}"]
    # Only a session leader's autogroup is surely its own: in a shared session, the nice
    # value would slow every process of that session.
    if AUTOGROUP.exists() and os.getsid(0) == os.getpid():
        try:
            AUTOGROUP.write_text(str(nice))
            done.append(f"autogroup nice {nice}")
        except OSError as exc:  # not permitted here: the threads' nice values still hold
            log.info("cannot lower this process's autogroup priority: %s", exc)
    return done
