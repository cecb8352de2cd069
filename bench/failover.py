"""Failover time: SIGKILL every process of the primary, measure until the first event is
processed by the new primary. Passive mode (only the primary consumes events), 3 servers,
events published at a steady rate throughout; after each kill the old primary is restarted
and fails back before the next round. Also counts, at the destination, files lost or
delivered twice: every event's file is copied by a route to `delivered-<account>/` with
`if_exists: version`, so a second delivery would show as a versioned name (`f1_1.dat`).

Before the kills, a quiet phase under load: for `--quiet` seconds a flood of events (as fast
as one publisher confirms them, each a file copied by the route) runs beside the steady
ones, nothing is killed, and every change of primary or of epoch is a false failover. With
`--timeout 1` the cluster runs at a 1 s connection timeout (lease, heartbeat and fence
margin scaled to it, `timing_for`).

Targets (README): median within 1 s beyond the configured connection timeout; no false
failover under load, down to a 1 s timeout.
"""

from __future__ import annotations

import argparse
import threading
import time
from itertools import pairwise
from typing import Any

import httpx
from sqlalchemy import func
from sqlalchemy.engine import Engine
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
from ferrylink.models import ClusterState, ProcessedEvent
from ferrylink_ops.polling import wait_until
from ferrylink_ops.processes import time_of_death

CONNECTION_TIMEOUT = 5.0  # the product's default
OTHERS = ("st2", "st3")


def timing_for(timeout: float) -> dict[str, str]:
    """The cluster's settings for a connection timeout: the defaults (5 s: lease 3 s,
    heartbeat 1 s, fence margin 1 s) scaled down with it, never above them. The lease must
    stay below the timeout (a cut-off primary stops before another is promoted), and a
    timeout should span several heartbeats."""
    return {
        "FERRYLINK_CONNECTION_TIMEOUT": f"{timeout:g}",
        "FERRYLINK_LEASE_SECONDS": f"{min(3.0, 0.6 * timeout):g}",
        "FERRYLINK_HEARTBEAT_INTERVAL": f"{min(1.0, 0.25 * timeout):g}",
        "FERRYLINK_FENCE_MARGIN_SECONDS": f"{min(1.0, 0.2 * timeout):g}",
    }


class SteadyPublisher:
    """Publishes one event every `interval` seconds until stopped; remembers every id."""

    def __init__(
        self, cluster: BenchCluster, interval: float = 0.02, account: str = "bench"
    ) -> None:
        # Real work for the TM: an account whose route copies each file to `delivered/`.
        tm = f"http://127.0.0.1:{cluster.port('st1', 'transaction-manager')}"
        created = httpx.post(f"{tm}/accounts", json={"name": account, "password": "bench-pass"},
                             headers=cluster.headers)  # fmt: skip
        created.raise_for_status()
        step = {"kind": "copy", "folder": f"delivered-{account}", "if_exists": "version"}
        route = {"account": account, "pattern": "*", "steps": [step]}
        httpx.post(f"{tm}/routes", json=route, headers=cluster.headers).raise_for_status()
        self.account = account
        self.home = cluster.state_dir / "data" / "homes" / account
        self.delivered = cluster.state_dir / "data" / f"delivered-{account}"
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
            event = FileArrived(account=self.account, path=name)
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


class ClusterWatch:
    """Reads who is primary under which epoch every 50 ms, in a thread, and keeps every
    change it sees."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seen: list[tuple[float, int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClusterWatch:
        self.seen.append((time.time(), *self._read()))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _read(self) -> tuple[int, str | None]:
        with Session(self.engine) as session:
            state = session.get(ClusterState, 1)
            return (state.epoch, state.primary) if state is not None else (0, None)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            epoch, primary = self._read()
            if (epoch, primary) != self.seen[-1][1:]:
                self.seen.append((time.time(), epoch, primary))

    def changes(self) -> tuple[int, int]:
        """(changes of primary, changes of epoch) since the watch began."""
        primaries = sum(1 for a, b in pairwise(self.seen) if a[2] != b[2])
        epochs = sum(1 for a, b in pairwise(self.seen) if a[1] != b[1])
        return primaries, epochs


def quiet_phase(
    cluster: BenchCluster, engine: Engine, seconds: float
) -> tuple[dict[str, Any], SteadyPublisher]:
    """`seconds` of an event flood beside the steady events, nothing killed: every change of
    primary or epoch seen meanwhile is a false failover."""
    flood = SteadyPublisher(cluster, interval=0, account="flood")
    flood.start()
    with ClusterWatch(engine) as watch:
        time.sleep(seconds)  # the phase's length: the load runs, the watch counts
        flood.stop()
    primaries, epochs = watch.changes()
    result = {
        "seconds": seconds,
        "flood_events": len(flood.ids),
        "flood_events_per_s": len(flood.ids) / seconds,
        "primary_changes": primaries,
        "epoch_changes": epochs,
    }
    print(
        f"quiet phase: {len(flood.ids)} flood events in {seconds:g} s, "
        f"{primaries} primary changes, {epochs} epoch changes",
        flush=True,
    )
    return result, flood


def run(rounds: int, timeout: float = CONNECTION_TIMEOUT, quiet: float = 30.0) -> dict[str, Any]:
    with broker_url() as url, local_cluster(3, "passive", url, timing_for(timeout)) as cluster:
        engine = make_engine(f"sqlite:///{cluster.state_dir / 'ferrylink.db'}")
        publisher = SteadyPublisher(cluster)
        publisher.start()
        times: list[float] = []
        flood: SteadyPublisher | None = None
        quiet_result: dict[str, Any] = {}
        try:
            wait_until(
                lambda: WORK_EVENTS in cluster.active("st1", "transaction-manager"),
                60,
                "st1 consuming events",
            )
            if quiet > 0:
                quiet_result, flood = quiet_phase(cluster, engine, quiet)
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
                # From the moment st1's last process died, not from before the command
                # that kills it: that command's own start took up to a second here.
                st1_pids = [svc["pid"] for svc in cluster.doc()["servers"][0]["services"].values()]
                killed_at = time_of_death(
                    st1_pids,
                    lambda: ferrylink(
                        "server", "kill", "st1", "--state-dir", str(cluster.state_dir)
                    ),
                )

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
        publishers = [publisher] if flood is None else [publisher, flood]
        published = sum(len(p.ids) for p in publishers)

        def counted() -> tuple[int, int]:
            found = [p.deliveries() for p in publishers]
            return sum(lost for lost, _ in found), sum(twice for _, twice in found)

        # Counted at the destination: every published file there once, no versioned copy.
        try:
            wait_until(lambda: counted()[0] == 0, 120, "every file delivered", 0.5)
        except TimeoutError:
            pass  # reported as lost below
        lost, twice = counted()
        engine.dispose()
    stats = summary(times)
    return {
        "connection_timeout_s": timeout,
        "timing": timing_for(timeout),
        "quiet_phase": quiet_result,
        "failover_s": stats,
        "median_beyond_timeout_s": stats["median"] - timeout,
        "target_beyond_timeout_s": 1.0,
        "events_published": published,
        "files_lost": lost,
        "files_delivered_twice": twice,
        "rounds": times,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--timeout",
        type=float,
        default=CONNECTION_TIMEOUT,
        help="the cluster's connection timeout, seconds (at least 1)",
    )
    parser.add_argument("--quiet", type=float, default=30.0,
                        help="seconds of the flood with nothing killed (0: none)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.timeout < 1:
        parser.error("--timeout: at least 1 s")
    data = run(args.rounds, args.timeout, args.quiet)
    s = data["failover_s"]
    q = data["quiet_phase"]
    report(
        "failover",
        [
            [
                f"{s['n']} kills",
                f"{s['median']:.2f}",
                f"{s['max']:.2f}",
                f"{data['connection_timeout_s']:.1f}",
                f"{data['median_beyond_timeout_s']:+.2f}",
                f"{q.get('flood_events_per_s', 0):.0f}/s for {q.get('seconds', 0):g} s",
                f"{q.get('primary_changes', '-')}, {q.get('epoch_changes', '-')}",
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
            "quiet phase flood",
            "false failovers (primary, epoch)",
            "events",
            "lost",
            "twice",
        ],
        data,
    )
    return data


if __name__ == "__main__":
    main()
