"""The transaction manager's event handler with its dependencies swapped for in-memory ones
(nameko's worker_factory pattern): SQLite, a temporary data directory and the in-memory bus.
Routing, scheduled transfers and maintenance in milliseconds; what needs a broker
(redelivery, failover) is in the integration tests."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from ferrylink.contracts import (
    EVENT,
    FileArrived,
    MaintenanceRun,
    PullJob,
    TempFileCleanup,
    TransferScheduled,
)
from ferrylink.db import create_tables, make_engine
from ferrylink.models import Account, ProcessedEvent, Route, Transfer
from ferrylink_ops.inmemory import InMemoryBus
from services.transaction_manager.handlers import EventHandler
from services.transaction_manager.routing import RouteRunner
from services.transaction_manager.transfer_log import TransferLog
from tests.scheduling_support import add_partner
from tests.sftp_server import SftpServer

FIRE = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Worker:
    engine: Engine
    data_dir: Path
    bus: InMemoryBus
    handler: EventHandler

    @property
    def home(self) -> Path:
        return self.data_dir / "homes" / "acme"

    def arrive(self, name: str, content: bytes = b"payload") -> FileArrived:
        (self.home / name).write_bytes(content)
        event = FileArrived(account="acme", path=name, size=len(content))
        self.bus.publish(event)
        return event

    def legs(self) -> list[tuple[str, str]]:
        with Session(self.engine) as session:
            rows = session.exec(select(Transfer).order_by(col(Transfer.id))).all()
            return [(row.leg, row.status) for row in rows]


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ferrylink.db'}")
    create_tables(engine)
    data_dir = tmp_path / "data"
    (data_dir / "homes" / "acme").mkdir(parents=True)
    with Session(engine) as session:
        session.add(Account(name="acme", home="homes/acme", password_hash="x"))
        steps = [
            {"kind": "copy", "folder": "archive"},
            {"kind": "rename", "template": "done-{name}"},
        ]
        session.add(Route(account="acme", pattern="*.csv", steps_json=json.dumps(steps)))
        session.commit()
    bus = InMemoryBus()
    routes = RouteRunner(engine, data_dir, TransferLog(bus.publish, "st1"), "st1")
    handler = EventHandler(engine, "st1", routes, data_dir, bus.publish)
    bus.consume("events", handler.handle, EVENT)
    yield Worker(engine, data_dir, bus, handler)
    engine.dispose()


def test_an_arrived_file_runs_through_its_route_and_announces_each_leg(worker: Worker) -> None:
    event = worker.arrive("a.csv", b"1,2,3")
    assert worker.bus.deliver() == 1
    assert (worker.data_dir / "archive" / "a.csv").read_bytes() == b"1,2,3"
    assert (worker.home / "done-a.csv").read_bytes() == b"1,2,3"
    assert not (worker.home / "a.csv").exists()
    assert worker.legs() == [("receive", "RECEIVED"), ("route", "ROUTED")]
    states = worker.bus.transfer_states()
    assert [(s.leg, s.state.value, s.cycle_id) for s in states] == [
        ("receive", "RECEIVED", event.cycle_id), ("route", "ROUTED", event.cycle_id),
    ]  # fmt: skip


def test_the_same_event_twice_is_done_once(worker: Worker) -> None:
    event = worker.arrive("b.csv")
    worker.bus.publish(event)  # a re-published copy
    assert worker.bus.deliver() == 2
    assert sorted(p.name for p in (worker.data_dir / "archive").iterdir()) == ["b.csv"]
    assert worker.legs() == [("receive", "RECEIVED"), ("route", "ROUTED")]
    with Session(worker.engine) as session:
        assert len(session.exec(select(ProcessedEvent)).all()) == 1
    assert worker.handler.handle(event) is False


def test_a_file_without_a_route_stays_in_the_home(worker: Worker) -> None:
    worker.arrive("notes.txt")
    worker.bus.deliver()
    assert (worker.home / "notes.txt").exists() and not (worker.data_dir / "archive").exists()
    assert worker.legs() == [("receive", "RECEIVED")]


def test_events_that_can_never_succeed_are_parked_with_their_reason(worker: Worker) -> None:
    worker.bus.publish(FileArrived(account="ghost", path="a.csv"))
    worker.bus.publish(FileArrived(account="acme", path="../../etc/passwd"))
    worker.bus.publish(FileArrived(account="acme", path="never-arrived.csv"))
    worker.bus.put_raw("events", b'{"schema_version": 9, "kind": "file.arrived"}')
    worker.bus.put_raw("events", b"\xff not json")
    assert worker.bus.deliver() == 5
    reasons = [dead.reason for dead in worker.bus.dead["events.dead"]]
    assert len(reasons) == 5
    assert "unknown account 'ghost'" in reasons[0]
    assert "bad path in event" in reasons[1]
    assert "missing file 'never-arrived.csv'" in reasons[2]
    assert "unknown schema version 9" in reasons[3]
    assert "invalid JSON" in reasons[4]
    assert worker.legs() == []


def test_temp_file_cleanup_removes_only_stale_temporary_files(worker: Worker) -> None:
    stale, fresh, kept = (worker.home / n for n in ("old.part", "new.part", "old.csv"))
    for path in (stale, fresh, kept):
        path.write_text("x")
    long_ago = time.time() - 48 * 3600
    os.utime(stale, (long_ago, long_ago))
    os.utime(kept, (long_ago, long_ago))
    now = datetime.now(UTC)
    run = MaintenanceRun(job_id=1, fire_time=now, task=TempFileCleanup(folder="homes"))
    worker.bus.publish(run)
    worker.bus.publish(run)  # twice: completed once
    assert worker.bus.deliver() == 2
    assert not stale.exists() and fresh.exists() and kept.exists()
    with Session(worker.engine) as session:
        assert [p.event_id for p in session.exec(select(ProcessedEvent))] == [run.id]


def test_a_scheduled_pull_announces_each_file_which_is_then_routed(
    worker: Worker, tmp_path: Path
) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "r1.csv").write_text("remote 1")
    (remote / "r2.csv").write_text("remote 2")
    with SftpServer(remote, password="partner-secret") as server:
        add_partner(worker.engine, host=server.host, port=server.port,
                    password="partner-secret", host_key=server.host_key_line)  # fmt: skip
        job = PullJob(partner="bank", account="acme", pattern="*.csv")
        pull = TransferScheduled(job_id=5, fire_time=FIRE, job=job)
        worker.bus.publish(pull)
        assert worker.bus.deliver() == 3  # the pull, then one file.arrived per file
    assert sorted(p.name for p in (worker.data_dir / "archive").iterdir()) == ["r1.csv", "r2.csv"]
    assert sorted(p.name for p in worker.home.iterdir()) == ["done-r1.csv", "done-r2.csv"]
    assert sorted(worker.legs()) == sorted(
        [("pull", "RECEIVED")] * 2 + [("receive", "RECEIVED")] * 2 + [("route", "ROUTED")] * 2
    )
