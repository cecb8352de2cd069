"""The sentinel link on real processes, a real broker and a real HTTP receiver.

- passive, 2 servers: files are uploaded and routed while the primary is SIGKILLed; the
  receiver gets every leg of every cycle, each id with one seq (repeats dropped), in seq
  order per cycle.
- One of two endpoints down for a while under load (uploads through a route): the other
  receives each batch as it goes; the down one, once back, receives its whole backlog, each
  record once, in seq order per cycle.
- passive_legacy, manual failover: `lost_sentinel_records` is what the old primary had linked
  but not delivered (an endpoint kept down), since its link data is node-local.
- The bound of the transfer-states queue: with nothing consuming it, uploads and routing go
  on, and every state is either in the queue or counted as overflow on /metrics.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
from sqlmodel import Session

from ferrylink.cluster import WORK_EVENTS, WORK_EVENTS_LOCAL, WORK_SENTINEL_LINK
from ferrylink.config import read_sentinel_undelivered
from ferrylink.db import make_engine
from ferrylink.messaging import Topology
from ferrylink_ops.tracking_sink import TrackingSink
from tests.cluster_support import Cluster, server_doc
from tests.helpers import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.timeout(400)]

PASSWORD = "correct horse"


def url(cluster: Cluster, server: str, service: str) -> str:
    return f"http://127.0.0.1:{cluster.port(server, service)}"


def set_up_account(admin: httpx.Client, tm: str) -> None:
    created = admin.post(f"{tm}/accounts", json={"name": "acme", "password": PASSWORD})
    assert created.status_code == 201, created.text
    route = {"account": "acme", "pattern": "*.csv",
             "steps": [{"kind": "copy", "folder": "archive"}]}  # fmt: skip
    assert admin.post(f"{tm}/routes", json=route).status_code == 201


def upload(tm: str, name: str) -> dict[str, Any]:
    response = httpx.put(
        f"{tm}/files/acme/in/{name}", content=b"id\n" + name.encode(), auth=("acme", PASSWORD),
        timeout=30,
    )  # fmt: skip
    assert response.status_code == 201, response.text
    doc: dict[str, Any] = response.json()
    return doc


def expected_ids(event_id: str) -> list[str]:
    """A routed upload's records in journey order (the id ends with the leg's revision)."""
    return [f"{event_id}:receive:RECEIVING:1", f"{event_id}:receive:RECEIVED:2",
            f"{event_id}:route:ROUTED:1"]  # fmt: skip


def test_passive_primary_killed_mid_stream_every_leg_once_in_order(
    make_cluster: Any,
) -> None:
    cluster = make_cluster("passive", servers=2)
    wait_until(lambda: WORK_SENTINEL_LINK in cluster.active("st1", "sentinel-link"), 60,
               "st1's sentinel link active")  # fmt: skip
    wait_until(lambda: WORK_EVENTS in cluster.active("st1", "transaction-manager"), 60,
               "st1's transaction manager consuming")  # fmt: skip
    sink = TrackingSink()
    try:
        # Any server answers: configured on the standby, used by the primary.
        created = cluster.http.post(f"{url(cluster, 'st2', 'sentinel-link')}/endpoints",
                             json={"name": "tracker", "url": sink.url})  # fmt: skip
        assert created.status_code == 201, created.text
        # Uploads go to st2's transaction manager (it survives); st1, the primary, routes.
        tm = url(cluster, "st2", "transaction-manager")
        set_up_account(cluster.http, tm)
        uploads: list[dict[str, Any]] = []
        failures: list[BaseException] = []

        def feed() -> None:
            try:
                for n in range(60):
                    uploads.append(upload(tm, f"f{n:03d}.csv"))
            except BaseException as exc:
                failures.append(exc)

        feeder = threading.Thread(target=feed)
        feeder.start()
        routed = lambda: sum(1 for r in sink.states() if r["status"] == "ROUTED")  # noqa: E731
        wait_until(lambda: routed() >= 15, 60, "some files routed and tracked")
        cluster.run("server", "kill", "st1")
        feeder.join(120)
        assert not failures, failures
        assert len(uploads) == 60

        wanted = [i for u in uploads for i in expected_ids(u["event_id"])]
        wait_until(lambda: set(wanted) <= set(sink.unique_states()), 120,
                   "every leg of every cycle at the receiver")  # fmt: skip
        states = sink.states()
        # One seq per id: a repeat (resent after the failover) is the same record.
        seqs: dict[str, set[int]] = {}
        for record in states:
            seqs.setdefault(record["id"], set()).add(record["seq"])
        assert all(len(s) == 1 for s in seqs.values()), "an id arrived with two seqs"
        # In seq order per cycle (first arrival of each id), seq 1..3, the journey's order.
        for u in uploads:
            cycle = sink.by_cycle()[u["cycle_id"]]
            assert [r["seq"] for r in cycle] == [1, 2, 3]
            assert [r["id"] for r in cycle] == expected_ids(u["event_id"])
        # After the failover st2 delivers; the endpoint's status says so.
        assert WORK_SENTINEL_LINK in cluster.active("st2", "sentinel-link")
        endpoints_url = f"{url(cluster, 'st2', 'sentinel-link')}/endpoints"
        endpoints = cluster.http.get(endpoints_url).json()["items"]
        wait_until(
            lambda: cluster.http.get(endpoints_url).json()["items"][0]["backlog"] == 0,
            30,
            "an empty backlog",
        )
        assert endpoints[0]["name"] == "tracker" and endpoints[0]["dropped"] == 0
        assert sink.heartbeats(), "heartbeat records"
        print(f"{len(states)} records received, {len(states) - len(seqs)} repeats dropped")
    finally:
        sink.stop()


def nice_values(pid: int) -> set[int]:
    """The nice value of each thread of a process (Linux keeps one per thread)."""
    values = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        values.add(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
    return values


def test_one_endpoint_down_under_load_gets_its_whole_backlog_once_in_order(
    make_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Retries of the down endpoint every second or two, so it is served soon after it is back.
    monkeypatch.setenv("FERRYLINK_SENTINEL_BACKOFF_MAX", "2")
    cluster = make_cluster("active_active", servers=1)
    wait_until(lambda: WORK_SENTINEL_LINK in cluster.active("st1", "sentinel-link"), 60,
               "the sentinel link active")  # fmt: skip
    wait_until(lambda: WORK_EVENTS in cluster.active("st1", "transaction-manager"), 60,
               "the transaction manager consuming")  # fmt: skip
    # Tracking yields the CPU to the event path: every thread of the sentinel link, and its
    # autogroup (the kernel shares the CPU between sessions first), at nice 10.
    services = server_doc(cluster.doc(), "st1")["services"]
    link_pid, tm_pid = services["sentinel-link"]["pid"], services["transaction-manager"]["pid"]
    assert nice_values(link_pid) == {10}
    if Path("/proc/self/autogroup").exists():
        assert Path(f"/proc/{link_pid}/autogroup").read_text().split()[-2:] == ["nice", "10"]
        assert Path(f"/proc/{tm_pid}/autogroup").read_text().split()[-2:] == ["nice", "0"]
    assert nice_values(tm_pid) == {0}
    up, down = TrackingSink(), TrackingSink()
    down.stop()  # its port refuses connections until it is started again
    endpoints_url = f"{url(cluster, 'st1', 'sentinel-link')}/endpoints"
    try:
        for name, sink in (("up", up), ("down", down)):
            created = cluster.http.post(endpoints_url, json={"name": name, "url": sink.url,
                                                             "batch_size": 20})  # fmt: skip
            assert created.status_code == 201, created.text
        tm = url(cluster, "st1", "transaction-manager")
        set_up_account(cluster.http, tm)

        def status(name: str) -> dict[str, Any]:
            found: dict[str, Any] = next(
                e for e in cluster.http.get(endpoints_url).json()["items"] if e["name"] == name
            )
            return found

        def has_all(sink: TrackingSink, ids: list[str]) -> bool:
            return set(ids) <= set(sink.unique_states())

        def backlog_is(name: str, count: int) -> bool:
            return bool(status(name)["backlog"] == count)

        wanted: list[str] = []
        cycles: list[str] = []
        batches, per_batch = 3, 15
        with ThreadPoolExecutor(4) as pool:  # concurrent uploads: load on the link
            for batch in range(batches):
                names = [f"b{batch}-{n:03d}.csv" for n in range(per_batch)]
                uploads = list(pool.map(partial(upload, tm), names))
                wanted += [i for u in uploads for i in expected_ids(u["event_id"])]
                cycles += [u["cycle_id"] for u in uploads]
                # The up one has this batch while the other is still down: not held up.
                wait_until(partial(has_all, up, list(wanted)), 60,
                           f"batch {batch} at the endpoint that is up")  # fmt: skip
                assert not down.records
                wait_until(partial(backlog_is, "down", len(wanted)), 30,
                           "the down endpoint's backlog growing")  # fmt: skip
        failing = status("down")
        assert failing["failures"] >= 1 and failing["last_error"] == "ConnectError"
        assert failing["last_success_at"] is None and failing["dropped"] == 0
        assert status("up")["backlog"] == 0 and status("up")["failures"] == 0

        down.start()  # back, on the same port
        wait_until(partial(has_all, down, wanted), 60,
                   "the whole backlog at the endpoint that was down")  # fmt: skip
        wait_until(lambda: status("down")["backlog"] == 0, 30, "an empty backlog")
        received = [r["id"] for r in down.states()]
        assert sorted(received) == sorted(wanted), "each record once, nothing else"
        by_cycle = down.by_cycle()
        assert sorted(by_cycle) == sorted(cycles)
        for cycle in by_cycle.values():
            assert [r["seq"] for r in cycle] == [1, 2, 3]
            assert [r["status"] for r in cycle] == ["RECEIVING", "RECEIVED", "ROUTED"]
        # The same records, with the same seq, at both endpoints.
        seq_up = {i: r["seq"] for i, r in up.unique_states().items()}
        assert {i: r["seq"] for i, r in down.unique_states().items()} == seq_up
        recovered = status("down")
        assert recovered["failures"] == 0 and recovered["last_success_at"] is not None
        assert recovered["delivered"] >= len(wanted) and recovered["dropped"] == 0
    finally:
        up.stop()
        down.stop()


# See the closing note of this round; the issue stays open.
def test_passive_legacy_failover_reports_the_records_the_old_primary_had_not_delivered(
    make_cluster: Any,
) -> None:
    cluster = make_cluster("passive_legacy", servers=2)
    wait_until(lambda: WORK_SENTINEL_LINK in cluster.active("st1", "sentinel-link"), 60,
               "st1's sentinel link active")  # fmt: skip
    wait_until(lambda: WORK_EVENTS_LOCAL in cluster.active("st1", "transaction-manager"), 60,
               "st1's transaction manager consuming its own queue")  # fmt: skip
    wait_until(lambda: cluster.view()["servers"][1]["state"] == "up", 60, "st2 up")
    up, down = TrackingSink(), TrackingSink()
    down.stop()
    sentinel = url(cluster, "st1", "sentinel-link")
    try:
        created = cluster.http.post(f"{sentinel}/endpoints", json={"name": "up", "url": up.url})
        assert created.status_code == 201, created.text
        tm = url(cluster, "st1", "transaction-manager")
        set_up_account(cluster.http, tm)
        first = [upload(tm, f"a{n}.csv") for n in range(4)]
        delivered = [i for u in first for i in expected_ids(u["event_id"])]
        wait_until(lambda: set(delivered) <= set(up.unique_states()), 60, "first files tracked")
        # From now on one endpoint is down: what it has not received is lost with st1's
        # node-local link data (records linked before it was added are not queued for it).
        created = cluster.http.post(f"{sentinel}/endpoints",
                                    json={"name": "down", "url": down.url})  # fmt: skip
        assert created.status_code == 201, created.text
        second = [upload(tm, f"b{n}.csv") for n in range(5)]
        undelivered = [i for u in second for i in expected_ids(u["event_id"])]
        wait_until(lambda: set(undelivered) <= set(up.unique_states()), 60, "all at 'up'")
        link = cluster.http.get(f"{sentinel}/link").json()
        assert link["mode"] == "passive_legacy" and link["link_db"] != "shared"
        assert link["records"] == len(delivered) + len(undelivered)
        assert link["undelivered_records"] == len(undelivered)
        # The sentinel link reports it to the shared database about every second.
        engine = make_engine(f"sqlite:///{cluster.state_dir / 'ferrylink.db'}")
        try:

            def reported() -> int:
                with Session(engine) as session:
                    return read_sentinel_undelivered(session, "st1")

            wait_until(lambda: reported() == len(undelivered), 30, "the undelivered count")
        finally:
            engine.dispose()

        coordinator = url(cluster, "st2", "cluster-coordinator")
        answer = cluster.http.post(f"{coordinator}/cluster/failover", json={"to": "st2"},
                                   timeout=60)  # fmt: skip
        assert answer.status_code == 200, answer.text
        report = answer.json()
        assert (report["previous_primary"], report["primary"]) == ("st1", "st2")
        assert report["lost_sentinel_records"] == len(undelivered)
        assert report["lost_events"] == 0
        wait_until(lambda: WORK_SENTINEL_LINK in cluster.active("st2", "sentinel-link"), 30,
                   "st2's sentinel link active")  # fmt: skip
        wait_until(lambda: not cluster.active("st1", "sentinel-link"), 30, "st1's stopped")
        # st2 starts with empty link data of its own: nothing of st1's reaches 'down'.
        down.start()
        wait_until(lambda: down.heartbeats(), 30, "st2 delivering to 'down' (heartbeats)")
        assert not down.states()
    finally:
        up.stop()
        down.stop()


def queue_length(amqp_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        count: int = connection.channel().queue_declare(queue, passive=True).method.message_count
        return count
    finally:
        connection.close()


def overflow_metric(tm: str) -> float:
    text = httpx.get(f"{tm}/metrics").text
    found = re.search(r"^ferrylink_transfer_states_overflow_total (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_full_transfer_states_queue_never_stops_events(
    make_cluster: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bound = 10
    monkeypatch.setenv("FERRYLINK_TRANSFER_STATES_MAX_LENGTH", str(bound))
    # The server stays up (and keeps its work) without its sentinel link.
    monkeypatch.setenv(
        "FERRYLINK_REQUIRED_SERVICES",
        "transaction-manager,scheduler,folder-monitor,cluster-coordinator",
    )
    cluster = make_cluster("active_active", servers=1)
    wait_until(lambda: WORK_EVENTS in cluster.active("st1", "transaction-manager"), 60,
               "the transaction manager consuming")  # fmt: skip
    tm = url(cluster, "st1", "transaction-manager")
    # Configuration first: a dead service's stale config version would leave the server
    # unsynchronized (see the coordinator's view).
    set_up_account(cluster.http, tm)

    def sentinel_synchronized() -> bool:
        view = cluster.view()
        heard = view["servers"][0]["services"].get("sentinel-link", {})
        return bool(heard.get("config_version") == view["config_version"])

    wait_until(sentinel_synchronized, 30, "the sentinel link on the current configuration")
    # Nothing consumes the transfer states any more (a dead process is not restarted).
    sentinel_pid = cluster.doc()["servers"][0]["services"]["sentinel-link"]["pid"]
    os.kill(sentinel_pid, signal.SIGKILL)
    files = 30
    for n in range(files):
        upload(tm, f"g{n:03d}.csv")
    archive = cluster.state_dir / "data" / "archive"
    wait_until(lambda: len(list(archive.glob("*.csv"))) == files, 60, "every file routed")
    page = cluster.http.get(f"{tm}/transfers", params={"status": "ROUTED", "limit": 100}).json()
    assert page["total"] == files
    queue = Topology(prefix=cluster.prefix).queue("transfer-states")
    stored = queue_length(cluster.amqp_url, queue)
    overflow = overflow_metric(tm)
    # A quorum queue learns it is full a little late: concurrent publishers overshoot the
    # bound by what they had in flight (stored and counted, never lost silently).
    assert bound <= stored <= bound + 10
    assert overflow >= 3 * files - bound - 10
    # Every state is accounted for: in the queue, or counted as dropped.
    assert stored + overflow == 3 * files
