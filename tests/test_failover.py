"""Failover on real processes: 3-server local clusters on a real broker, in every mode.

SIGKILL every process of the primary server; the next server in list order takes over the
primary-only work within the connection timeout + 2 s; restarted, the first server is primary
again (active_active, passive). passive_legacy waits for a manual failover. Killing the
coordinator leader moves leadership, grows the epoch, and primary-only work never runs on two
servers at once (checked on the activation intervals every service records).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pika
import pytest

from ferrylink.cluster import (
    WORK_EVENTS,
    WORK_EVENTS_LOCAL,
    WORK_SCHEDULER,
    WORK_SENTINEL_LINK,
)
from ferrylink.contracts import FileArrived
from ferrylink.messaging import Topology
from ferrylink_ops.processes import pid_alive, time_of_death
from ferrylink_ops.tracking_sink import TrackingSink
from tests.cluster_support import Cluster
from tests.helpers import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

CONNECTION_TIMEOUT = 5.0  # the product's default


def assert_no_overlap(intervals: list[tuple[str, str, int, float, float]]) -> None:
    """Primary-only work of different servers never ran at the same time."""
    for i, (server_a, unit_a, epoch_a, start_a, end_a) in enumerate(intervals):
        for server_b, unit_b, epoch_b, start_b, end_b in intervals[i + 1 :]:
            if server_a != server_b:
                assert end_a <= start_b or end_b <= start_a, (
                    f"{unit_a}@{server_a} (epoch {epoch_a}) overlaps "
                    f"{unit_b}@{server_b} (epoch {epoch_b})"
                )


def wait_primary(
    cluster: Cluster, server: str, timeout: float, exclude: tuple[str, ...] = ()
) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        view = cluster.view(exclude)
        if view["primary"] == server and WORK_SCHEDULER in cluster.active(server, "scheduler"):
            return view
        return None

    return wait_until(ready, timeout, f"{server} primary with its scheduler running", 0.1)


@pytest.mark.parametrize("mode", ["active_active", "passive"])
def test_primary_killed_next_in_list_takes_over_then_fails_back(
    make_cluster: Any, mode: str
) -> None:
    cluster = make_cluster(mode)
    before = wait_primary(cluster, "st1", 30)
    assert [s["role"] for s in before["servers"]] == (
        ["primary", "secondary", "secondary"]
        if mode == "active_active"
        else ["primary", "standby", "standby"]
    )
    st1_pids = [svc["pid"] for svc in cluster.doc()["servers"][0]["services"].values()]

    # The clock starts when st1's last process died, not when the CLI was started: on a
    # loaded machine the CLI's own start took seconds of the budget (CI).
    died = time_of_death(st1_pids, lambda: cluster.run("server", "kill", "st1"))
    assert not any(pid_alive(pid) for pid in st1_pids)
    # The consumers and loops of the new primary run within the timeout + 2 s.
    after = wait_primary(
        cluster, "st2", CONNECTION_TIMEOUT + 2 - (time.time() - died), exclude=("st1",)
    )
    assert after["epoch"] > before["epoch"]
    states = {s["id"]: (s["state"], s["role"]) for s in after["servers"]}
    assert states["st1"][0] == "down"
    assert states["st2"] == ("up", "primary")
    # Each process receives the assignment on its own: poll briefly for the other units.
    wait_until(lambda: WORK_EVENTS in cluster.active("st2", "transaction-manager"), 3,
               "st2's TM consuming events")  # fmt: skip
    if mode == "active_active":
        wait_until(lambda: WORK_EVENTS in cluster.active("st3", "transaction-manager"), 3,
                   "st3's TM consuming events")  # fmt: skip
    else:
        assert WORK_EVENTS not in cluster.active("st3", "transaction-manager")
    assert WORK_SCHEDULER not in cluster.active("st3", "scheduler")

    cluster.run("server", "start", "st1")
    back = wait_primary(cluster, "st1", 30)
    assert back["epoch"] > after["epoch"]
    wait_until(lambda: not cluster.active("st2", "scheduler"), 10, "st2 to stop its scheduler")
    assert_no_overlap(cluster.intervals(["st1", "st2", "st3"]))


def test_fail_back_waits_until_the_old_primary_has_stopped(
    make_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old primary's grant runs out by time, but its work can take longer to stop: here
    its sentinel link waits on a tracking receiver that does not answer. The first server,
    back, is primary again at once, and its primary-only work waits until st2 reports that
    it stopped, past the time rule's `not_before`: none ran on both at once."""
    # A POST waits as long as the receiver holds it (the default timeout is 5 s), and one
    # is sent soon after the receiver starts holding (heartbeat records).
    monkeypatch.setenv("FERRYLINK_SENTINEL_TIMEOUT_SECONDS", "120")
    monkeypatch.setenv("FERRYLINK_SENTINEL_HEARTBEAT_SECONDS", "0.5")
    cluster = make_cluster("active_active", servers=2)
    wait_primary(cluster, "st1", 30)
    sink = TrackingSink()
    try:
        sentinel = f"http://127.0.0.1:{cluster.port('st2', 'sentinel-link')}"
        created = cluster.http.post(f"{sentinel}/endpoints",
                                    json={"name": "slow", "url": sink.url})  # fmt: skip
        assert created.status_code == 201, created.text
        cluster.run("server", "kill", "st1")
        wait_until(lambda: WORK_SENTINEL_LINK in cluster.active("st2", "sentinel-link"),
                   CONNECTION_TIMEOUT + 10, "st2 delivering as the primary")  # fmt: skip
        sink.hold()
        wait_until(lambda: sink.waiting > 0, 15, "st2's sentinel link waiting on a POST")

        cluster.run("server", "start", "st1")
        wait_until(lambda: cluster.view()["primary"] == "st1", 60, "st1 primary again")
        coordinator = f"http://127.0.0.1:{cluster.port('st2', 'cluster-coordinator')}"
        not_before = cluster.http.get(f"{coordinator}/cluster/assignment").json()["not_before"]
        # The time rule alone would let st1 start at `not_before`; st2 is still stopping.
        wait_until(lambda: time.time() > not_before + 2, 30, "the time rule's start passed")
        assert not cluster.active("st1", "scheduler"), "st1 started while st2 still worked"
        view = cluster.view()
        assert view["primary_work_waits_for"] == [f"st2/sentinel-link: runs {WORK_SENTINEL_LINK}"]

        sink.release()
        wait_primary(cluster, "st1", 30)
        stopped = [a for a in cluster.get("st2", "sentinel-link", "/work")["history"]
                   if a["unit"] == WORK_SENTINEL_LINK and a["end"] is not None]  # fmt: skip
        assert stopped and stopped[-1]["end"] > not_before + 2, stopped
        assert cluster.view()["primary_work_waits_for"] == []
        assert_no_overlap(cluster.intervals(["st1", "st2"]))
    finally:
        sink.stop()


def test_passive_legacy_waits_for_a_manual_failover(make_cluster: Any) -> None:
    cluster = make_cluster("passive_legacy")
    before = wait_primary(cluster, "st1", 30)
    # st2 may become live (all its services heard) a moment after st1 is made primary.
    wait_until(lambda: WORK_EVENTS_LOCAL in cluster.active("st2", "transaction-manager"), 15,
               "st2's TM listening on its own queue")  # fmt: skip
    assert WORK_SCHEDULER not in cluster.active("st2", "scheduler")

    cluster.run("server", "kill", "st1")
    # Events queued for the dead primary's own queue: the reference loses them.
    topology = Topology(prefix=cluster.prefix)
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for _ in range(3):
            channel.basic_publish(
                "",
                topology.node_queue("events", "st1"),
                FileArrived(account="nobody", path="x").to_bytes(),
                mandatory=True,
            )
    finally:
        connection.close()

    wait_until(
        lambda: cluster.view(("st1",))["servers"][0]["state"] == "down",
        CONNECTION_TIMEOUT + 5,
        "st1 to be seen down",
    )
    # No automatic promotion: st1 stays primary (down) and nobody runs the scheduler.
    view = cluster.view(("st1",))
    assert view["primary"] == "st1"
    assert not cluster.active("st2", "scheduler") and not cluster.active("st3", "scheduler")

    report = cluster.run("failover", "--to", "st2")
    assert "st2 is primary now (was st1" in report
    assert "3 queued event(s)" in report
    after = wait_primary(cluster, "st2", 10, exclude=("st1",))
    assert after["epoch"] > before["epoch"]

    # A malformed event on st2's own queue is parked in its node-local dead-letter queue,
    # kept by st2 and listed with the others.
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", topology.node_queue("events", "st2"), b"not json",
                              pika.BasicProperties(message_id="legacy-poison"),
                              mandatory=True)  # fmt: skip
    finally:
        connection.close()
    tm2 = f"http://127.0.0.1:{cluster.port('st2', 'transaction-manager')}"

    def listed() -> dict[str, Any] | None:
        items = cluster.http.get(f"{tm2}/events/dead", timeout=10).json()["items"]
        return next((item for item in items if item["id"] == "legacy-poison"), None)

    poison = wait_until(listed, 30, "the node-local dead letter listed")
    assert poison["queue"] == topology.node_queue("events", "st2"), poison
    assert "invalid JSON" in poison["reason"], poison

    # st1 comes back: no automatic fail-back in passive_legacy.
    cluster.run("server", "start", "st1")
    wait_until(lambda: cluster.view()["servers"][0]["state"] == "up", 30, "st1 up again")
    assert cluster.view()["primary"] == "st2"
    assert not cluster.active("st1", "scheduler")
    assert_no_overlap(cluster.intervals(["st1", "st2", "st3"]))


def test_leader_killed_another_leads_epoch_grows_no_overlap(make_cluster: Any) -> None:
    cluster = make_cluster("active_active")
    before = wait_primary(cluster, "st1", 30)
    leader = before["leader"]
    assert leader in {"st1", "st2", "st3"}
    leader_pid = next(
        s["services"]["cluster-coordinator"]["pid"]
        for s in cluster.doc()["servers"]
        if s["id"] == leader
    )
    os.kill(leader_pid, signal.SIGKILL)

    def new_leader() -> dict[str, Any] | None:
        view = cluster.view((leader,))
        return view if view["leader"] not in (None, leader) else None

    after = wait_until(new_leader, 30, "another coordinator to lead", 0.1)
    assert after["epoch"] > before["epoch"]

    # Whoever is primary now (st2 if the leader was st1's coordinator: st1 is down then)
    # runs the primary-only work, and nothing ran on two servers at once.
    def primary_working() -> str | None:
        primary = cluster.view((leader,))["primary"]
        return primary if WORK_SCHEDULER in cluster.active(primary, "scheduler") else None

    primary = wait_until(primary_working, CONNECTION_TIMEOUT + 10, "a working primary", 0.1)
    assert primary == ("st2" if leader == "st1" else "st1")
    assert_no_overlap(cluster.intervals(["st1", "st2", "st3"]))


def test_cluster_api_rejects_bad_input(make_cluster: Any) -> None:
    cluster = make_cluster("active_active")
    wait_primary(cluster, "st1", 30)
    base = f"http://127.0.0.1:{cluster.port('st2', 'cluster-coordinator')}/cluster"
    refused = cluster.http.post(f"{base}/failover", json={"to": "st2"})
    assert refused.status_code == 409 and "automatic" in refused.json()["error"]["message"]
    assert cluster.http.post(f"{base}/failover", json={"to": "st9"}).status_code == 404
    empty = cluster.http.put(f"{base}/servers", json={"servers": []})
    assert empty.status_code == 422 and "at least one" in empty.json()["error"]["message"]
    twice = cluster.http.put(f"{base}/servers", json={"servers": [{"id": "st1"}, {"id": "st1"}]})
    assert twice.status_code == 422 and "twice" in twice.json()["error"]["message"]
    mode = cluster.http.put(f"{base}/settings", json={"mode": "active_passive"})
    assert mode.status_code == 422 and "unknown cluster mode" in mode.json()["error"]["message"]
    short = cluster.http.put(f"{base}/settings", json={"connection_timeout": 1})
    assert short.status_code == 422 and "longer than" in short.json()["error"]["message"]
    assert cluster.http.put(f"{base}/settings", json={"connection_timeout": -1}).status_code == 422

    # A valid change is applied and seen by every server (dynamic synchronization).
    version = cluster.view()["config_version"]
    changed = cluster.http.put(
        f"{base}/settings", json={"mode": "passive", "connection_timeout": 6}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["mode"] == "passive"

    def synced() -> bool:
        view = cluster.view()
        return view["config_version"] > version and all(s["synchronized"] for s in view["servers"])

    wait_until(synced, 15, "every server synchronized to the new configuration")
    # passive now: only the primary consumes events.
    wait_until(lambda: WORK_EVENTS not in cluster.active("st2", "transaction-manager"), 10)
    assert WORK_EVENTS in cluster.active("st1", "transaction-manager")
