"""End-to-end events per second: file.arrived events through the transaction manager (a
route with one move step, SQLite, the local cluster), with 1 and 2 servers in active_active,
next to the raw broker publish+consume rate on the same queue type in the same run.

Target (README): end-to-end at least half the raw broker rate.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from typing import Any

import httpx
import pika
from sqlalchemy import func
from sqlmodel import Session, col, select

from bench.common import BenchCluster, broker_url, local_cluster, report
from ferrylink.cluster import WORK_EVENTS
from ferrylink.contracts import FileArrived
from ferrylink.db import make_engine
from ferrylink.messaging import Publisher, Topology, wait_all
from ferrylink.models import ProcessedEvent
from ferrylink_ops.polling import wait_until


def raw_rate(url: str, count: int) -> float:
    """Publish (pipelined confirms) and consume+ack `count` messages on a quorum queue."""
    topology = Topology(prefix=f"bench-raw-{uuid.uuid4().hex[:6]}")
    queue = topology.queue("events")
    publisher = Publisher([url], declare=topology.declare).start()
    publisher.wait_connected(30)
    consumed = 0
    done = threading.Event()

    def consume() -> None:
        nonlocal consumed
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        channel.basic_qos(prefetch_count=100)

        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
            nonlocal consumed
            ch.basic_ack(method.delivery_tag)
            consumed += 1
            if consumed == count:
                ch.stop_consuming()

        channel.basic_consume(queue, on_message)
        done.set()
        channel.start_consuming()
        connection.close()

    consumer = threading.Thread(target=consume)
    consumer.start()
    done.wait(30)
    body = FileArrived(account="bench", path="x").to_bytes()
    started = time.perf_counter()
    futures = [publisher.publish("", queue, body) for _ in range(count)]
    wait_all(futures, 120)
    consumer.join(120)
    elapsed = time.perf_counter() - started
    publisher.close()
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    for name in (queue, topology.dead_letter_queue(queue)):
        channel.queue_delete(name)
    connection.close()
    return count / elapsed


def set_up_route(cluster: BenchCluster, server: str = "st1") -> None:
    """Account `bench` with a route moving every file to `done`."""
    base = f"http://127.0.0.1:{cluster.port(server, 'transaction-manager')}"
    auth = cluster.headers
    httpx.post(
        f"{base}/accounts", json={"name": "bench", "password": "bench-pass"}, headers=auth
    ).raise_for_status()
    httpx.post(f"{base}/routes", json={"account": "bench", "pattern": "*", "steps": [
        {"kind": "move", "folder": "done"}]}, headers=auth).raise_for_status()  # fmt: skip


def events_per_second(cluster: BenchCluster, url: str, count: int, tag: str = "") -> float:
    """Publish `count` file.arrived events for fresh files at once; events per second until
    the transaction managers have processed them all."""
    home = cluster.state_dir / "data" / "homes" / "bench"
    events = []
    for i in range(count):
        (home / f"f{tag}{i}").write_text("x")
        events.append(FileArrived(account="bench", path=f"f{tag}{i}"))
    engine = make_engine(f"sqlite:///{cluster.state_dir / 'ferrylink.db'}")
    publisher = Publisher([url]).start()
    publisher.wait_connected(30)
    queue = Topology(prefix=cluster.prefix).queue("events")
    ids = [e.id for e in events]
    since = time.time()
    started = time.perf_counter()
    wait_all([publisher.publish("", queue, e.to_bytes(), message_id=e.id) for e in events], 120)

    def processed() -> bool:
        # The poll must not compete with what it measures: while under way, a count over the
        # processed_at index (only this run's file arrivals complete in this fresh cluster);
        # the exact count of these ids once that says done.
        with Session(engine) as session:
            done = session.exec(
                select(func.count())
                .select_from(ProcessedEvent)
                .where(col(ProcessedEvent.processed_at) >= since,
                       col(ProcessedEvent.kind) == "file.arrived")
            ).one()  # fmt: skip
            if int(done) < count:
                return False
            n = session.exec(
                select(func.count())
                .select_from(ProcessedEvent)
                .where(col(ProcessedEvent.event_id).in_(ids))
            ).one()
        return int(n) == count

    wait_until(processed, 600, "every event processed", 0.05)
    elapsed = time.perf_counter() - started
    publisher.close()
    engine.dispose()
    return count / elapsed


def end_to_end_rate(url: str, servers: int, count: int) -> float:
    with local_cluster(servers, "active_active", url) as cluster:
        for server in [f"st{i + 1}" for i in range(servers)]:

            def consuming(server: str = server) -> bool:
                return WORK_EVENTS in cluster.active(server, "transaction-manager")

            wait_until(consuming, 60, f"{server} consuming")
        set_up_route(cluster)
        return events_per_second(cluster, url, count)


def run(count: int, raw_count: int) -> dict[str, Any]:
    with broker_url() as url:
        # A node started for the run is slow at first (a cold raw rate would flatter the
        # ratio): warm it up, then measure.
        raw_rate(url, min(raw_count, 5000))
        raw = raw_rate(url, raw_count)
        one = end_to_end_rate(url, 1, count)
        two = end_to_end_rate(url, 2, count)
    return {
        "events": count,
        "raw_broker_msgs_per_s": raw,
        "end_to_end_events_per_s": {"1_server": one, "2_servers": two},
        "ratio_to_raw": {"1_server": one / raw, "2_servers": two / raw},
        "target_ratio": 0.5,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--raw", type=int, default=20000)
    args = parser.parse_args(argv)
    data = run(args.events, args.raw)
    raw = data["raw_broker_msgs_per_s"]
    rows = [["raw broker (quorum, confirms, ack)", f"{raw:.0f}", "1.00"]]
    for label, key in (
        ("end-to-end, 1 server", "1_server"),
        ("end-to-end, 2 servers", "2_servers"),
    ):
        rate = data["end_to_end_events_per_s"][key]
        rows.append([label, f"{rate:.0f}", f"{rate / raw:.2f}"])
    report("events", rows, ["path", "per second", "ratio to raw"], data)
    return data


if __name__ == "__main__":
    main()
