"""`ferrylink up/down/server/status` with real processes against the real broker.

Each test uses its own state directory, a random free port range and a unique broker name
prefix, and deletes its queues and exchanges at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest

from ferrylink.local_cluster import (
    broker_reachable,
    pid_alive,
    port_free,
    rabbitmq_installed,
    service_port,
)
from ferrylink.services_registry import BACKEND_SERVICES
from ferrylink.settings import DEFAULT_AMQP_URL

BOOT_TIMEOUT = 120.0  # 15 Python processes on 2 cores take a while
STOP_TIMEOUT = 60.0

pytestmark = pytest.mark.timeout(400)


# ---- helpers -----------------------------------------------------------------------------------


def broker_names(prefix: str, amqp_url: str, servers: int = 5) -> tuple[list[str], list[str]]:
    """The queues and exchanges a cluster with this name prefix declares: the shared work
    queues, the node-local ones of st1..stN (passive_legacy) and their dead-letter queues."""
    queues = []
    for name in ("events", "transfer-states"):
        for queue in [
            f"{prefix}.{name}",
            *(f"{prefix}.{name}.st{i}" for i in range(1, servers + 1)),
        ]:
            queues += [queue, f"{queue}.dead"]
    exchanges = [f"{prefix}.{name}" for name in ("assignments", "heartbeats", "config")]
    if amqp_url == DEFAULT_AMQP_URL and shutil.which("rabbitmqctl"):
        # The machine's broker: also whatever else was declared under the prefix.
        for kind, found in (("list_queues", queues), ("list_exchanges", exchanges)):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                listed = subprocess.run(
                    ["rabbitmqctl", "-q", kind, "name"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                ).stdout.split()
                found.extend(n for n in listed if n.startswith(prefix + ".") and n not in found)
    return queues, exchanges


def delete_broker_objects(prefix: str, amqp_url: str) -> None:
    """Delete this prefix's queues and exchanges (each in a fresh channel: an error closes it)."""
    queues, exchanges = broker_names(prefix, amqp_url)
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


def free_base_port(servers: int) -> int:
    """A random base port whose whole range is free now."""
    for _ in range(200):
        base = random.randrange(20000, 60000, 100)
        ports = [
            service_port(base, i, j) for i in range(servers) for j in range(len(BACKEND_SERVICES))
        ]
        if all(port_free(p) for p in ports):
            return base
    raise RuntimeError("no free port range")


def ferrylink(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ferrylink.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_json(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def all_pids(doc: dict[str, Any], server_id: str | None = None) -> list[int]:
    return [
        svc["pid"]
        for server in doc["servers"]
        if server_id is None or server["id"] == server_id
        for svc in server["services"].values()
        if svc["pid"]
    ]


def server_doc(doc: dict[str, Any], server_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in doc["servers"] if s["id"] == server_id)
    return found


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_pids_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if pid_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if pid_alive(p)]
    return left


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

    wait_for(done, timeout, f"/readyz 200 on ports {sorted(pending)}")


def kill_leftovers(state_dir: Path) -> None:
    """Last resort in a failed test: SIGKILL whatever cluster.json still lists."""
    with contextlib.suppress(OSError, ValueError):
        doc = read_json(state_dir / "cluster.json")
        for pid in [*all_pids(doc), doc.get("supervisor_pid") or 0]:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def cluster_amqp_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """FERRYLINK_AMQP_URL if set, else the machine's broker on 127.0.0.1:5672, else the
    session's private broker (conftest); the `ferrylink` subprocesses inherit it."""
    url = os.environ.get("FERRYLINK_AMQP_URL") or DEFAULT_AMQP_URL
    if not broker_reachable(url):
        if not rabbitmq_installed():
            pytest.skip("no RabbitMQ answers and rabbitmq-server is not installed")
        url = request.getfixturevalue("amqp_url")
    monkeypatch.setenv("FERRYLINK_AMQP_URL", url)
    return url


@pytest.fixture
def prefix(cluster_amqp_url: str) -> Iterator[str]:
    """A unique name prefix for the cluster's queues and exchanges, deleted afterwards."""
    name = f"fltest-lc-{uuid.uuid4().hex[:10]}"
    yield name
    delete_broker_objects(name, cluster_amqp_url)


# ---- tests -------------------------------------------------------------------------------------


def test_up_three_servers_then_ctrl_c_leaves_nothing_behind(tmp_path: Path, prefix: str) -> None:
    state_dir = tmp_path / "state"
    base_port = free_base_port(3)
    output = tmp_path / "up.out"
    started = time.monotonic()
    with open(output, "wb") as out:
        up = subprocess.Popen(
            [
                sys.executable, "-m", "ferrylink.cli", "up",
                "--servers", "3",
                "--mode", "active_active",
                "--state-dir", str(state_dir),
                "--base-port", str(base_port),
                "--prefix", prefix,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    cluster_json = state_dir / "cluster.json"
    try:

        def running() -> bool:
            assert up.poll() is None, f"`up` exited early:\n{output.read_text()}"
            if not cluster_json.exists():
                return False
            return read_json(cluster_json).get("status") == "running"

        wait_for(running, BOOT_TIMEOUT, "the cluster to be running")
        boot_seconds = time.monotonic() - started
        doc = read_json(cluster_json)

        assert doc["mode"] == "active_active"
        assert "guest:***@" in doc["amqp_url"]
        assert doc["database_url"] == f"sqlite:///{state_dir.resolve() / 'ferrylink.db'}"
        assert doc["edges"] == []
        assert [s["id"] for s in doc["servers"]] == ["st1", "st2", "st3"]
        ports = []
        for server in doc["servers"]:
            assert server["state"] == "up"
            assert list(server["services"]) == list(BACKEND_SERVICES)
            for svc in server["services"].values():
                assert pid_alive(svc["pid"])
                ports.append(svc["port"])
        assert len(set(ports)) == 15
        wait_all_ready(ports)
        assert (state_dir / "servers").read_text().splitlines() == [
            f"st{i + 1}\thttp://127.0.0.1:{service_port(base_port, i, 0)}" for i in range(3)
        ]
        for server in ("st1", "st3"):
            assert (state_dir / "logs" / f"{server}-transaction-manager.log").stat().st_size > 0
        printed = output.read_text()
        assert "st3" in printed and "sentinel-link" in printed

        pids = all_pids(doc)
        stop_started = time.monotonic()
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=STOP_TIMEOUT) == 0, output.read_text()
        assert wait_pids_gone(pids, 5.0) == [], "processes left behind"
        print(f"boot {boot_seconds:.1f} s, stop {time.monotonic() - stop_started:.1f} s")
        final = read_json(cluster_json)
        assert final["status"] == "stopped"
        assert all(s["state"] == "down" for s in final["servers"])
        assert not (state_dir / "supervisor.pid").exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        kill_leftovers(state_dir)


def test_kill_and_start_one_server_of_a_detached_cluster(tmp_path: Path, prefix: str) -> None:
    state_dir = tmp_path / "state"
    base_port = free_base_port(2)
    common = ("--state-dir", str(state_dir))
    try:
        started = time.monotonic()
        up = ferrylink(
            "up", "--servers", "2", "--mode", "passive", "--base-port", str(base_port),
            "--prefix", prefix, "--detach", *common,
        )  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"detached up: {time.monotonic() - started:.1f} s")
        doc = read_json(state_dir / "cluster.json")
        assert doc["status"] == "running"
        supervisor = int((state_dir / "supervisor.pid").read_text())
        assert supervisor == doc["supervisor_pid"] and pid_alive(supervisor)
        st1_pids, st2_pids = all_pids(doc, "st1"), all_pids(doc, "st2")
        assert len(st1_pids) == len(st2_pids) == len(BACKEND_SERVICES)
        st2_ports = [svc["port"] for svc in server_doc(doc, "st2")["services"].values()]
        wait_all_ready(st2_ports)

        # kill: every st2 process is gone at once, and cluster.json says so.
        kill = ferrylink("server", "kill", "st2", *common)
        assert kill.returncode == 0, kill.stdout + kill.stderr
        assert [p for p in st2_pids if pid_alive(p)] == []
        doc = read_json(state_dir / "cluster.json")
        assert server_doc(doc, "st2")["state"] == "down"
        assert server_doc(doc, "st1")["state"] == "up"
        assert all(pid_alive(p) for p in st1_pids)
        assert all(readyz(port) == 0 for port in st2_ports)

        status = ferrylink("status", *common)
        assert status.returncode == 0, status.stderr
        assert "st2" in status.stdout and "down" in status.stdout

        # start: same ports, new processes, ready when the command returns.
        started = time.monotonic()
        start = ferrylink("server", "start", "st2", *common)
        assert start.returncode == 0, start.stdout + start.stderr
        print(f"server start: {time.monotonic() - started:.1f} s")
        doc = read_json(state_dir / "cluster.json")
        st2 = server_doc(doc, "st2")
        assert st2["state"] == "up"
        new_st2_pids = all_pids(doc, "st2")
        assert set(new_st2_pids).isdisjoint(st2_pids)
        assert [svc["port"] for svc in st2["services"].values()] == st2_ports
        assert all(readyz(port) == 200 for port in st2_ports)

        # down: the supervisor stops everything, including what `server start` started.
        started = time.monotonic()
        down = ferrylink("down", *common)
        assert down.returncode == 0, down.stdout + down.stderr
        print(f"down: {time.monotonic() - started:.1f} s")
        assert not pid_alive(supervisor)
        assert wait_pids_gone([*st1_pids, *new_st2_pids], 5.0) == []
        assert read_json(state_dir / "cluster.json")["status"] == "stopped"
    finally:
        with contextlib.suppress(Exception):
            ferrylink("down", *common, timeout=120)
        kill_leftovers(state_dir)


def test_down_cleans_up_after_a_killed_supervisor(tmp_path: Path, prefix: str) -> None:
    """SIGKILL the supervisor: its service processes live on; `server kill` and `down` then
    act on the pids of cluster.json directly."""
    state_dir = tmp_path / "state"
    common = ("--state-dir", str(state_dir))
    try:
        up = ferrylink(
            "up", "--servers", "2", "--base-port", str(free_base_port(2)),
            "--prefix", prefix, "--detach", *common,
        )  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        assert "sentinel-link" in up.stdout  # the placement table
        doc = read_json(state_dir / "cluster.json")
        supervisor = doc["supervisor_pid"]
        os.kill(supervisor, signal.SIGKILL)
        assert wait_pids_gone([supervisor], 10.0) == []
        st1_pids, st2_pids = all_pids(doc, "st1"), all_pids(doc, "st2")
        assert all(pid_alive(p) for p in [*st1_pids, *st2_pids])

        start = ferrylink("server", "start", "st2", *common)
        assert start.returncode == 1 and "no supervisor runs" in start.stderr

        kill = ferrylink("server", "kill", "st2", *common)
        assert kill.returncode == 0, kill.stdout + kill.stderr
        assert wait_pids_gone(st2_pids, 5.0) == []
        assert server_doc(read_json(state_dir / "cluster.json"), "st2")["state"] == "down"

        down = ferrylink("down", *common)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "leftover" in down.stdout
        assert wait_pids_gone(st1_pids, 5.0) == []
        assert read_json(state_dir / "cluster.json")["status"] == "stopped"
    finally:
        kill_leftovers(state_dir)
