"""Failover time: SIGKILL every process of the primary, measure until the first event is
processed by the new primary. Passive mode (only the primary consumes events), 3 servers,
events published at a steady rate throughout; after each kill the old primary is restarted
and fails back before the next round. Also counts, at the destination, files lost or
delivered twice: every event's file is copied by a route to `delivered/` with
`if_exists: version`, so a second delivery would show as a versioned name (`f1_1.dat`).

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
OTHERS = ("st2", "st3")


class SteadyPublisher:
    """Publishes one event every `interval` seconds until stopped; remembers every id."""

    def __init__(self, cluster: BenchCluster, interval: float = 0.02) -> None:
        # Real work for the TM: an account whose route copies each file to `delivered/`.
        tm = f"http://127.0.0.1:{cluster.port('st1', 'transaction-manager')}"
        created = httpx.post(f"{tm}/accounts", json={"name": "bench", "password": "bench-pass"},
                             headers=cluster.headers)  # fmt: skip
        created.raise_for_status()
        route = {"account": "bench", "pattern": "*", "steps": [
            {"kind": "copy", "folder": "delivered", "if_exists": "version"}]}  # fmt: skip
        httpx.post(f"{tm}/routes", json=route, headers=cluster.headers).raise_for_status()
        self.home = cluster.state_dir / "data" / "homes" / "bench"
        self.delivered = cluster.state_dir / "data" / "delivered"
        self.names: list[str] = []
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
            self.names.append(name)

    def deliveries(self) -> tuple[int, int]:
        """(published files not at the destination, extra copies there), counted on disk."""
        present = {p.name for p in self.delivered.iterdir()} if self.delivered.is_dir() else set()
        published = set(self.names)
        return len(published - present), len(present - published)


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
                # The fail-back is complete: no other server consumes events any more (or a
                # late event of theirs would pass for a takeover).
                wait_until(
                    lambda: (
                        not any(
                            WORK_EVENTS in cluster.active(s, "transaction-manager") for s in OTHERS
                        )
                    ),
                    60,
                    "only st1 consuming events",
                )
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
        # Counted at the destination: every published file there once, no versioned copy.
        try:
            wait_until(lambda: publisher.deliveries()[0] == 0, 120, "every file delivered", 0.5)
        except TimeoutError:
            pass  # reported as lost below
        lost, twice = publisher.deliveries()
        engine.dispose()
    stats = summary(times)
    return {
        "connection_timeout_s": CONNECTION_TIMEOUT,
        "failover_s": stats,
        "median_beyond_timeout_s": stats["median"] - CONNECTION_TIMEOUT,
        "target_beyond_timeout_s": 1.0,
        "events_published": len(published),
        "files_lost": lost,
        "files_delivered_twice": twice,
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
                f"{data['files_lost']}",
                f"{data['files_delivered_twice']}",
            ]
        ],
        [
            "failover",
            "median s",
            "max s",
            "timeout s",
            "median - timeout",
            "events",
            "lost",
            "twice",
        ],
        data,
    )
    return data


if __name__ == "__main__":
    main()
