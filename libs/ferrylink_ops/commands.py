"""What the other commands do, from the files of a state directory: `ferrylink down`,
`server stop|start|kill`, `status`, `failover` and `sync`.

`server` asks the running supervisor (supervisor.py). When no supervisor runs (it was
SIGKILLed, say), `server stop|kill` and `down` act on the pids in `cluster.json` directly
(after checking that each pid still runs a Ferrylink command, against pid reuse);
`server start` then needs a new `ferrylink up`.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import httpx

from ferrylink_ops.admin_setup import auth_headers
from ferrylink_ops.local_cluster import (
    DOWN,
    HTTP_HOST,
    PROBE_TIMEOUT,
    ClusterError,
    cluster_processes,
    probe_ready,
    read_cluster_json,
    running_supervisor,
    runs_for,
)
from ferrylink_ops.processes import (
    pid_alive,
    signal_group,
    started_for,
    terminate_pids,
    wait_pids_gone,
    write_json_atomic,
)
from ferrylink_ops.supervisor import request_supervisor


def find_server(doc: dict[str, Any], server_id: str) -> dict[str, Any]:
    for server in doc.get("servers", []):
        if server.get("id") == server_id:
            return dict(server)
    known = ", ".join(str(s.get("id")) for s in doc.get("servers", []))
    raise ClusterError(f"unknown server {server_id!r}; this cluster has {known or 'no servers'}")


def act_without_supervisor(state_dir: Path, action: str, server_id: str) -> str:
    """`server stop|kill` when no supervisor runs: signal the recorded pids directly."""
    if action == "start":
        raise ClusterError(
            f"no supervisor runs for {state_dir}; start the cluster again with `ferrylink up`"
        )
    doc = read_cluster_json(state_dir)
    find_server(doc, server_id)
    for server in doc["servers"]:
        if server["id"] != server_id:
            continue
        pids = cluster_processes(state_dir, {"servers": [server]})
        if action == "kill":
            for pid in pids:
                signal_group(pid, signal.SIGKILL)
            wait_pids_gone(pids, 30.0)
        else:
            terminate_pids(pids)
        for svc in server["services"].values():
            svc["running"] = runs_for(state_dir, svc.get("pid"))
        server["state"] = DOWN
    write_json_atomic(state_dir / "cluster.json", doc)
    return f"{server_id} is down"


def server_action(state_dir: Path, action: str, server_id: str) -> str:
    """`ferrylink server stop|start|kill ID`; returns a message or raises ClusterError."""
    doc = read_cluster_json(state_dir)
    find_server(doc, server_id)
    if running_supervisor(state_dir) is None:
        return act_without_supervisor(state_dir, action, server_id)
    response = request_supervisor(state_dir, action, server_id)
    if not response.get("ok"):
        raise ClusterError(str(response.get("message", "failed")))
    return str(response.get("message", "done"))


def down(state_dir: Path, timeout: float = 60.0) -> str:
    """Stop a cluster: signal its supervisor; if it is gone, kill the recorded pids."""
    pid = running_supervisor(state_dir)
    messages = []
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        if wait_pids_gone([pid], timeout):
            messages.append(f"supervisor {pid} did not stop in {timeout:.0f} s; SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_pids_gone([pid], 10.0)
        else:
            messages.append(f"supervisor {pid} stopped the cluster")
    cluster_file = state_dir / "cluster.json"
    if not cluster_file.exists():
        if pid is None:
            return "no cluster runs here"
        return "; ".join(messages)
    doc = read_cluster_json(state_dir)
    left = cluster_processes(state_dir, doc)
    if left:
        messages.append(f"stopping {len(left)} leftover processes")
        terminate_pids(left)
    broker_pid = doc.get("broker_pid")
    if (
        broker_pid
        and pid_alive(broker_pid)
        # Its own node only: any RabbitMQ (the machine's own included) now holding the pid
        # has "rabbit" and "beam" in its command line, but not this broker's directory.
        and started_for(broker_pid, "RABBITMQ_MNESIA_BASE", state_dir / "broker", under=True)
    ):
        messages.append(f"stopping private broker {broker_pid}")
        terminate_pids([int(broker_pid)], 30.0)
    if pid is None or left:
        for server in doc.get("servers", []):
            for svc in server.get("services", {}).values():
                svc["running"] = runs_for(state_dir, svc.get("pid"))
            server["state"] = DOWN
        doc["status"] = "stopped"
        write_json_atomic(cluster_file, doc)
    if pid is None and not left:
        messages.append("nothing was running")
    return "; ".join(messages)


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------


def coordinator_view(doc: dict[str, Any], timeout: float = PROBE_TIMEOUT) -> dict[str, Any] | None:
    """The coordinators' `GET /cluster` (servers with state and role, primary, epoch, mode)
    from the first coordinator that answers with it; None while no coordinator serves it."""
    with httpx.Client(timeout=timeout, headers=auth_headers(doc.get("state_dir"))) as client:
        for server in doc.get("servers", []):
            url = server.get("api_url")
            if not url or server.get("state") == DOWN:
                continue
            try:
                response = client.get(f"{url}/cluster")
                view = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                continue
            if isinstance(view, dict) and isinstance(view.get("servers"), list):
                return view
    return None


def _shown(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def status_table(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]], list[str]]:
    """Headers, rows and header lines of `ferrylink status`: cluster.json, a live /readyz
    probe of each service and, when a coordinator serves `GET /cluster`, its view."""
    view = coordinator_view(doc)
    by_id: dict[str, dict[str, Any]] = {}
    notes = [
        f"mode: {doc.get('mode')}  status: {doc.get('status', '?')}  "
        f"supervisor: {doc.get('supervisor_pid', '-')}",
        f"broker: {doc.get('amqp_url')}  database: {doc.get('database_url')}",
    ]
    headers = ["server", "state", "service", "pid", "port", "alive", "ready"]
    if view is not None:
        by_id = {str(s.get("id")): s for s in view["servers"] if isinstance(s, dict)}
        notes.append(
            f"primary: {_shown(view.get('primary'))}  epoch: {_shown(view.get('epoch'))}  "
            f"leader: {_shown(view.get('leader'))}  coordinator mode: {_shown(view.get('mode'))}"
        )
        headers[2:2] = ["role", "seen as", "synced"]
    rows = []
    with httpx.Client(timeout=PROBE_TIMEOUT) as client:
        for server in doc.get("servers", []):
            extra = []
            if view is not None:
                seen = by_id.get(str(server.get("id")), {})
                synced = seen.get("synchronized")
                extra = [
                    _shown(seen.get("role")),
                    _shown(seen.get("state")),
                    "-" if synced is None else ("yes" if synced else "no"),
                ]
            for name, svc in server.get("services", {}).items():
                pid = svc.get("pid")
                alive = bool(svc.get("running", True)) and (
                    runs_for(Path(doc["state_dir"]), pid) if doc.get("state_dir")
                    else bool(pid) and pid_alive(pid)
                )  # fmt: skip
                ready = alive and probe_ready(client, f"http://{HTTP_HOST}:{svc.get('port')}")
                rows.append(
                    [
                        server.get("id"),
                        server.get("state", "?"),
                        *extra,
                        name,
                        pid if alive else "-",
                        svc.get("port"),
                        "yes" if alive else "no",
                        "yes" if ready else "no",
                    ]
                )
    return headers, rows, notes


# --------------------------------------------------------------------------------------------
# Manual failover
# --------------------------------------------------------------------------------------------


def manual_failover(state_dir: Path, to: str, timeout: float = 30.0) -> str:
    """Ask a live coordinator to promote `to` (passive_legacy) and describe what was lost."""
    doc = read_cluster_json(state_dir)
    refusal = ""
    with httpx.Client(timeout=timeout, headers=auth_headers(state_dir)) as client:
        for server in doc.get("servers", []):
            url = server.get("api_url")
            if not url or server.get("state") == DOWN:
                continue
            try:
                response = client.post(f"{url}/cluster/failover", json={"to": to})
            except httpx.HTTPError:
                continue
            if response.status_code == 200:
                report = response.json()
                return (
                    f"{report['primary']} is primary now (was {report['previous_primary']}, "
                    f"epoch {report['epoch']}); lost with the old primary: "
                    f"{report['lost_events']} queued event(s), "
                    f"{report['lost_sentinel_records']} sentinel-link record(s)"
                )
            try:
                refusal = response.json().get("error", {}).get("message", response.text)
            except ValueError:
                refusal = response.text
            if response.status_code < 500:
                break
    raise ClusterError(f"failover refused: {refusal}" if refusal else "no coordinator answers")


def sync_cluster(state_dir: Path, timeout: float = 30.0) -> str:
    """Ask a live coordinator to make every server reload the whole configuration; describe
    the version each server runs afterwards (raises when one did not get there)."""
    doc = read_cluster_json(state_dir)
    with httpx.Client(timeout=timeout + 10, headers=auth_headers(state_dir)) as client:
        for server in doc.get("servers", []):
            url = server.get("api_url")
            if not url or server.get("state") == DOWN:
                continue
            try:
                response = client.post(f"{url}/cluster/sync", params={"timeout": timeout})
            except httpx.HTTPError:
                continue
            if response.status_code != 200:
                raise ClusterError(f"sync refused: {response.text}")
            report = response.json()
            lines = [f"configuration version {report['config_version']}"]
            for entry in report["servers"]:
                synced = "synchronized" if entry["synchronized"] else "OUT OF SYNC"
                lines.append(
                    f"  {entry['id']}: {entry['state']}, runs version "
                    f"{_shown(entry.get('config_version'))}, {synced}"
                )
            if not report["complete"]:
                raise ClusterError("\n".join([*lines, "not every live server synchronized"]))
            return "\n".join(lines)
    raise ClusterError("no coordinator answers")
