"""Configuration synchronization on a real 2-server cluster (real processes and broker).

- A route changed on a secondary is applied by every server: every process reports the new
  configuration version, and files processed by either server follow the new route.
- A server that starts while the configuration moved on (auto sync off, as with the
  reference's manual synchronization) is shown out of sync, consumes no event, and the
  primary stays where it is (fail-back waits) until `ferrylink sync`; then it is in sync,
  consumes again, and is primary again.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ferrylink.cluster import WORK_EVENTS
from tests.cluster_support import Cluster
from tests.helpers import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

PASSWORD = "correct horse"


def upload(base: str, local: Path, remote: str) -> dict[str, Any]:
    result = subprocess.run(
        ["curl", "-sS", "-f", "-u", f"acme:{PASSWORD}", "-T", str(local),
         f"{base}/files/acme/{remote}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(httpx.Response(200, content=result.stdout).json())


def routed_by(cluster: Cluster, base: str, cycles: list[str]) -> dict[str, str]:
    """cycle id -> node of its ROUTED leg, once every cycle is routed."""

    def done() -> dict[str, str] | None:
        nodes = {}
        for cycle in cycles:
            page = cluster.http.get(f"{base}/transfers", params={"cycle_id": cycle}).json()
            route = next((i for i in page["items"] if i["leg"] == "route"), None)
            if route is None or route["status"] != "ROUTED":
                return None
            nodes[cycle] = route["node_id"]
        return nodes

    return wait_until(done, 60, "every upload routed")


def all_on_current_version(view: dict[str, Any]) -> bool:
    return all(
        svc["config_version"] == view["config_version"]
        for server in view["servers"]
        for svc in server["services"].values()
    ) and all(s["synchronized"] for s in view["servers"])


def in_sync(cluster: Cluster) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        view = cluster.view()
        return view if all_on_current_version(view) else None

    return check


def set_route(cluster: Cluster, base: str, folder: str) -> None:
    for route in cluster.http.get(f"{base}/routes").json()["items"]:
        assert cluster.http.delete(f"{base}/routes/{route['id']}").status_code == 204
    created = cluster.http.post(
        f"{base}/routes",
        json={"account": "acme", "pattern": "*.csv", "steps": [{"kind": "copy", "folder": folder}]},
    )
    assert created.status_code == 201, created.text


def test_dynamic_and_manual_sync(make_cluster: Any, tmp_path: Path) -> None:
    cluster: Cluster = make_cluster("active_active", servers=2, edges=0)
    data = cluster.state_dir / "data"
    tm = {s: f"http://127.0.0.1:{cluster.port(s, 'transaction-manager')}" for s in ("st1", "st2")}
    coordinator = f"http://127.0.0.1:{cluster.port('st1', 'cluster-coordinator')}/cluster"
    wait_until(lambda: all(WORK_EVENTS in cluster.active(s, "transaction-manager")
                           for s in ("st1", "st2")), 60, "both TMs consuming")  # fmt: skip

    # -- dynamic: a route changed on the secondary, applied by every server -------------------
    created = cluster.http.post(
        f"{tm['st2']}/accounts", json={"name": "acme", "password": PASSWORD}
    )
    assert created.status_code == 201, created.text
    set_route(cluster, tm["st2"], "sync-a")
    set_route(cluster, tm["st2"], "sync-b")  # changed: sync-a is never used again
    view = wait_until(in_sync(cluster), 15, "every process on the new configuration")
    assert view["out_of_sync"] == []
    payload = tmp_path / "payload.csv"
    payload.write_bytes(b"x" * 1000)
    cycles = [upload(tm[s], payload, f"dyn-{i}-{s}.csv")["cycle_id"]
              for i in range(6) for s in ("st1", "st2")]  # fmt: skip
    nodes = routed_by(cluster, tm["st1"], cycles)
    assert set(nodes.values()) == {"st1", "st2"}, nodes  # both servers routed some
    assert sorted(p.name for p in (data / "sync-b").iterdir()) == sorted(
        f"dyn-{i}-{s}.csv" for i in range(6) for s in ("st1", "st2")
    )
    assert not (data / "sync-a").exists()

    # -- manual: st1 comes back on a configuration that moved on ------------------------------
    off = cluster.http.put(f"{coordinator}/settings", json={"auto_sync": False})
    assert off.status_code == 200 and off.json()["auto_sync"] is False, off.text
    cluster.run("server", "stop", "st1")
    wait_until(lambda: cluster.view(("st1",))["primary"] == "st2", 30, "st2 primary")
    set_route(cluster, tm["st2"], "sync-c")
    cluster.run("server", "start", "st1")

    def st1_up_out_of_sync() -> dict[str, Any] | None:
        view = cluster.view()
        st1 = next(s for s in view["servers"] if s["id"] == "st1")
        return view if st1["state"] == "up" else None

    view = wait_until(st1_up_out_of_sync, 30, "st1 heard again")
    st1 = next(s for s in view["servers"] if s["id"] == "st1")
    assert view["out_of_sync"] == ["st1"] and not st1["synchronized"], view
    assert st1["config_version"] == 0 < view["config_version"]
    assert view["primary"] == "st2"  # fail-back waits for the sync
    # It consumes nothing: every upload (to either TM) is routed by st2.
    cycles = [upload(tm[s], payload, f"stale-{i}-{s}.csv")["cycle_id"]
              for i in range(4) for s in ("st1", "st2")]  # fmt: skip
    assert set(routed_by(cluster, tm["st2"], cycles).values()) == {"st2"}
    assert WORK_EVENTS not in cluster.active("st1", "transaction-manager")
    view = cluster.view()
    assert view["out_of_sync"] == ["st1"] and view["primary"] == "st2"

    report = cluster.run("sync")
    assert f"configuration version {view['config_version']}" in report, report
    assert f"st1: up, runs version {view['config_version']}, synchronized" in report, report
    wait_until(in_sync(cluster), 15, "every process in sync")
    wait_until(lambda: cluster.view()["primary"] == "st1", 30, "fail-back to st1 after the sync")
    wait_until(lambda: WORK_EVENTS in cluster.active("st1", "transaction-manager"), 30,
               "st1 consuming again")  # fmt: skip
    assert sorted(p.name for p in (data / "sync-c").iterdir()) == sorted(
        f"stale-{i}-{s}.csv" for i in range(4) for s in ("st1", "st2")
    )
