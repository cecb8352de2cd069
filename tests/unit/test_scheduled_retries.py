"""A scheduled transfer whose partner fails in a way that may pass is rescheduled (RetryLater
with a delay) for another pass, never slept on in a worker; the last pass records what
still fails. The event handler on SQLite, a temporary data directory, the in-memory bus and
a real SFTP server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from ferrylink.contracts import EVENT, PullJob, PushJob, RetryLater, TransferScheduled
from ferrylink.db import create_tables, make_engine
from ferrylink.models import Account, Partner, ProcessedEvent, Transfer
from ferrylink_ops.inmemory import InMemoryBus
from services.transaction_manager.handlers import EventHandler
from services.transaction_manager.routing import RouteRunner
from services.transaction_manager.scheduled import ATTEMPTS, BACKOFF_SECONDS
from services.transaction_manager.transfer_log import TransferLog
from tests.scheduling_support import add_partner
from tests.sftp_server import SftpServer

FIRE = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Worker:
    engine: Engine
    home: Path
    bus: InMemoryBus
    handler: EventHandler

    def legs(self) -> list[tuple[str, str, str]]:
        with Session(self.engine) as session:
            rows = session.exec(select(Transfer).order_by(col(Transfer.id))).all()
            return [(row.leg, row.status, row.file_name) for row in rows]

    def processed(self, event_id: str) -> bool:
        with Session(self.engine) as session:
            return session.get(ProcessedEvent, event_id) is not None


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ferrylink.db'}")
    create_tables(engine)
    data_dir = tmp_path / "data"
    home = data_dir / "homes" / "acme"
    home.mkdir(parents=True)
    with Session(engine) as session:
        session.add(Account(name="acme", home="homes/acme", password_hash="x"))
        session.commit()
    # The default partner listens nowhere (127.0.0.1:1): connection refused, which may pass.
    add_partner(engine)
    bus = InMemoryBus()
    routes = RouteRunner(engine, data_dir, TransferLog(bus.publish, "st1"), "st1")
    handler = EventHandler(engine, "st1", routes, data_dir, bus.publish)
    bus.consume("events", handler.handle, EVENT)
    yield Worker(engine, home, bus, handler)
    engine.dispose()


def test_an_unreachable_partner_reschedules_the_push_until_the_last_pass(worker: Worker) -> None:
    outbox = worker.home / "outbox"
    outbox.mkdir()
    (outbox / "a.csv").write_text("alpha")
    (outbox / "b.csv").write_text("bravo")
    job = PushJob(partner="bank", account="acme", folder="outbox")
    push = TransferScheduled(job_id=6, fire_time=FIRE, job=job)
    started = time.monotonic()
    for done in range(1, ATTEMPTS):
        with pytest.raises(RetryLater) as retry:
            worker.handler.handle(push)
        # Rescheduled after the whole pass (both files tried), with a growing delay.
        assert retry.value.delay == BACKOFF_SECONDS * done
        assert f"pass {done + 1} of {ATTEMPTS}" in str(retry.value)
        assert worker.legs() == [] and not worker.processed(push.id)
    assert worker.handler.handle(push) is True  # the last pass gives up and completes
    # The old in-worker retries slept 1 + 2 s per file; now no pass waits at all.
    assert time.monotonic() - started < BACKOFF_SECONDS * 2
    assert worker.legs() == [
        ("push", "FAILED", "outbox/a.csv"), ("push", "FAILED", "outbox/b.csv"),
    ]  # fmt: skip
    assert worker.processed(push.id)
    assert sorted(p.name for p in outbox.iterdir()) == ["a.csv", "b.csv"]


def test_a_pull_whose_partner_comes_back_fetches_in_the_next_pass(
    worker: Worker, tmp_path: Path
) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "r1.csv").write_text("remote 1")
    job = PullJob(partner="bank", account="acme", pattern="*.csv")
    pull = TransferScheduled(job_id=7, fire_time=FIRE, job=job)
    with pytest.raises(RetryLater) as retry:
        worker.handler.handle(pull)
    assert retry.value.delay == BACKOFF_SECONDS
    assert worker.legs() == []  # a listing that may pass is not recorded as failed

    with SftpServer(remote, password="partner-secret") as server:
        with Session(worker.engine) as session:
            partner = session.get(Partner, "bank")
            assert partner is not None
            partner.port, partner.password = server.port, "partner-secret"
            session.add(partner)
            session.commit()
        worker.bus.publish(pull)  # what the delay queue hands back
        assert worker.bus.deliver() == 2  # the second pass, then the file's file.arrived
    assert (worker.home / "r1.csv").read_text() == "remote 1"
    assert ("pull", "RECEIVED", "r1.csv") in worker.legs()
    assert not [leg for leg in worker.legs() if leg[1] == "FAILED"]
    assert worker.processed(pull.id)
