"""The supervisor: `ferrylink up` in the foreground (or detached, `start_detached`), and its
control channel.

The supervisor owns a `LocalCluster` (local_cluster.py): every service process is its child,
it reaps them, it is the only writer of `cluster.json`, and it stops everything on `down`
or Ctrl-C. Acting on one server (`ferrylink server stop|start|kill ID`) goes through it. The
channel is a directory, `STATE_DIR/control/`:

1. the CLI writes `control/<time_ns>-<uuid>.req` (JSON `{"id", "action", "server"}`,
   written to a temporary name and renamed, so the supervisor never reads half a request),
2. sends SIGUSR1 to the supervisor to wake it up (it also looks every half second),
3. the supervisor handles the requests in name order on its main thread (no locks needed)
   and writes `control/<uuid>.resp` (JSON `{"ok", "message"}`) the same way, after the
   action is complete (processes gone, or a started server ready) and `cluster.json` has
   been rewritten,
4. the CLI polls for the response with a deadline (`request_supervisor`), and gives up
   early if the supervisor dies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from ferrylink.settings import redact_url
from ferrylink_ops.demo import create_demo, demo_lines
from ferrylink_ops.local_cluster import (
    POLL_INTERVAL,
    READY_TIMEOUT,
    UP,
    ClusterError,
    LocalCluster,
    check_no_cluster_running,
    control_dir,
    format_table,
    placement_table,
    read_cluster_json,
    running_supervisor,
    supervisor_pid_file,
    write_supervisor_pid,
)
from ferrylink_ops.processes import STOP_TIMEOUT, log_tail, pid_alive, write_json_atomic

log = logging.getLogger(__name__)


class _Waker:
    """Sleep until a timeout or until a signal arrives (self-pipe via set_wakeup_fd)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def wait(self, timeout: float) -> None:
        select.select([self._read], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 512):
                pass

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous)
        os.close(self._read)
        os.close(self._write)


class Supervisor:
    """Runs a `LocalCluster` until a signal: start, wait ready, serve control requests."""

    def __init__(
        self,
        cluster: LocalCluster,
        ready_timeout: float = READY_TIMEOUT,
        out: Callable[[str], None] = print,
    ) -> None:
        self.cluster = cluster
        self.ready_timeout = ready_timeout
        self.out = out
        self.stop_signal: int | None = None
        self.waker: _Waker | None = None
        cluster.abort = lambda: self.stop_signal is not None
        cluster.sleep = self._sleep

    def _sleep(self, seconds: float) -> None:
        if self.waker is not None:
            self.waker.wait(seconds)
        else:
            time.sleep(seconds)

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum

    def _install_signals(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_stop_signal)
        # SIGUSR1 only wakes the loop (the wakeup fd does that); the handler does nothing.
        signal.signal(signal.SIGUSR1, lambda _s, _f: None)
        self.waker = _Waker()

    def run(self) -> int:
        """The whole life of `ferrylink up`; returns the process exit code."""
        cluster = self.cluster
        state_dir = cluster.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        check_no_cluster_running(state_dir)
        pid_file = supervisor_pid_file(state_dir)
        write_supervisor_pid(state_dir)
        controls = control_dir(state_dir)
        controls.mkdir(exist_ok=True)
        for stale in controls.iterdir():
            stale.unlink(missing_ok=True)
        self._install_signals()
        code = 1
        try:
            cluster.prepare()
            if self.stop_signal is None:
                cluster.spawn_all()
                cluster.write_cluster_json()
                ready = cluster.wait_ready(None, self.ready_timeout)
                cluster.reap()
                self.out(
                    format_table(("server", "service", "pid", "port", "ready"), cluster.rows(ready))
                )
                if self.stop_signal is not None:
                    code = 128 + self.stop_signal
                elif not all(ready.values()):
                    self._report_not_ready(ready)
                    code = 1
                else:
                    if cluster.edges:
                        try:
                            cluster.demo = create_demo(cluster)
                        except (ClusterError, httpx.HTTPError, OSError) as exc:
                            self.out(f"warning: could not create the demo account: {exc}")
                    cluster.status = "running"
                    cluster.write_cluster_json()
                    self.out(
                        f"cluster up: {len(cluster.servers)} servers, mode {cluster.mode}, "
                        f"broker {redact_url(cluster.amqp_url)}, state {state_dir}"
                    )
                    for line in demo_lines(cluster.demo):
                        self.out(line)
                    self.out("stop with Ctrl-C, SIGTERM or `ferrylink down`")
                    self._watch()
                    code = 0
        except ClusterError as exc:
            self.out(f"error: {exc}")
            code = 1
        finally:
            self._shutdown()
            with contextlib.suppress(OSError):
                if pid_file.read_text().split()[:1] == [str(os.getpid())]:
                    pid_file.unlink()
            if self.waker is not None:
                self.waker.close()
        return code

    def _report_not_ready(self, ready: dict[tuple[str, str], bool]) -> None:
        for (server_id, service), ok in ready.items():
            if ok:
                continue
            edges = {edge.server_id: edge for edge in self.cluster.edges}
            proc = edges.get(server_id) or self.cluster.server(server_id).services[service]
            why = f"exited with {proc.exit_code}" if proc.exit_code is not None else "not ready"
            self.out(f"{server_id} {service}: {why}; last lines of {proc.log_path}:")
            self.out(log_tail(proc.log_path) or "(empty)")
        self.out(f"error: the cluster did not become ready within {self.ready_timeout:.0f} s")

    def _watch(self) -> None:
        """Until a stop signal: note processes that die, and serve control requests."""
        assert self.waker is not None
        while self.stop_signal is None:
            self.waker.wait(0.5)
            changed = False
            for proc in self.cluster.reap():
                log.warning(
                    "%s %s exited with code %s (not restarted)",
                    proc.server_id,
                    proc.service,
                    proc.exit_code,
                )
                self.out(f"{proc.server_id} {proc.service} exited with code {proc.exit_code}")
                changed = True
            changed = self._serve_requests() or changed
            if changed:
                self.cluster.write_cluster_json()

    def _serve_requests(self) -> bool:
        controls = control_dir(self.cluster.state_dir)
        requests = sorted(controls.glob("*.req"))
        for path in requests:
            if self.stop_signal is not None:
                break
            try:
                request = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            path.unlink(missing_ok=True)
            response = self.handle(request)
            self.cluster.write_cluster_json()
            write_json_atomic(controls / f"{request.get('id', path.stem)}.resp", response)
        return bool(requests)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Carry out one `server stop|start|kill` request; the answer says how it went."""
        action = request.get("action")
        server_id = str(request.get("server"))
        cluster = self.cluster
        try:
            server = cluster.server(server_id)
            if action == "stop":
                cluster.stop_servers([server_id])
            elif action == "kill":
                cluster.kill_server(server_id)
            elif action == "start":
                if server.state == UP:
                    return {"ok": True, "message": f"{server_id} is already up"}
                ready = cluster.start_server(server_id, self.ready_timeout)
                cluster.reap()
                if not all(ready.values()):
                    late = ", ".join(s for s, ok in ready.items() if not ok)
                    return {"ok": False, "message": f"{server_id} started, but not ready: {late}"}
            else:
                return {"ok": False, "message": f"unknown action {action!r}"}
        except ClusterError as exc:
            return {"ok": False, "message": str(exc)}
        self.out(f"{server_id}: {action} done, now {server.state}")
        return {"ok": True, "message": f"{server_id} is {server.state}"}

    def _shutdown(self) -> None:
        # A second Ctrl-C must not interrupt the cleanup half way.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        cluster = self.cluster
        if any(p.popen is not None for p in cluster.processes()) or cluster.broker is not None:
            self.out("stopping the cluster")
            cluster.status = "stopping"
            with contextlib.suppress(OSError):
                cluster.write_cluster_json()
        cluster.shutdown()
        cluster.reap()
        cluster.status = "stopped"
        with contextlib.suppress(OSError):
            if cluster.cluster_json.parent.is_dir():
                cluster.write_cluster_json()


def request_supervisor(
    state_dir: Path, action: str, server_id: str, timeout: float = READY_TIMEOUT + 30
) -> dict[str, Any]:
    """Ask the running supervisor to act on a server; wait for its answer."""
    pid = running_supervisor(state_dir)
    if pid is None:
        raise ClusterError(f"no supervisor runs for {state_dir}")
    controls = control_dir(state_dir)
    controls.mkdir(exist_ok=True)
    request_id = uuid.uuid4().hex
    request = {"id": request_id, "action": action, "server": server_id}
    write_json_atomic(controls / f"{time.time_ns()}-{request_id}.req", request)
    response_path = controls / f"{request_id}.resp"
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if response_path.exists():
            response: dict[str, Any] = json.loads(response_path.read_text())
            response_path.unlink(missing_ok=True)
            return response
        if not pid_alive(pid):
            raise ClusterError(f"the supervisor (pid {pid}) exited before answering")
        time.sleep(0.1)
    raise ClusterError(f"the supervisor did not answer {action} {server_id} in {timeout:.0f} s")


def start_detached(
    argv: Sequence[str], state_dir: Path, timeout: float, out: Callable[[str], None] = print
) -> int:
    """Run `ferrylink up ARGV` (without --detach) as a detached supervisor; return once its
    cluster is ready (0) or it gave up (its exit code, or 1)."""
    state_dir = state_dir.resolve()
    check_no_cluster_running(state_dir)
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    supervisor_log = state_dir / "logs" / "supervisor.log"
    with open(supervisor_log, "ab") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "ferrylink_ops.cli", "up", *argv],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=os.getcwd(),
            # The mark `started_for` looks for: this supervisor belongs to this directory.
            env=dict(os.environ, FERRYLINK_STATE_DIR=str(state_dir)),
        )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            code = child.poll()
            if code is not None:
                out(f"error: the supervisor exited with code {code}; see {supervisor_log}:")
                out(log_tail(supervisor_log, 30))
                return code or 1
            with contextlib.suppress(ClusterError, OSError):
                doc = read_cluster_json(state_dir)
                if doc.get("supervisor_pid") == child.pid and doc.get("status") == "running":
                    out(format_table(*placement_table(doc)))
                    for line in demo_lines(doc.get("demo") or {}):
                        out(line)
                    out(
                        f"cluster up in the background (supervisor pid {child.pid}, log "
                        f"{supervisor_log}); stop it with `ferrylink down --state-dir {state_dir}`"
                    )
                    return 0
            time.sleep(POLL_INTERVAL)
        out(f"error: the cluster was not ready within {timeout:.0f} s; stopping it")
    except KeyboardInterrupt:
        out("interrupted; stopping the cluster")
    child.terminate()  # the supervisor stops what it started
    try:
        child.wait(STOP_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    return 1
