"""The transfer-state message and the bounded transfer-states queue on a real broker.

Filling the bound: the broker rejects the surplus, the publisher reads the queue at its
bound, counts the surplus and answers at once (never waits for room), and states published
after the queue drained are stored again. A broker node lost under load:
test_transfer_states_faults.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pika
import pytest
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from ferrylink.contracts import TransferState, parse
from ferrylink.db import create_tables, make_engine
from ferrylink.messaging import Publisher, Topology
from ferrylink.models import OutboxMessage
from ferrylink.transfer_states import TransferStatePublisher
from tests.helpers import wait_until


def a_state(n: int, state: str = "RECEIVED") -> TransferState:
    return TransferState.model_validate(
        {
            "leg_key": f"e{n}:receive",
            "cycle_id": f"c{n}",
            "event_id": f"e{n}",
            "leg": "receive",
            "state": state,
            "account": "acme",
            "file_name": f"in/f{n}.csv",
            "bytes": 10 * n,
            "direction": "inbound",
            "protocol": "sftp",
            "node": "st1",
            "at": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        }
    )


def test_json_round_trip_keeps_every_field_and_the_schema_version() -> None:
    state = a_state(7, "SENT")
    body = state.to_bytes()
    assert b'"schema_version":1' in body
    again = parse(TransferState, body)
    assert again == state and again.at.tzinfo is not None
    assert again.id == "e7:receive:SENT"  # revision 0: sent before revisions existed
    revised = state.model_copy(update={"revision": 3})
    assert parse(TransferState, revised.to_bytes()).id == "e7:receive:SENT:3"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"state": "DONE"}, "state"),
        ({"schema_version": 2}, "schema_version"),
        ({"extra_field": 1}, "extra_field"),
        ({"cycle_id": ""}, "cycle_id"),
    ],
)
def test_bad_messages_are_refused(change: dict[str, object], problem: str) -> None:
    doc = a_state(1).model_dump(mode="json") | change
    with pytest.raises(ValidationError, match=problem):
        TransferState.model_validate(doc)


def queue_length(amqp_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        count: int = connection.channel().queue_declare(queue, passive=True).method.message_count
        return count
    finally:
        connection.close()


def outbox_rows(engine: Engine) -> int:
    with Session(engine) as session:
        return len(session.exec(select(OutboxMessage)).all())


def test_full_queue_rejects_the_surplus_counted_without_blocking(
    amqp_url: str, prefix: str, tmp_path: Path
) -> None:
    bound = 20
    topology = Topology(prefix=prefix, max_lengths=(("transfer-states", bound),))
    queue = topology.queue("transfer-states")
    engine = make_engine(f"sqlite:///{tmp_path / 'ferrylink.db'}")
    create_tables(engine)
    publisher = Publisher([amqp_url], declare=topology.declare, nacks_are_final=True)
    states = TransferStatePublisher(publisher, lambda: queue, engine, bound, [amqp_url])
    states.start()
    try:
        assert publisher.wait_connected(10)
        # One at a time: a quorum queue learns it is full a message late, so a burst can
        # overshoot the bound by what is in flight (never silently: each one is stored).
        outcomes = [states.publish(a_state(n)).result(timeout=10) for n in range(35)]
        stored = outcomes.count(True)
        assert bound <= stored <= bound + 1
        assert outcomes.count(False) == 35 - stored == states.overflow
        assert states.retried == 0  # the queue was verifiably full: no second try
        assert queue_length(amqp_url, queue) == stored
        # Stored or dropped, every state is settled: nothing left in the outbox.
        wait_until(lambda: outbox_rows(engine) == 0, 10, "settled rows deleted")

        # A rejection is an answer, not a wait for room (a publisher that re-published
        # nacked states would never resolve this future).
        assert states.publish(a_state(999)).result(timeout=10) is False
        assert states.overflow == 35 - stored + 1

        # Room again after a consumer took some: stored again. (A queue that overflowed
        # takes publishes again once below 80 % of its bound.)
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            channel = connection.channel()
            for _ in range(stored - bound + 5):
                method, _props, _body = channel.basic_get(queue, auto_ack=True)
                assert method is not None
        finally:
            connection.close()
        assert states.publish(a_state(1000)).result(timeout=30) is True
        wait_until(lambda: outbox_rows(engine) == 0, 10, "settled rows deleted")
    finally:
        states.close()
        engine.dispose()


def test_a_state_left_in_the_outbox_is_published_by_the_relay(
    amqp_url: str, prefix: str, tmp_path: Path
) -> None:
    """A process that committed a leg and died before publishing its state: the row stays,
    and `resend` (the relay's way in) publishes it and deletes the row."""
    topology = Topology(prefix=prefix)
    queue = topology.queue("transfer-states")
    engine = make_engine(f"sqlite:///{tmp_path / 'ferrylink.db'}")
    create_tables(engine)
    publisher = Publisher([amqp_url], declare=topology.declare, nacks_are_final=True)
    states = TransferStatePublisher(publisher, lambda: queue, engine, 1000, [amqp_url])
    with Session(engine) as session:
        states.stage(session, a_state(1))
        session.commit()  # ... and the process died here
    states.start()
    try:
        with Session(engine) as session:
            rows = list(session.exec(select(OutboxMessage)).all())
        assert [r.message_id for r in rows] == ["e1:receive:RECEIVED"]
        assert [f.result(timeout=30) for f in states.resend(rows)] == [True]
        wait_until(lambda: outbox_rows(engine) == 0, 10, "the relayed row deleted")
        assert queue_length(amqp_url, queue) == 1
    finally:
        states.close()
        engine.dispose()
