"""`ferrylink up/down/server/status` with real processes against the real broker.

Each test uses its own state directory, a random free port range and a unique broker name
prefix, and deletes its queues and exchanges at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ferrylink.services_registry import BACKEND_SERVICES
from ferrylink_ops.local_cluster import service_port
from ferrylink_ops.processes import pid_alive, wait_pids_gone
from tests.cluster_support import (
    BOOT_TIMEOUT,
    STOP_TIMEOUT,
    all_pids,
    ferrylink,
    free_base_port,
    kill_leftovers,
    read_json,
    readyz,
    server_doc,
    wait_all_ready,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(400)


# ---- tests -------------------------------------------------------------------------------------


def test_up_three_servers_then_ctrl_c_leaves_nothing_behind(
    tmp_path: Path, cluster_prefix: str
) -> None:
    state_dir = tmp_path / "state"
    base_port = free_base_port(3)
    output = tmp_path / "up.out"
    started = time.monotonic()
    with open(output, "wb") as out:
        up = subprocess.Popen(
            [
                sys.executable, "-m", "ferrylink_ops.cli", "up",
                "--servers", "3",
                "--mode", "active_active",
                "--state-dir", str(state_dir),
                "--base-port", str(base_port),
                "--prefix", cluster_prefix,
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

        wait_until(running, BOOT_TIMEOUT, "the cluster to be running")
        boot_seconds = time.monotonic() - started
        doc = read_json(cluster_json)

        assert doc["mode"] == "active_active"
        assert "guest:***@" in doc["amqp_url"]
        assert doc["database_url"] == f"sqlite:///{state_dir.resolve() / 'ferrylink.db'}"
        [edge] = doc["edges"]  # `up` starts one edge by default
        assert edge["id"] == "edge1" and pid_alive(edge["pid"])
        assert {"sftp_port", "https_port"} <= set(edge)
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


def test_kill_and_start_one_server_of_a_detached_cluster(
    tmp_path: Path, cluster_prefix: str
) -> None:
    state_dir = tmp_path / "state"
    base_port = free_base_port(2)
    common = ("--state-dir", str(state_dir))
    try:
        started = time.monotonic()
        up = ferrylink(
            "up", "--servers", "2", "--mode", "passive", "--base-port", str(base_port),
            "--prefix", cluster_prefix, "--detach", *common,
        )  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"detached up: {time.monotonic() - started:.1f} s")
        doc = read_json(state_dir / "cluster.json")
        assert doc["status"] == "running"
        supervisor = int((state_dir / "supervisor.pid").read_text().split()[0])
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


def test_down_cleans_up_after_a_killed_supervisor(tmp_path: Path, cluster_prefix: str) -> None:
    """SIGKILL the supervisor: its service processes live on; `server kill` and `down` then
    act on the pids of cluster.json directly, and only on processes this cluster started."""
    state_dir = tmp_path / "state"
    common = ("--state-dir", str(state_dir))
    impostors: tuple[list[subprocess.Popen[bytes]], ...] = ([], [])
    try:
        up = ferrylink(
            "up", "--servers", "2", "--base-port", str(free_base_port(2)),
            "--prefix", cluster_prefix, "--detach", *common,
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

        # Pids recorded in cluster.json that now belong to other processes (pid reuse), with
        # the words a weaker check looked for in their command lines: never signalled.
        for impostor in impostors:
            impostor.append(subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(120)", "ferrylink", "services.",
                 "rabbit", "beam", str(state_dir.resolve())],
                start_new_session=True,
            ))  # fmt: skip
        [service_impostor], [broker_impostor] = impostors
        doc = read_json(state_dir / "cluster.json")  # st2's scheduler ended: its pid reused
        st2 = next(server for server in doc["servers"] if server["id"] == "st2")
        st2["services"]["scheduler"].update(pid=service_impostor.pid, running=True)
        doc["broker_pid"] = broker_impostor.pid
        (state_dir / "cluster.json").write_text(json.dumps(doc))

        down = ferrylink("down", *common)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "leftover" in down.stdout
        assert wait_pids_gone(st1_pids, 5.0) == []
        assert read_json(state_dir / "cluster.json")["status"] == "stopped"
        assert service_impostor.poll() is None and broker_impostor.poll() is None
    finally:
        kill_leftovers(state_dir)
        for impostor in impostors:
            for process in impostor:
                process.kill()
                process.wait()
