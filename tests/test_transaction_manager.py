"""The transaction manager on real processes: uploads, routing, the transfer log, dead
letters, and exactly-once delivery across a SIGKILL in active_active."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
from sqlmodel import Session, col, func, select

from ferrylink.cluster import WORK_EVENTS
from ferrylink.contracts import FileArrived
from ferrylink.db import make_engine
from ferrylink.messaging import Topology
from ferrylink.models import ProcessedEvent, Transfer
from services.scheduler.defaults import DEFAULT_JOBS
from tests.cluster_support import Cluster
from tests.helpers import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]


def tm_url(cluster: Cluster, server: str = "st1") -> str:
    return f"http://127.0.0.1:{cluster.port(server, 'transaction-manager')}"


def data_dir(cluster: Cluster) -> Path:
    return cluster.state_dir / "data"


def publish_raw(cluster: Cluster, bodies: list[bytes], message_ids: list[str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        queue = Topology(prefix=cluster.prefix).queue("events")
        for body, message_id in zip(bodies, message_ids, strict=True):
            channel.basic_publish(
                "", queue, body, pika.BasicProperties(message_id=message_id), mandatory=True
            )
    finally:
        connection.close()


def create_account(cluster: Cluster, name: str = "acme", password: str = "correct horse") -> None:
    response = cluster.http.post(
        f"{tm_url(cluster)}/accounts", json={"name": name, "password": password}
    )
    assert response.status_code == 201, response.text


def wait_tm_ready(cluster: Cluster, servers: list[str]) -> None:
    for server in servers:

        def consuming(server: str = server) -> bool:
            return WORK_EVENTS in cluster.active(server, "transaction-manager")

        wait_until(consuming, 30, f"{server}'s TM consuming events")


def test_upload_is_routed_and_logged(make_cluster: Any, tmp_path: Path) -> None:
    cluster = make_cluster("active_active", servers=1)
    wait_tm_ready(cluster, ["st1"])
    base = tm_url(cluster)
    create_account(cluster)
    route = {"account": "acme", "pattern": "*.csv", "steps": [
        {"kind": "checksum", "algorithm": "sha256"},
        {"kind": "rename", "template": "{stem}_{counter}.{ext}"},
        {"kind": "copy", "folder": "archive"},
        {"kind": "move", "folder": "outbound/acme"},
    ]}  # fmt: skip
    assert cluster.http.post(f"{base}/routes", json=route).status_code == 201
    payload = tmp_path / "orders.csv"
    payload.write_bytes(b"id,qty\n" + b"1,2\n" * 100_000)
    # A real HTTP client, streaming the file.
    result = subprocess.run(
        ["curl", "-sS", "-f", "-u", "acme:correct horse", "-T", str(payload),
         f"{base}/files/acme/in/orders.csv"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    upload = json.loads(result.stdout)
    assert upload["bytes"] == payload.stat().st_size and upload["path"] == "in/orders.csv"

    moved = data_dir(cluster) / "outbound" / "acme" / "orders_1.csv"
    wait_until(moved.exists, 30, "the routed file")
    assert moved.read_bytes() == payload.read_bytes()
    assert (data_dir(cluster) / "archive" / "orders_1.csv").read_bytes() == payload.read_bytes()
    assert not (data_dir(cluster) / "homes" / "acme" / "in" / "orders.csv").exists()

    def legs() -> list[dict[str, Any]]:
        page = cluster.http.get(f"{base}/transfers", params={"cycle_id": upload["cycle_id"]}).json()
        items: list[dict[str, Any]] = page["items"]
        return items if {i["status"] for i in items} == {"RECEIVED", "ROUTED"} else []

    found = wait_until(legs, 30, "the transfer log")
    assert {(i["leg"], i["direction"], i["protocol"]) for i in found} == {
        ("receive", "inbound", "http"),
        ("route", "internal", "file"),
    }
    assert all(i["account"] == "acme" and i["bytes"] == payload.stat().st_size for i in found)
    # Filters and paging.
    assert cluster.http.get(f"{base}/transfers", params={"account": "nobody"}).json()["total"] == 0
    page = cluster.http.get(f"{base}/transfers", params={"direction": "inbound", "limit": 1}).json()
    assert page["total"] == 1 and len(page["items"]) == 1
    assert cluster.http.get(f"{base}/transfers", params={"limit": 0}).status_code == 422

    # Wrong password, path escape, no file name: refused, nothing written.
    bad = httpx.put(f"{base}/files/acme/x.csv", content=b"x", auth=("acme", "wrong"))
    assert bad.status_code == 401
    escape = httpx.put(
        f"{base}/files/acme/..%2F..%2Fetc%2Fx", content=b"x", auth=("acme", "correct horse")
    )
    assert escape.status_code == 400 and "'..'" in escape.json()["error"]["message"]
    assert not list((data_dir(cluster) / "homes").glob("*.csv"))


def test_bad_events_are_dead_lettered_with_reasons_and_replayable(make_cluster: Any) -> None:
    cluster = make_cluster("active_active", servers=1)
    wait_tm_ready(cluster, ["st1"])
    base = tm_url(cluster)
    create_account(cluster)
    home = data_dir(cluster) / "homes" / "acme"
    (home / "ok.txt").write_text("fine")
    unknown = FileArrived(account="ghost", path="a.txt")
    missing = FileArrived(account="acme", path="nope.txt")
    good = FileArrived(account="acme", path="ok.txt")
    future = json.loads(FileArrived(account="acme", path="x").to_bytes())
    future["schema_version"] = 9
    publish_raw(cluster, [b"{not json", json.dumps(future).encode(), unknown.to_bytes(),
                          missing.to_bytes(), good.to_bytes()],
                ["bad-json", "v9", unknown.id, missing.id, good.id])  # fmt: skip

    def dead() -> dict[str, str]:
        items = cluster.http.get(f"{base}/events/dead").json()["items"]
        return {i["id"]: i["reason"] for i in items} if len(items) == 4 else {}

    reasons = wait_until(dead, 30, "four dead letters")
    assert "invalid JSON" in reasons["bad-json"]
    assert "unknown schema version 9" in reasons["v9"]
    assert "unknown account 'ghost'" in reasons[unknown.id]
    assert "missing file 'nope.txt'" in reasons[missing.id]
    engine = make_engine(f"sqlite:///{cluster.state_dir / 'ferrylink.db'}")
    # The consumer kept going: the good event was processed.
    wait_until(lambda: _processed(engine, [good.id]) == 1, 30, "the good event")

    # Fix the causes, then replay.
    create_account(cluster, "ghost")
    (data_dir(cluster) / "homes" / "ghost" / "a.txt").write_text("late")
    (home / "nope.txt").write_text("restored")
    for event_id in (unknown.id, missing.id):
        replayed = cluster.http.post(f"{base}/events/dead/{event_id}/replay")
        assert replayed.status_code == 200 and replayed.json()["replayed_at"]
    wait_until(lambda: _processed(engine, [unknown.id, missing.id]) == 2, 30, "the replays")
    assert {i["id"] for i in cluster.http.get(f"{base}/events/dead").json()["items"]} == {
        "bad-json",
        "v9",
    }
    assert cluster.http.post(f"{base}/events/dead/nothing/replay").status_code == 404
    engine.dispose()


def _processed(engine: Any, ids: list[str]) -> int:
    with Session(engine) as session:
        statement = (
            select(func.count())
            .select_from(ProcessedEvent)
            .where(col(ProcessedEvent.event_id).in_(ids))
        )
        return int(session.exec(statement).one())


def _route_files(cluster: Cluster, count: int) -> list[FileArrived]:
    """`count` files in acme's home, a route that renames (with a counter) and moves them,
    and one file.arrived event each."""
    base = tm_url(cluster)
    create_account(cluster)
    route = {"account": "acme", "pattern": "*.dat", "steps": [
        {"kind": "rename", "template": "{counter}-{name}"},
        {"kind": "move", "folder": "delivered"},
    ]}  # fmt: skip
    assert cluster.http.post(f"{base}/routes", json=route).status_code == 201
    home = data_dir(cluster) / "homes" / "acme"
    events = []
    for i in range(count):
        (home / f"f{i:04d}.dat").write_text(f"payload {i}")
        events.append(FileArrived(account="acme", path=f"f{i:04d}.dat"))
    return events


def test_two_servers_share_the_stream_and_a_killed_tm_delivers_nothing_twice(
    make_cluster: Any,
) -> None:
    cluster = make_cluster("active_active", servers=2)
    wait_tm_ready(cluster, ["st1", "st2"])
    events = _route_files(cluster, 1000)
    engine = make_engine(f"sqlite:///{cluster.state_dir / 'ferrylink.db'}")
    publish_raw(cluster, [e.to_bytes() for e in events], [e.id for e in events])
    ids = [e.id for e in events]
    wait_until(lambda: _processed(engine, ids) >= 200, 60, "processing under way")
    victim = next(s for s in cluster.doc()["servers"] if s["id"] == "st2")
    os.kill(victim["services"]["transaction-manager"]["pid"], signal.SIGKILL)
    wait_until(lambda: _processed(engine, ids) == 1000, 120, "every event processed")

    delivered = sorted(p.name for p in (data_dir(cluster) / "delivered").iterdir())
    # Exactly once at the destination: 1000 files, each source file once.
    assert len(delivered) == 1000
    assert sorted(name.split("-", 1)[1] for name in delivered) == sorted(
        f"f{i:04d}.dat" for i in range(1000)
    )
    assert not list((data_dir(cluster) / "homes" / "acme").glob("*.dat"))
    with Session(engine) as session:
        by_node = dict(session.exec(
            select(ProcessedEvent.node_id, func.count()).group_by(ProcessedEvent.node_id)
        ).all())  # fmt: skip
        routed = session.exec(
            select(func.count())
            .select_from(Transfer)
            .where(Transfer.leg == "route", Transfer.status == "ROUTED")
        ).one()
    assert by_node.get("st1", 0) > 0 and by_node.get("st2", 0) > 0, by_node
    assert routed == 1000  # the transfer log agrees
    engine.dispose()


def test_passive_only_the_primary_processes_events(make_cluster: Any) -> None:
    cluster = make_cluster("passive", servers=2)
    wait_tm_ready(cluster, ["st1"])
    assert WORK_EVENTS not in cluster.active("st2", "transaction-manager")
    events = _route_files(cluster, 100)
    engine = make_engine(f"sqlite:///{cluster.state_dir / 'ferrylink.db'}")
    publish_raw(cluster, [e.to_bytes() for e in events], [e.id for e in events])
    wait_until(lambda: _processed(engine, [e.id for e in events]) == 100, 60, "processing")
    with Session(engine) as session:
        nodes = set(session.exec(select(ProcessedEvent.node_id)).all())
    assert nodes == {"st1"}
    # The primary keeps the transfer log; the standby answers with it too (forwarded).
    query = {"limit": 7, "offset": 3, "status": "ROUTED"}
    primary = cluster.http.get(f"{tm_url(cluster, 'st1')}/transfers", params=query)
    standby = cluster.http.get(f"{tm_url(cluster, 'st2')}/transfers", params=query)
    assert primary.status_code == standby.status_code == 200, standby.text
    assert standby.headers["x-ferrylink-served-by"] == "st1"
    assert standby.json() == primary.json() and primary.json()["total"] == 100
    assert len(standby.json()["items"]) == 7
    # The standby still checks the token itself before forwarding anything.
    anonymous = httpx.get(f"{tm_url(cluster, 'st2')}/transfers")
    assert anonymous.status_code == 401
    engine.dispose()


def test_scheduled_maintenance_runs_through_the_transaction_manager(make_cluster: Any) -> None:
    cluster = make_cluster("active_active", servers=1)
    wait_tm_ready(cluster, ["st1"])
    engine = make_engine(f"sqlite:///{cluster.state_dir / 'ferrylink.db'}")
    with Session(engine) as session:
        old = datetime.now(UTC) - timedelta(days=40)
        for age, key in ((old, "old"), (datetime.now(UTC), "new")):
            session.add(Transfer(leg_key=key, cycle_id=key, event_id=key, leg="receive",
                                 direction="inbound", account="acme", file_name=f"{key}.csv",
                                 protocol="http", status="RECEIVED", node_id="st1",
                                 started_at=age))  # fmt: skip
        session.commit()
    scheduler = f"http://127.0.0.1:{cluster.port('st1', 'scheduler')}"
    created = cluster.http.post(f"{scheduler}/jobs", json={
        "name": "purge", "kind": "transfer_log_purge", "interval_seconds": 1,
        "params": {"days": 30}})  # fmt: skip
    assert created.status_code == 201, created.text

    def maintenance_done() -> bool:
        with Session(engine) as session:
            done = session.exec(
                select(func.count())
                .select_from(ProcessedEvent)
                .where(ProcessedEvent.kind == "maintenance.run")
            ).one()
        return int(done) >= 1

    wait_until(maintenance_done, 30, "a maintenance run completed by the TM")
    with Session(engine) as session:
        left = set(session.exec(select(Transfer.leg_key)).all())
    assert "old" not in left and "new" in left
    # The job run says what it removed (the first run the old record, later ones nothing).
    runs_url = f"{scheduler}/jobs/{created.json()['id']}/runs"

    def reports() -> list[tuple[str, int | None, str]]:
        items = cluster.http.get(runs_url, params={"limit": 100}).json()["items"]
        return [(r["status"], r["removed"], r["result"]) for r in items]

    wait_until(lambda: ("done", 1, "transfer 1") in reports(), 30, "the run's report")
    # The scheduler created the default maintenance jobs at its start, one per purge kind.
    names = {j["name"] for j in cluster.http.get(f"{scheduler}/jobs").json()["items"]}
    assert {job.name for job in DEFAULT_JOBS} <= names
    assert cluster.http.get(f"{tm_url(cluster)}/events/dead").json()["items"] == []
    engine.dispose()
