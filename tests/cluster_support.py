"""Helpers for tests that run whole local clusters (`ferrylink up`) as real processes."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pika

from ferrylink.cluster import PRIMARY_ONLY_WORK
from ferrylink.messaging import Topology
from ferrylink.services_registry import BACKEND_SERVICES
from ferrylink_ops.admin_setup import auth_headers
from ferrylink_ops.local_cluster import SPARE_BASE_PORT_RANGE, pick_free_base_port, runs_for
from tests.helpers import wait_until

BOOT_TIMEOUT = 120.0  # 15 Python processes on 2 cores take a while
STOP_TIMEOUT = 60.0


def delete_broker_objects(prefix: str, amqp_url: str, servers: int = 5) -> None:
    """Delete the queues and exchanges of the cluster named `prefix` (its node-local queues
    of st1..stN too); each in a fresh channel, since an error closes the channel."""
    topology = Topology(prefix=prefix)
    queues = [topology.queue(name) for name in topology.work_queues] + [
        topology.node_queue(name, f"st{i}")
        for name in topology.node_work_queues
        for i in range(1, servers + 1)
    ]
    queues += [topology.dead_letter_queue(q) for q in queues] + [
        delayed
        for name in topology.delayed_queues
        for q in [topology.queue(name)]
        + [topology.node_queue(name, f"st{i}") for i in range(1, servers + 1)]
        for delayed in topology.delay_queues(q)
    ]
    exchanges = [topology.exchange(name) for name in topology.fanout_exchanges]
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url.split(",")[0].strip()))
    try:
        for name in queues:
            with contextlib.suppress(pika.exceptions.AMQPChannelError):
                channel = connection.channel()
                channel.queue_delete(name)
                channel.close()
        for name in exchanges:
            with contextlib.suppress(pika.exceptions.AMQPChannelError):
                channel = connection.channel()
                channel.exchange_delete(name)
                channel.close()
    finally:
        connection.close()


def free_base_port(servers: int, edges: int = 1) -> int:
    """A free base port from this pytest-xdist worker's own slice of the spare range: two
    workers' free-checks would otherwise race for the same ports."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1)
    index = int(worker) if worker.isdigit() else 0
    low, high = SPARE_BASE_PORT_RANGE
    width = (high - low) // count
    return pick_free_base_port(servers, edges, (low + index * width, low + (index + 1) * width))


def ferrylink(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ferrylink_ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_json(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def all_pids(doc: dict[str, Any], server_id: str | None = None) -> list[int]:
    """Pids of a server's services (of every server and edge when `server_id` is None)."""
    edges = [e["pid"] for e in doc.get("edges", []) if e.get("pid")] if server_id is None else []
    return [
        svc["pid"]
        for server in doc["servers"]
        if server_id is None or server["id"] == server_id
        for svc in server["services"].values()
        if svc["pid"]
    ] + edges


def server_doc(doc: dict[str, Any], server_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in doc["servers"] if s["id"] == server_id)
    return found


def readyz(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2.0).status_code
    except httpx.HTTPError:
        return 0


def wait_all_ready(ports: list[int], timeout: float = 60.0) -> None:
    pending = set(ports)

    def done() -> bool:
        pending.difference_update({p for p in list(pending) if readyz(p) == 200})
        return not pending

    wait_until(done, timeout, f"/readyz 200 on ports {sorted(pending)}")


def kill_leftovers(state_dir: Path) -> None:
    """Last resort in a failed test: SIGKILL what cluster.json still lists and still runs for
    this cluster. Only that: a recorded pid of a process that ended (a server killed by the
    test) may belong by now to another test's cluster, running beside this one."""
    with contextlib.suppress(OSError, ValueError):
        doc = read_json(state_dir / "cluster.json")
        for pid in [*all_pids(doc), doc.get("supervisor_pid") or 0]:
            if runs_for(state_dir, pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


@dataclass
class Cluster:
    state_dir: Path
    prefix: str
    amqp_url: str

    @functools.cached_property
    def http(self) -> httpx.Client:
        """An HTTP client carrying the admin token `ferrylink up` wrote to STATE_DIR/admin/."""
        return httpx.Client(headers=auth_headers(self.state_dir), timeout=10)

    def doc(self) -> dict[str, Any]:
        return read_json(self.state_dir / "cluster.json")

    def port(self, server: str, service: str) -> int:
        for entry in self.doc()["servers"]:
            if entry["id"] == server:
                port: int = entry["services"][service]["port"]
                return port
        raise KeyError(server)

    def get(self, server: str, service: str, path: str, timeout: float = 15) -> Any:
        """GET a service's API. Tests read what it answers, not how fast: on a machine that
        two cluster tests load, the sentinel link (nice 10: a tenth of a core when the CPU
        is saturated) took more than 3 s to answer `/work` (CI, twice). A timeout is an
        error that names the service; a refused connection (a killed server) is httpx's."""
        url = f"http://127.0.0.1:{self.port(server, service)}{path}"
        try:
            return self.http.get(url, timeout=timeout).json()
        except httpx.TimeoutException as exc:
            raise TimeoutError(f"{server}'s {service} did not answer GET {path} within "
                               f"{timeout:g} s") from exc  # fmt: skip

    def edge_backends(self, edge: int = 0, secret: str | None = None) -> httpx.Response:
        """GET an edge's /backends with the edge secret `ferrylink up` made (or `secret`)."""
        port = self.doc()["edges"][edge]["port"]
        token = (self.state_dir / "edge-secret").read_text().strip() if secret is None else secret
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(f"http://127.0.0.1:{port}/backends", headers=headers, timeout=5)

    def view(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """GET /cluster from the first coordinator that answers."""
        for entry in self.doc()["servers"]:
            if entry["id"] in exclude:
                continue
            with contextlib.suppress(httpx.HTTPError):
                return dict(self.get(entry["id"], "cluster-coordinator", "/cluster"))
        raise AssertionError("no coordinator answers")

    def active(self, server: str, service: str) -> set[str]:
        try:
            return set(self.get(server, service, "/work")["active"])
        except httpx.HTTPError:
            return set()

    def run(self, *args: str) -> str:
        result = ferrylink(*args, "--state-dir", str(self.state_dir))
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def intervals(self, servers: list[str]) -> list[tuple[str, str, int, float, float]]:
        """Every recorded activation of primary-only work: (server, unit, epoch, start, end)."""
        now = time.time()
        found = []
        for server in servers:
            for service in BACKEND_SERVICES:
                # A killed server's services refuse the connection: they have no history to
                # add. A slow one is waited for (`get` raises TimeoutError, not httpx's).
                with contextlib.suppress(httpx.HTTPError):
                    for item in self.get(server, service, "/work")["history"]:
                        if item["unit"] in PRIMARY_ONLY_WORK:
                            end = item["end"] if item["end"] is not None else now
                            found.append((server, item["unit"], item["epoch"], item["start"], end))
        return found


def start_cluster(
    tmp_path: Path,
    prefix: str,
    amqp_url: str,
    mode: str,
    servers: int = 3,
    edges: int = 1,
    database_url: str | None = None,
) -> Cluster:
    """`ferrylink up --detach`; on `database_url` (e.g. PostgreSQL) instead of SQLite."""
    state_dir = tmp_path / "state"
    database = ["--database-url", database_url] if database_url else []
    result = ferrylink(
        "up", "--servers", str(servers), "--mode", mode, "--state-dir", str(state_dir),
        "--base-port", str(free_base_port(servers, edges)), "--prefix", prefix, "--detach",
        "--edges", str(edges), *database,
        timeout=BOOT_TIMEOUT + 60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return Cluster(state_dir, prefix, amqp_url)
