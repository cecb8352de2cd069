"""Process helpers of the tooling, written once: is a pid alive, does it still run what we
started (against pid reuse), signalling a process group, waiting for pids to go, stopping
them, a free port, a log's last lines, a JSON file written whole. Used by the local cluster
runner, its supervisor and commands, and the private broker starter."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

STOP_TIMEOUT = 20.0  # seconds a process gets between SIGTERM and SIGKILL


def pid_alive(pid: int | None) -> bool:
    """True while `pid` is a running (not zombie) process."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    # The state letter follows the parenthesised command name, which may contain spaces.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def cmdline(pid: int) -> str:
    """The command line of `pid`, arguments separated by spaces ("" when unknown)."""
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def runs_ferrylink(pid: int, markers: Sequence[str] = ("ferrylink", "services.")) -> bool:
    """Whether the command line of `pid` has one of `markers` (True where there is no /proc
    to ask). A weak guard against pid reuse: any cluster's process passes it; prefer
    `started_for` or `start_time`."""
    if not Path("/proc").is_dir():
        return True
    command = cmdline(pid)
    return any(marker in command for marker in markers)


def started_for(pid: int, variable: str, directory: Path, *, under: bool = False) -> bool:
    """Guard against pid reuse before signalling a pid read from a cluster's files: whether
    the process's environment sets `variable` to `directory` (or, `under`, a path under
    it), the mark the runner gives what it starts (FERRYLINK_STATE_DIR for services, edges
    and a detached supervisor; RABBITMQ_MNESIA_BASE under the private broker's folder).
    Another cluster's process now holding the pid, or anything else, is not. True where
    there is no /proc to ask."""
    if not Path("/proc").is_dir():
        return True
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False  # gone, or not ours to read (then not ours to signal either)
    root = str(directory.resolve())
    prefix = f"{variable}=".encode()
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            value = entry[len(prefix) :].decode(errors="replace")
            return value == root or (under and value.startswith(root.rstrip("/") + "/"))
    return False


def start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (/proc/<pid>/stat field 22): with the
    pid it names one process for as long as the machine runs. None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name (which may hold spaces) start at field 3.
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[22 - 3]) if len(fields) > 22 - 3 else None


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group led by `pid` (our children lead their own), else the pid."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    except PermissionError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_pids_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Poll until none of `pids` runs or `timeout` passes; returns those still running."""
    deadline = time.monotonic() + timeout
    remaining = [p for p in pids if pid_alive(p)]
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = [p for p in remaining if pid_alive(p)]
    return remaining


def time_of_death(pids: Sequence[int], kill: Callable[[], object], timeout: float = 30) -> float:
    """Run `kill` while a thread watches `pids` every 5 ms; the `time.time()` at which the
    last of them was first seen gone. A failover is timed from there: the command that
    kills (a CLI: an interpreter to start) can take seconds of its own on a loaded machine.
    Raises TimeoutError if one still runs `timeout` s after `kill` returned."""
    died: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not any(pid_alive(pid) for pid in pids):
                died.append(time.time())
                return
            time.sleep(0.005)  # the poll interval, not a wait for a result

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        kill()
        watcher.join(timeout)
    finally:
        stop.set()
    if not died:
        raise TimeoutError(f"still running {timeout:g} s after the kill: "
                           f"{[pid for pid in pids if pid_alive(pid)]}")  # fmt: skip
    return died[0]


def terminate_pids(pids: Sequence[int], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM each pid's process group, wait until `timeout`, SIGKILL what is left, wait."""
    for pid in pids:
        signal_group(pid, signal.SIGTERM)
    left = wait_pids_gone(pids, timeout)
    for pid in left:
        signal_group(pid, signal.SIGKILL)
    wait_pids_gone(left, 10.0)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to a temporary name and rename it: a reader never sees half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def timestamp() -> str:
    """Local time with its offset, as logs and cluster.json show it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def log_tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log file ("" when it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
