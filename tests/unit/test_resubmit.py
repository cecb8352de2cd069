"""Resubmitting a failed transfer (services/transaction_manager/resubmit.py): SQLite, the
in-memory bus and a real HTTP partner socket. The failed push resumes at its step and is
sent once; what cannot be resubmitted is refused with the reason."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from ferrylink.contracts import EVENT, FileArrived
from ferrylink.db import create_tables, make_engine
from ferrylink.models import Account, Partner, ProcessedEvent, Route, StepRun, Transfer
from ferrylink_ops.inmemory import InMemoryBus
from services.transaction_manager import resubmit
from services.transaction_manager.handlers import EventHandler
from services.transaction_manager.routing import RouteRunner
from services.transaction_manager.transfer_log import TransferLog
from tests.http_sink import HttpSink


@dataclass
class Setup:
    engine: Engine
    home: Path
    bus: InMemoryBus
    partner_root: Path
    partner_port: int
    transfer_log: TransferLog

    def resubmit(self, cycle_id: str) -> resubmit.Resubmission:
        """What `POST /transfers/{cycle_id}/resubmit` does, without its HTTP and fence."""
        with Session(self.engine) as session:
            again = resubmit.prepare(session, cycle_id, self.transfer_log)
            session.commit()
            for state in again.states:
                self.transfer_log.publish(state)
        return again

    def arrive(self, name: str, content: bytes) -> FileArrived:
        (self.home / name).write_bytes(content)
        event = FileArrived(account="acme", path=name, size=len(content), checksum="ab")
        with Session(self.engine) as session:  # the upload's own leg (api/files.py)
            session.add(Transfer(leg_key=f"{event.id}:receive", cycle_id=event.cycle_id,
                                 event_id=event.id, leg="receive", direction="inbound",
                                 account="acme", file_name=name, bytes=len(content),
                                 protocol="http", status="RECEIVED", node_id="st1"))  # fmt: skip
            session.commit()
        self.bus.publish(event)
        self.bus.deliver()
        return event

    def legs(self, cycle_id: str) -> dict[str, str]:
        with Session(self.engine) as session:
            rows = session.exec(select(Transfer).where(Transfer.cycle_id == cycle_id))
            return {row.leg: row.status for row in rows}


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ferrylink.db'}")
    create_tables(engine)
    data_dir = tmp_path / "data"
    home = data_dir / "homes" / "acme"
    home.mkdir(parents=True)
    down = HttpSink(tmp_path / "partner")  # a port that answers nothing: the partner is down
    port = down.port
    down.stop()
    with Session(engine) as session:
        session.add(Account(name="acme", home="homes/acme", password_hash="x"))
        session.add(Partner(name="bank", protocol="http", url=f"http://127.0.0.1:{port}"))
        push = [{"kind": "push", "partner": "bank", "retry": {"attempts": 1}}]
        session.add(Route(account="acme", pattern="*.csv", steps_json=json.dumps(push)))
        checked = [{"kind": "checksum", "expected": "event"}, *push]
        session.add(Route(account="acme", pattern="*.sum", steps_json=json.dumps(checked)))
        session.commit()
    bus = InMemoryBus()
    transfer_log = TransferLog(bus.publish, "st1")
    routes = RouteRunner(engine, data_dir, transfer_log, "st1")
    bus.consume("events", EventHandler(engine, "st1", routes, data_dir, bus.publish).handle, EVENT)
    yield Setup(engine, home, bus, tmp_path / "partner", port, transfer_log)
    engine.dispose()


def test_a_failed_push_resumes_at_its_step_and_is_sent_once(setup: Setup) -> None:
    event = setup.arrive("orders.csv", b"1,2,3\n")
    assert setup.legs(event.cycle_id) == {"receive": "RECEIVED", "push:0": "FAILED",
                                          "route": "FAILED"}  # fmt: skip
    again = setup.resubmit(event.cycle_id)
    assert setup.legs(event.cycle_id) == {"receive": "RECEIVED", "push:0": "TO_EXECUTE",
                                          "route": "TO_EXECUTE"}  # fmt: skip
    assert (again.event.id, again.event.cycle_id, again.event.path) == (
        event.id, event.cycle_id, "orders.csv")  # fmt: skip
    assert again.failed_step == 0 and "push to bank failed" in again.detail
    with Session(setup.engine) as session:
        assert session.get(ProcessedEvent, event.id) is None
        run = session.get(StepRun, (event.id, 0))
        assert run is not None and "tries" not in json.loads(run.result)
    with HttpSink(setup.partner_root, port=setup.partner_port) as partner:
        setup.bus.publish(again.event)
        assert setup.bus.deliver() == 1
        assert [r.method for r in partner.requests].count("PUT") == 1
    assert (setup.partner_root / "orders.csv").read_bytes() == b"1,2,3\n"
    assert setup.legs(event.cycle_id) == {"receive": "RECEIVED", "push:0": "SENT",
                                          "route": "ROUTED"}  # fmt: skip
    with Session(setup.engine) as session:  # the old error is not left on the SENT leg
        legs = session.exec(select(Transfer).where(Transfer.cycle_id == event.cycle_id))
        assert [leg.detail for leg in legs if leg.leg != "receive"] == ["", ""]
    pushed = [(s.state.value, s.revision) for s in setup.bus.transfer_states() if s.leg == "push:0"]
    assert pushed == [("SENDING", 1), ("FAILED", 2), ("TO_EXECUTE", 3), ("SENT", 4)]
    with Session(setup.engine) as session, pytest.raises(resubmit.ResubmitRefused) as refused:
        resubmit.prepare(session, event.cycle_id, setup.transfer_log)  # done: nothing to redo
    assert refused.value.status == 409 and "ROUTED" in str(refused.value)


def test_a_resubmit_that_fails_again_is_announced_again(setup: Setup) -> None:
    """The partner is still down: the push and the route fail again. Tracking sees the
    resubmission (TO_EXECUTE) and the second FAILED of each leg as new states (a higher
    revision, a new id), not as repeats of the first attempt's, which it would drop."""
    event = setup.arrive("orders.csv", b"1,2,3\n")
    again = setup.resubmit(event.cycle_id)
    setup.bus.publish(again.event)
    assert setup.bus.deliver() == 1
    assert setup.legs(event.cycle_id) == {"receive": "RECEIVED", "push:0": "FAILED",
                                          "route": "FAILED"}  # fmt: skip
    states = setup.bus.transfer_states()
    by_leg = {leg: [(s.state.value, s.revision) for s in states if s.leg == leg]
              for leg in ("push:0", "route")}  # fmt: skip
    assert by_leg == {
        "push:0": [("SENDING", 1), ("FAILED", 2), ("TO_EXECUTE", 3), ("FAILED", 4)],
        "route": [("FAILED", 1), ("TO_EXECUTE", 2), ("FAILED", 3)],
    }
    assert len({s.id for s in states}) == len(states)


def test_what_cannot_be_resubmitted_is_refused_with_the_reason(setup: Setup) -> None:
    with Session(setup.engine) as session, pytest.raises(resubmit.ResubmitRefused) as unknown:
        resubmit.prepare(session, "no-such-cycle", setup.transfer_log)
    assert unknown.value.status == 404
    # A failed checksum against the upload's own digest: the digest is not kept.
    event = setup.arrive("orders.sum", b"x")
    assert setup.legs(event.cycle_id)["route"] == "FAILED"
    with Session(setup.engine) as session, pytest.raises(resubmit.ResubmitRefused) as refused:
        resubmit.prepare(session, event.cycle_id, setup.transfer_log)
    assert refused.value.status == 409 and "checksum" in str(refused.value)
    with Session(setup.engine) as session:  # refused: nothing was reset
        assert session.get(ProcessedEvent, event.id) is not None
