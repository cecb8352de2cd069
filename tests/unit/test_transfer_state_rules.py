"""When a nacked transfer state is dropped and when it is published again: the pure rules,
and the publisher's settling with a scripted broker (SQLite outbox, no network)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, cast

import pytest
from sqlmodel import Session, select

from ferrylink.contracts import TransferState
from ferrylink.db import create_tables, make_engine
from ferrylink.messaging import Publisher, PublishRejected, Topology
from ferrylink.models import OutboxMessage
from ferrylink.transfer_states import (
    BAND_PATIENCE_SECONDS,
    TransferStatePublisher,
    retry_delay,
    soft_limit,
    verdict,
)
from tests.helpers import wait_until


@pytest.mark.parametrize(
    ("depth", "rejected_for", "expected"),
    [
        (None, 0.0, "retry"),  # unreadable: an election under way
        (None, 3600.0, "retry"),
        (0, 0.0, "retry"),  # far from full: a leader change
        (79, 3600.0, "retry"),  # below the soft limit: never an overflow
        (80, 0.0, "retry"),  # in the band: room comes once the consumer drains it
        (99, BAND_PATIENCE_SECONDS - 1, "retry"),
        (99, BAND_PATIENCE_SECONDS, "drop"),  # stuck in the band: the policy rejects it
        (100, 0.0, "drop"),  # at the bound: the overflow policy
        (101, 0.0, "drop"),  # a quorum queue overshoots by what was in flight
    ],
)
def test_a_nack_is_an_overflow_only_when_the_queue_is_full(
    depth: int | None, rejected_for: float, expected: str
) -> None:
    assert verdict(depth, 100, rejected_for) == expected


def test_retries_back_off_doubling_up_to_a_ceiling() -> None:
    assert [retry_delay(n) for n in range(1, 8)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert retry_delay(10_000) == 5.0
    assert soft_limit(20) == 16 and soft_limit(100_000) == 80_000


def test_bounded_queues_are_known_by_their_full_names() -> None:
    topology = Topology(prefix="p", max_lengths=(("transfer-states", 7),))
    assert topology.bound_of("p.transfer-states") == 7
    assert topology.bound_of("p.transfer-states.st2") == 7  # a node's own (passive_legacy)
    assert topology.bound_of("p.transfer-states.dead") is None
    assert topology.bound_of("p.events") is None
    assert topology.bound_of("q.transfer-states") is None


class ScriptedBroker:
    """Stands in for the Publisher: every publish waits for the test to answer it."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Future[None]]] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def publish(self, exchange: str, routing_key: str, body: bytes, **kwargs: Any) -> Future[None]:
        future: Future[None] = Future()
        with self.lock:
            self.published.append((str(kwargs["message_id"]), future))
        return future

    def answer(self, index: int, nack: bool = False) -> None:
        wait_until(lambda: len(self.published) > index, 10, f"publish #{index + 1}")
        _, future = self.published[index]
        if nack:
            future.set_exception(PublishRejected("nacked"))
        else:
            future.set_result(None)


def a_state(n: int) -> TransferState:
    return TransferState(leg_key=f"e{n}:route", cycle_id=f"c{n}", event_id=f"e{n}", leg="route",
                         state="ROUTED", node="st1")  # fmt: skip


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[TransferStatePublisher, ScriptedBroker, list[int]]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    create_tables(engine)
    broker = ScriptedBroker()
    depths: list[int] = []  # what each depth reading answers, in turn
    publisher = TransferStatePublisher(
        cast(Publisher, broker), lambda: "p.transfer-states", engine, bound=10,
        depth=lambda queue: depths.pop(0),
    )  # fmt: skip
    publisher.start()
    yield publisher, broker, depths
    publisher.close()
    engine.dispose()


def rows(publisher: TransferStatePublisher) -> int:
    with Session(publisher.engine) as session:
        return len(session.exec(select(OutboxMessage)).all())


def test_a_nack_below_the_bound_is_published_again_until_stored(
    rig: tuple[TransferStatePublisher, ScriptedBroker, list[int]],
) -> None:
    publisher, broker, depths = rig
    depths += [2, 3]
    outcome = publisher.publish(a_state(1))
    assert rows(publisher) == 1  # committed before it is sent
    broker.answer(0, nack=True)  # a leader change
    broker.answer(1, nack=True)  # again
    broker.answer(2)  # stored
    assert outcome.result(timeout=10) is True
    assert [m for m, _ in broker.published] == ["e1:route:ROUTED"] * 3
    assert (publisher.retried, publisher.overflow) == (2, 0)
    wait_until(lambda: rows(publisher) == 0, 10, "the row deleted once stored")


def test_a_nack_at_the_bound_drops_the_state_and_counts_it(
    rig: tuple[TransferStatePublisher, ScriptedBroker, list[int]],
) -> None:
    publisher, broker, depths = rig
    depths += [10]
    outcome = publisher.publish(a_state(2))
    broker.answer(0, nack=True)
    assert outcome.result(timeout=10) is False
    assert (publisher.retried, publisher.overflow) == (0, 1)
    assert len(broker.published) == 1  # never published again
    wait_until(lambda: rows(publisher) == 0, 10, "the dropped state's row deleted")


def test_a_state_the_process_is_on_is_not_sent_twice_by_the_relay(
    rig: tuple[TransferStatePublisher, ScriptedBroker, list[int]],
) -> None:
    publisher, broker, _depths = rig
    outcome = publisher.publish(a_state(3))
    with Session(publisher.engine) as session:
        left = list(session.exec(select(OutboxMessage)).all())
    assert publisher.resend(left) == [outcome]  # the same future: no second publish
    assert len(broker.published) == 1
    broker.answer(0)
    assert outcome.result(timeout=10) is True


def test_closing_leaves_unsettled_states_to_the_relay(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    create_tables(engine)
    broker = ScriptedBroker()
    publisher = TransferStatePublisher(cast(Publisher, broker), lambda: "p.transfer-states",
                                       engine, bound=10)  # fmt: skip
    publisher.start()
    outcome = publisher.publish(a_state(4))
    publisher.close()  # never answered
    with pytest.raises(RuntimeError, match="outbox"):
        outcome.result(timeout=10)
    assert rows(publisher) == 1
    engine.dispose()
