"""Publish and consume through quorum queues on a real broker."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence

import pika
import pytest
from sqlalchemy import exc as sa_exc

from ferrylink.consumer_manager import (
    FENCED_REQUEUE_DELAY,
    ConsumerManager,
    ConsumerSpec,
    Delivery,
)
from ferrylink.contracts import REASON_HEADER, SOURCE_QUEUE_HEADER, RejectMessage
from ferrylink.fencing import Fenced
from ferrylink.messaging import (
    Publisher,
    Topology,
    UnroutableError,
    backoff,
    wait_all,
)
from tests.helpers import wait_until


class Recorder:
    """A handler that records every message id it completed, thread-safely."""

    def __init__(
        self,
        fail_ids: frozenset[str] = frozenset(),
        reject_ids: frozenset[str] = frozenset(),
        pause_after: int | None = None,
    ) -> None:
        self.done: Counter[str] = Counter()
        self.attempts: Counter[str] = Counter()
        self.fail_ids = fail_ids
        self.reject_ids = reject_ids
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        # Close the gate itself once this many are done: the next message waits in flight.
        self.pause_after = pause_after

    def __call__(self, delivery: Delivery) -> None:
        with self.lock:
            if self.pause_after is not None and len(self.done) >= self.pause_after:
                self.pause_after = None
                self.gate.clear()
        self.gate.wait(10)
        message_id = delivery.json()["id"]
        with self.lock:
            self.attempts[message_id] += 1
        if message_id in self.reject_ids:
            raise RejectMessage(f"unknown account in {message_id}")
        if message_id in self.fail_ids:
            raise RuntimeError(f"disk full while handling {message_id}")
        with self.lock:
            self.done[message_id] += 1


@pytest.fixture
def topology(prefix: str) -> Topology:
    return Topology(prefix=prefix, delivery_limit=3)


@pytest.fixture
def publisher(amqp_url: str, topology: Topology) -> Iterator[Publisher]:
    pub = Publisher([amqp_url], declare=topology.declare).start()
    assert pub.wait_connected(30)
    yield pub
    pub.close()


def make_manager(amqp_url: str, publisher: Publisher, topology: Topology) -> ConsumerManager:
    return ConsumerManager(
        [amqp_url], publisher, declare=topology.declare, delivery_limit=topology.delivery_limit
    ).start()


def publish_events(publisher: Publisher, topology: Topology, ids: list[str]) -> None:
    futures = [
        publisher.publish(
            "", topology.queue("events"), json.dumps({"id": i}).encode(), message_id=i
        )
        for i in ids
    ]
    wait_all(futures, timeout=60)


def queue_depth(amqp_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def get_all(amqp_url: str, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    messages: list[tuple[pika.BasicProperties, bytes]] = []
    try:
        channel = connection.channel()
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return messages
            messages.append((props, body))
    finally:
        connection.close()


def test_topology_is_quorum_and_idempotent(amqp_url: str, topology: Topology) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        topology.declare(channel)
        topology.declare(channel)  # again: no PRECONDITION_FAILED
        # A passive declare with the wrong type must fail: proves the queue is quorum.
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            connection.channel().queue_declare(
                topology.queue("events"), durable=True, arguments={"x-queue-type": "classic"}
            )
    finally:
        connection.close()


def test_every_published_message_is_consumed_once(
    amqp_url: str, publisher: Publisher, topology: Topology
) -> None:
    ids = [f"m{i}" for i in range(500)]
    publish_events(publisher, topology, ids)
    recorder = Recorder()
    manager = make_manager(amqp_url, publisher, topology)
    manager.register(ConsumerSpec("events", topology.queue("events"), recorder, workers=2))
    manager.set_active({"events"})
    try:
        wait_until(lambda: len(recorder.done) == len(ids), what="all messages handled")
        assert set(recorder.done) == set(ids)
        assert max(recorder.done.values()) == 1
        wait_until(lambda: queue_depth(amqp_url, topology.queue("events")) == 0)
    finally:
        manager.stop()


def test_an_unexpected_error_on_the_io_thread_reconnects_instead_of_killing_it(
    amqp_url: str, publisher: Publisher, topology: Topology
) -> None:
    """pika raises errors other than connection errors once a connection is gone (CI saw
    ValueError("Timeout closed before call") after a broker node was killed): the consumer
    manager's I/O thread connects again instead of dying with nothing consumed any more."""
    ids = [f"m{i}" for i in range(50)]
    publish_events(publisher, topology, ids)
    recorder = Recorder()
    failures: list[set[str]] = []

    def on_change(active: set[str]) -> None:  # runs on the I/O thread
        if active and not failures:
            failures.append(active)
            raise ValueError("Timeout closed before call")

    manager = ConsumerManager([amqp_url], publisher, declare=topology.declare,
                              delivery_limit=topology.delivery_limit)  # fmt: skip
    manager.on_change = on_change
    manager.register(ConsumerSpec("events", topology.queue("events"), recorder, workers=2))
    manager.set_active({"events"})
    manager.start()
    try:
        wait_until(lambda: set(recorder.done) == set(ids), what="every message handled")
        assert failures and manager.connections_opened >= 2
    finally:
        manager.stop()


def test_publish_to_missing_queue_fails_instead_of_vanishing(publisher: Publisher) -> None:
    with pytest.raises(UnroutableError):
        publisher.publish("", "no-such-queue-anywhere", b"{}").result(10)


def test_failing_handler_dead_letters_after_delivery_limit_with_reason(
    amqp_url: str, publisher: Publisher, topology: Topology
) -> None:
    ids = [f"m{i}" for i in range(20)]
    recorder = Recorder(fail_ids=frozenset({"m7"}), reject_ids=frozenset({"m9"}))
    manager = make_manager(amqp_url, publisher, topology)
    manager.register(ConsumerSpec("events", topology.queue("events"), recorder))
    manager.set_active({"events"})
    try:
        publish_events(publisher, topology, ids)
        publisher.publish_and_wait("", topology.queue("events"), b"{not json", message_id="bad")
        dead_queue = topology.dead_letter_queue(topology.queue("events"))
        wait_until(lambda: queue_depth(amqp_url, dead_queue) == 3, what="three dead letters")
        wait_until(lambda: len(recorder.done) == 18, what="the healthy messages")
    finally:
        manager.stop()
    dead = {props.message_id: props.headers for props, _ in get_all(amqp_url, dead_queue)}
    assert set(dead) == {"m7", "m9", "bad"}
    # The failing one was tried exactly delivery_limit times, the rejected one once.
    assert recorder.attempts["m7"] == topology.delivery_limit
    assert recorder.attempts["m9"] == 1
    assert "disk full while handling m7" in dead["m7"][REASON_HEADER]
    assert "failed 3 time(s)" in dead["m7"][REASON_HEADER]
    assert "unknown account in m9" in dead["m9"][REASON_HEADER]
    assert "invalid JSON" in dead["bad"][REASON_HEADER]
    assert dead["m7"][SOURCE_QUEUE_HEADER] == topology.queue("events")
    assert "m7" not in recorder.done and "m9" not in recorder.done


def test_consumer_cancelled_mid_stream_loses_nothing(
    amqp_url: str, publisher: Publisher, topology: Topology
) -> None:
    ids = [f"m{i}" for i in range(300)]
    publish_events(publisher, topology, ids)
    # The first consumer holds its 51st message in flight (its handler waits at the gate)
    # while it is cancelled: it stops there however fast it got there.
    first, second = Recorder(pause_after=50), Recorder()
    manager_a = make_manager(amqp_url, publisher, topology)
    manager_b = make_manager(amqp_url, publisher, topology)
    manager_a.register(ConsumerSpec("events", topology.queue("events"), first, prefetch=5))
    manager_b.register(ConsumerSpec("events", topology.queue("events"), second, prefetch=5))
    try:
        manager_a.set_active({"events"})
        wait_until(lambda: not first.gate.is_set(), what="first consumer holding its 51st")
        manager_a.set_active(set())
        first.gate.set()
        wait_until(lambda: not manager_a.active(), what="first consumer cancelled")
        handled_by_first = set(first.done)
        manager_b.set_active({"events"})
        wait_until(
            lambda: len(set(first.done) | set(second.done)) == len(ids),
            what="every message handled by one of the two",
        )
    finally:
        manager_a.stop()
        manager_b.stop()
    assert 50 <= len(handled_by_first) < len(ids)
    assert set(first.done) == handled_by_first, "a cancelled consumer kept handling"
    # Acked only after handling: nothing the first one completed came back to the second.
    assert not (set(first.done) & set(second.done))
    assert queue_depth(amqp_url, topology.queue("events")) == 0


def test_an_infrastructure_error_backs_off_before_the_message_comes_again(
    amqp_url: str, publisher: Publisher, topology: Topology
) -> None:
    """A database outage is not the message's fault: the consumer waits its backoff before
    the message comes again, instead of burning the delivery limit at full speed (seen by
    the chaos suite: a state dead-lettered after 100 tries within 2.3 s)."""
    seen: list[float] = []

    def database_down_once(delivery: Delivery) -> None:
        seen.append(time.monotonic())
        if len(seen) == 1:
            raise sa_exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    manager = make_manager(amqp_url, publisher, topology)
    manager.register(ConsumerSpec("events", topology.queue("events"), database_down_once))
    manager.set_active({"events"})
    try:
        publish_events(publisher, topology, ["m1"])
        wait_until(lambda: len(seen) == 2, what="the message to come again")
    finally:
        manager.stop()
    assert seen[1] - seen[0] >= backoff(0) * 0.9  # waited its backoff, not at once
    dead_queue = topology.dead_letter_queue(topology.queue("events"))
    assert queue_depth(amqp_url, dead_queue) == 0


def test_a_fenced_handler_returns_the_message_for_the_primary_uncounted(
    amqp_url: str, publisher: Publisher, topology: Topology
) -> None:
    """A process fenced off (not primary any more) leaves the message untouched for the
    next primary: back to the queue after a pause, never counted against it, never parked
    (an error of the message's own would be parked at its second attempt here)."""
    refused: list[float] = []

    def fenced_off(delivery: Delivery) -> None:
        refused.append(time.monotonic())
        raise Fenced("st1 at epoch 2 is fenced off: the database has epoch 3")

    primary = Recorder()
    old = ConsumerManager([amqp_url], publisher, declare=topology.declare,
                          delivery_limit=2).start()  # fmt: skip
    new = make_manager(amqp_url, publisher, topology)
    old.register(ConsumerSpec("states", topology.queue("events"), fenced_off))
    new.register(ConsumerSpec("states", topology.queue("events"), primary))
    old.set_active({"states"})
    try:
        publish_events(publisher, topology, ["m1"])
        wait_until(lambda: len(refused) >= 2, what="the fenced process to refuse it twice")
        old.set_active(set())  # its follower stops the primary-only work
        wait_until(lambda: not old.active(), what="the fenced consumer cancelled")
        new.set_active({"states"})
        wait_until(lambda: primary.done["m1"] == 1, what="the new primary to handle it")
    finally:
        old.stop()
        new.stop()
    assert refused[1] - refused[0] >= FENCED_REQUEUE_DELAY * 0.9
    assert queue_depth(amqp_url, topology.dead_letter_queue(topology.queue("events"))) == 0


def test_a_batch_waits_its_linger_for_the_rest(
    amqp_url: str, publisher: Publisher, topology: Topology
) -> None:
    """A worker that got a batch's first message waits up to the consumer's `linger` for
    more (the sentinel link lingers so one transaction links several messages); a full
    batch does not wait."""
    batches: list[list[str]] = []

    def batch(deliveries: Sequence[Delivery]) -> list[BaseException | None]:
        batches.append([delivery.json()["id"] for delivery in deliveries])
        return [None] * len(deliveries)

    manager = make_manager(amqp_url, publisher, topology)
    manager.register(ConsumerSpec("events", topology.queue("events"), batch_handler=batch,
                                  batch=3, prefetch=10, linger=30.0))  # fmt: skip
    manager.set_active({"events"})
    try:
        wait_until(lambda: manager.active() == {"events"}, what="the consumer running")
        publish_events(publisher, topology, ["first"])
        # The rest of the batch comes later than the default linger (5 ms) would wait.
        time.sleep(0.5)
        assert batches == []
        publish_events(publisher, topology, ["second", "third"])
        wait_until(lambda: batches == [["first", "second", "third"]], 10, "one batch of three")
    finally:
        manager.stop()


def test_a_batch_handler_gets_what_waited_and_each_message_is_settled_by_its_answer(
    amqp_url: str, publisher: Publisher, topology: Topology
) -> None:
    """A batch consumer hands over what was prefetched together; its answer per message
    settles that message alone (done: acked; RejectMessage: dead-lettered with its reason;
    another error: tried again up to the delivery limit), never its neighbours."""
    ids = [f"m{i}" for i in range(300)]
    publish_events(publisher, topology, ids)  # waiting before the consumer starts
    sizes: list[int] = []
    attempts: Counter[str] = Counter()
    lock = threading.Lock()

    def batch(deliveries: Sequence[Delivery]) -> list[BaseException | None]:
        answers: list[BaseException | None] = []
        with lock:
            sizes.append(len(deliveries))
            for delivery in deliveries:
                message_id = delivery.json()["id"]
                attempts[message_id] += 1
                answers.append(
                    RejectMessage(f"unknown account in {message_id}") if message_id == "m9"
                    else RuntimeError(f"disk full while handling {message_id}")
                    if message_id == "m7" else None
                )  # fmt: skip
        return answers

    manager = make_manager(amqp_url, publisher, topology)
    manager.register(ConsumerSpec("events", topology.queue("events"), batch_handler=batch,
                                  batch=64, prefetch=128, workers=2))  # fmt: skip
    manager.set_active({"events"})
    dead_queue = topology.dead_letter_queue(topology.queue("events"))
    try:
        wait_until(lambda: queue_depth(amqp_url, dead_queue) == 2, what="two dead letters")
        wait_until(lambda: queue_depth(amqp_url, topology.queue("events")) == 0,
                   what="everything settled")  # fmt: skip
    finally:
        manager.stop()
    assert max(sizes) > 1 and max(sizes) <= 64  # batches, none over its size
    dead = {props.message_id: props.headers for props, _ in get_all(amqp_url, dead_queue)}
    assert set(dead) == {"m7", "m9"}
    assert "unknown account in m9" in dead["m9"][REASON_HEADER]
    assert "failed 3 time(s)" in dead["m7"][REASON_HEADER]
    assert attempts["m7"] == topology.delivery_limit and attempts["m9"] == 1
    assert all(attempts[i] == 1 for i in ids if i not in {"m7", "m9"})  # never repeated
