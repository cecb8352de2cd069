"""Events handled in batches (`EventHandler.handle_batch`, routing.py): claimed, committed
and announced together, each with its own outcome. SQLite and PostgreSQL, a temporary data
directory and the in-memory bus; the crash points of batches are in
tests/test_engine_batches.py."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from ferrylink.clock import utcnow
from ferrylink.contracts import Event, FileArrived, RejectMessage, RetryLater
from ferrylink.db import create_tables, make_engine
from ferrylink.models import Account, EventClaim, ProcessedEvent, Route, Transfer
from ferrylink.runtime import Received
from ferrylink_ops.inmemory import InMemoryBus
from services.transaction_manager import routing
from services.transaction_manager.handlers import EventHandler
from services.transaction_manager.routing import RouteRunner
from services.transaction_manager.transfer_log import TransferLog


@dataclass
class Worker:
    engine: Engine
    data_dir: Path
    bus: InMemoryBus
    handler: EventHandler
    commits: list[int]

    @property
    def home(self) -> Path:
        return self.data_dir / "homes" / "acme"

    def arrive(self, name: str, content: bytes = b"payload") -> FileArrived:
        (self.home / name).write_bytes(content)
        return FileArrived(account="acme", path=name, size=len(content))

    def handle(self, events: Sequence[Event]) -> list[bool | Exception]:
        current = otel_context.get_current()
        return self.handler.handle_batch([Received(e, current) for e in events])

    def legs(self, event_id: str) -> dict[str, tuple[str, str]]:
        with Session(self.engine) as session:
            rows = session.exec(select(Transfer).where(Transfer.event_id == event_id)).all()
            return {row.leg: (row.status, row.detail) for row in rows}


def add_route(engine: Engine, pattern: str, steps: list[dict[str, Any]], position: int) -> None:
    with Session(engine) as session:
        session.add(Route(account="acme", pattern=pattern, position=position,
                          steps_json=json.dumps(steps)))  # fmt: skip
        session.commit()


@pytest.fixture(params=["sqlite", "postgresql"])
def worker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Worker]:
    if request.param == "postgresql":
        engine = make_engine(request.getfixturevalue("postgres_url"))
    else:
        engine = make_engine(f"sqlite:///{tmp_path / 'ferrylink.db'}")
    create_tables(engine)
    data_dir = tmp_path / "data"
    (data_dir / "homes" / "acme").mkdir(parents=True)
    with Session(engine) as session:
        session.add(Account(name="acme", home="homes/acme", password_hash="x"))
        session.commit()
    add_route(engine, "*.csv", [{"kind": "copy", "folder": "archive"},
                                {"kind": "rename", "template": "{counter}-{name}"}], 0)  # fmt: skip
    add_route(engine, "*.bad", [{"kind": "checksum", "algorithm": "md5", "expected": "0" * 32}],
              1)  # fmt: skip
    add_route(engine, "*.push", [{"kind": "push", "partner": "nowhere"}], 2)
    commits: list[int] = []
    sa_event.listen(engine, "commit", lambda _connection: commits.append(1))
    bus = InMemoryBus()
    routes = RouteRunner(engine, data_dir, TransferLog(bus.publish, "st1"), "st1")
    handler = EventHandler(engine, "st1", routes, data_dir, bus.publish, claim_seconds=60)
    yield Worker(engine, data_dir, bus, handler, commits)
    engine.dispose()


def test_a_batch_is_claimed_committed_and_announced_together(worker: Worker) -> None:
    events = [worker.arrive(f"f{i}.csv", f"file {i}".encode()) for i in range(20)]
    worker.commits.clear()
    assert worker.handle(events) == [True] * 20
    # Routes, claims, counters, then a commit per step round (plan, plan, completion):
    # a handful of transactions for twenty events, not three each.
    assert len(worker.commits) <= 8, len(worker.commits)
    assert sorted(p.name for p in (worker.data_dir / "archive").iterdir()) == sorted(
        f"f{i}.csv" for i in range(20)
    )
    renamed = sorted(worker.home.iterdir())
    assert sorted(int(p.name.split("-")[0]) for p in renamed) == list(range(1, 21))
    for event in events:
        assert worker.legs(event.id) == {"receive": ("RECEIVED", ""), "route": ("ROUTED", "")}
    states = worker.bus.transfer_states()
    assert sorted((s.event_id, s.leg) for s in states) == sorted(
        (e.id, leg) for e in events for leg in ("receive", "route")
    )
    with Session(worker.engine) as session:
        assert session.exec(select(EventClaim)).all() == []  # dropped with the completion
        assert len(session.exec(select(ProcessedEvent)).all()) == 20
    # Again: every one done before.
    assert worker.handle(events) == [False] * 20


def test_an_event_that_fails_leaves_the_others_alone(worker: Worker) -> None:
    good = [worker.arrive(f"g{i}.csv") for i in range(5)]
    bad_checksum = worker.arrive("x.bad")
    missing = FileArrived(account="acme", path="never-arrived.csv")
    ghost = FileArrived(account="ghost", path="a.csv")
    pushed = worker.arrive("p.push")  # a push: runs alone
    outcomes = worker.handle([good[0], missing, good[1], bad_checksum, ghost, good[2], pushed,
                              good[3], good[0], good[4]])  # fmt: skip
    assert outcomes[0] is True and outcomes[2] is True and outcomes[5] is True
    assert outcomes[7] is True and outcomes[9] is True
    assert isinstance(outcomes[1], RejectMessage) and "missing file" in str(outcomes[1])
    assert isinstance(outcomes[4], RejectMessage) and "unknown account" in str(outcomes[4])
    assert outcomes[3] is True  # the event is complete; its transfer failed, visibly
    assert worker.legs(bad_checksum.id)["route"][0] == "FAILED"
    assert outcomes[6] is True
    assert worker.legs(pushed.id)["route"] == ("FAILED", "unknown partner 'nowhere'")
    # The same event twice in one batch: the second copy runs after the first, alone, and
    # finds the work done.
    assert outcomes[8] is False
    assert len(list((worker.data_dir / "archive").iterdir())) == 5
    for event in good:
        assert worker.legs(event.id)["route"] == ("ROUTED", "")
    # Nothing of the failed events was written, and their claims are released.
    assert worker.legs(missing.id) == {} and worker.legs(ghost.id) == {}


def test_a_claim_held_elsewhere_turns_that_event_away_only(worker: Worker) -> None:
    events = [worker.arrive(f"h{i}.csv") for i in range(3)]
    with Session(worker.engine) as session:
        session.add(EventClaim(event_id=events[1].id, owner="st2:1:other", expires_at=4e9))
        session.commit()
    outcomes = worker.handle(events)
    assert outcomes[0] is True and outcomes[2] is True
    assert isinstance(outcomes[1], RetryLater) and "holds its claim" in str(outcomes[1])
    assert (worker.home / "h1.csv").exists()  # untouched


def test_a_commit_failing_for_one_event_is_retried_event_by_event(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = [worker.arrive(f"c{i}.csv", f"file {i}".encode()) for i in range(6)]
    victim = events[3]
    load = routing._Unit.load

    def load_then_race(unit: routing._Unit, event_ids: Sequence[str]) -> None:
        load(unit, event_ids)
        # A row this batch does not know of: its completion's insert of the route leg fails.
        with Session(worker.engine) as session:
            session.add(Transfer(leg_key=f"{victim.id}:route", cycle_id=victim.cycle_id,
                                 event_id=victim.id, leg="route", direction="internal",
                                 account="acme", file_name=victim.path, protocol="file",
                                 status="FAILED", node_id="elsewhere",
                                 started_at=utcnow()))  # fmt: skip
            session.commit()

    monkeypatch.setattr(routing._Unit, "load", load_then_race)
    outcomes = worker.handle(events)
    monkeypatch.undo()
    assert [o is True for o in outcomes] == [True, True, True, False, True, True]
    assert isinstance(outcomes[3], RetryLater) and "IntegrityError" in str(outcomes[3])
    # Delivered again: its steps were done and are recognised, the leg is updated.
    assert worker.handle([victim]) == [True]
    assert worker.legs(victim.id)["route"] == ("ROUTED", "")
    assert sorted(p.name for p in (worker.data_dir / "archive").iterdir()) == sorted(
        f"c{i}.csv" for i in range(6)
    )
    assert len([p for p in worker.home.iterdir() if p.name.endswith("c3.csv")]) == 1
    with Session(worker.engine) as session:
        done = session.exec(select(ProcessedEvent.event_id)).all()
        assert sorted(done) == sorted(e.id for e in events)
        claims = session.exec(select(EventClaim).where(col(EventClaim.event_id) == victim.id))
        assert [c.attempts for c in claims] == []  # completed: the claim row is gone
