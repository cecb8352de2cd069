"""The consumer manager: starts and cancels named queue consumers to match a desired set.

A service never decides by itself whether to consume; it registers its consumers here and
calls `set_active()` with what the coordinator's assignment says. Failover is therefore
nothing but consumers being cancelled on one server and started on another: the broker hands
every unacked message of a cancelled or dead consumer to whoever consumes next.

Threading (pika is not thread-safe): one thread owns the connection and runs its I/O loop,
which also services AMQP heartbeats. Handlers run on a worker thread per consumer, so a slow
handler never starves heartbeats; the worker hands its ack back to the I/O thread with
`add_callback_threadsafe`. A message is acked only after its handler returned, i.e. after
the handler committed its work.

Batches: a consumer with a batch handler gives it, each time a worker is free, the message
it waits for and whatever else is already prefetched (up to `batch`), and settles each
message by the handler's answer for it, as if a single handler had returned or raised that;
the acks of a batch go to the I/O thread in one callback.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from ferrylink.contracts import RETRIES_HEADER, DeadLetterInfo, RejectMessage, RetryLater
from ferrylink.errors import INFRASTRUCTURE_ERRORS
from ferrylink.fencing import Fenced
from ferrylink.messaging import (
    CONNECTION_ERRORS,
    Backoff,
    Publisher,
    backoff,
    connect_blocking,
    delay_queue,
)

log = logging.getLogger(__name__)

# A message whose handler was fenced off goes back to its queue after this pause (meanwhile
# the follower cancels the consumer, so it is not handed to this fenced process again).
FENCED_REQUEUE_DELAY = 0.5
# How long a batch worker waits for more of a burst after its first message.
BATCH_LINGER_SECONDS = 0.005


@dataclass(frozen=True)
class Delivery:
    """One message as a handler sees it."""

    queue: str
    body: bytes
    headers: dict[str, Any]
    message_id: str | None
    routing_key: str
    redelivered: bool
    # How many times the broker handed this message out before (quorum queues count it).
    delivery_count: int
    # How many times it came back from a delay queue (RetryLater).
    retries: int = 0

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RejectMessage(f"invalid JSON: {exc}") from exc


Handler = Callable[[Delivery], None]
# Per delivery: None (done) or the exception a single handler would have raised for it.
BatchHandler = Callable[[Sequence[Delivery]], Sequence[BaseException | None]]


@dataclass
class ConsumerSpec:
    """A consumer the manager may run: which queue, which handler, how many in flight."""

    name: str
    queue: str
    handler: Handler | None = None
    prefetch: int = 10
    # Worker threads running the handler; 1 keeps messages in queue order.
    workers: int = 1
    # Subscribe to this fanout exchange through a private, self-deleting queue instead of
    # consuming `queue` (used for heartbeats, assignments and config changes).
    exchange: str | None = None
    # Runs whenever connected, whatever `set_active` says.
    always: bool = False
    # Instead of `handler`: takes up to `batch` deliveries that waited together.
    batch_handler: BatchHandler | None = None
    batch: int = 1
    # How long a worker waits for more of a batch after its first message.
    linger: float = BATCH_LINGER_SECONDS

    def __post_init__(self) -> None:
        if (self.handler is None) == (self.batch_handler is None):
            raise ValueError(f"consumer {self.name}: give a handler or a batch handler")
        if self.batch_handler is not None and self.exchange is not None:
            raise ValueError(f"consumer {self.name}: broadcasts are not batched")


@dataclass
class _RunningConsumer:
    spec: ConsumerSpec
    channel: BlockingChannel
    consumer_tag: str
    work: queue.Queue[tuple[Basic.Deliver, BasicProperties, bytes] | None]
    threads: list[threading.Thread]
    cancelled: threading.Event = field(default_factory=threading.Event)
    in_flight: int = 0
    # Delivery tags not yet acked or nacked (touched on the I/O thread only).
    unsettled: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class _Settle:
    """What to do with a delivery once handled (on the I/O thread): ack it (acks are sent
    together, `_send_acks`), or nack it back to its queue."""

    tag: int
    ack: bool = True


def _ack(tag: int) -> _Settle:
    return _Settle(tag)


def _requeue(tag: int) -> _Settle:
    return _Settle(tag, ack=False)


class ConsumerManager:
    """Keeps exactly the desired consumers running, across broker failures.

    `publisher` is used to move poison messages to their dead-letter queue with a reason,
    confirmed before the original is acked, so a dead-lettered message is never lost.
    """

    def __init__(
        self,
        urls: list[str],
        publisher: Publisher,
        declare: Callable[[BlockingChannel], None] | None = None,
        delivery_limit: int = 5,
        name: str = "consumers",
    ) -> None:
        self._urls = urls
        self._publisher = publisher
        self._declare = declare
        self._delivery_limit = delivery_limit
        self._name = name
        self._specs: dict[str, ConsumerSpec] = {}
        self._desired: set[str] = set()
        self._running: dict[str, _RunningConsumer] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._connection: pika.BlockingConnection | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.on_change: Callable[[set[str]], None] | None = None
        self.connections_opened = 0  # grows on every (re)connect

    # -- public API (any thread) ------------------------------------------------------------

    def register(self, spec: ConsumerSpec) -> None:
        with self._lock:
            self._specs[spec.name] = spec

    def set_active(self, names: set[str]) -> None:
        """Declare which registered consumers should run; the I/O thread reconciles."""
        with self._lock:
            unknown = names - set(self._specs)
            if unknown:
                raise ValueError(f"unknown consumers: {sorted(unknown)}")
            if any(self._specs[n].always for n in names):
                raise ValueError("always-on consumers are not switched by set_active")
            self._desired = set(names)

    def registered(self) -> list[str]:
        with self._lock:
            return sorted(self._specs)

    def active(self) -> set[str]:
        """Consumers currently consuming (not the desired set)."""
        with self._lock:
            return {n for n, c in self._running.items() if not c.cancelled.is_set()}

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> ConsumerManager:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every consumer (letting in-flight handlers finish) and disconnect."""
        with self._lock:
            self._desired = set()
        self._stopping.set()
        self._thread.join(timeout)

    # -- I/O thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff()
        while not self._stopping.is_set():
            try:
                connection = connect_blocking(self._urls, stop=self._stopping)
            except CONNECTION_ERRORS:
                continue
            self._connection = connection
            try:
                if self._declare is not None:
                    declare_channel = connection.channel()
                    self._declare(declare_channel)
                    declare_channel.close()
                self.connections_opened += 1
                self._connected.set()
                backoff.reset()
                self._serve(connection)
            except CONNECTION_ERRORS as exc:
                log.warning("%s: broker connection lost: %s", self._name, exc)
            except Exception:
                # Never let this thread die (nothing would be consumed again): pika raises
                # other errors too once a connection is gone, e.g. ValueError("Timeout
                # closed before call") from the closed I/O loop of a lost connection (seen
                # in CI after a broker node was killed). Connect again.
                log.exception("%s: broker connection failed", self._name)
            finally:
                self._connected.clear()
                self._abandon_all()
                self._connection = None
                if connection.is_open:
                    try:
                        connection.close()
                    except CONNECTION_ERRORS:
                        pass
            if not self._stopping.is_set():
                self._stopping.wait(backoff.next_delay())

    def _serve(self, connection: pika.BlockingConnection) -> None:
        while True:
            self._reconcile(connection)
            if self._stopping.is_set() and not self._running:
                return
            connection.process_data_events(time_limit=0.05)

    def _reconcile(self, connection: pika.BlockingConnection) -> None:
        with self._lock:
            desired = (
                set()
                if self._stopping.is_set()
                else (self._desired | {n for n, spec in self._specs.items() if spec.always})
            )
            specs = dict(self._specs)
        changed = False
        for name in desired - set(self._running):
            self._start_consumer(connection, specs[name])
            changed = True
        for name, running in list(self._running.items()):
            if name not in desired and not running.cancelled.is_set():
                self._begin_cancel(running)
                changed = True
            if running.cancelled.is_set() and running.in_flight == 0:
                self._finish_cancel(running)
                del self._running[name]
                changed = True
        if changed and self.on_change is not None:
            self.on_change(self.active())

    def _start_consumer(self, connection: pika.BlockingConnection, spec: ConsumerSpec) -> None:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=spec.prefetch)
        work: queue.Queue[tuple[Basic.Deliver, BasicProperties, bytes] | None] = queue.Queue()
        running = _RunningConsumer(
            spec=spec, channel=channel, consumer_tag="", work=work, threads=[]
        )

        def on_message(
            ch: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
        ) -> None:
            # Every outstanding delivery, so that no multiple ack covers one left unhandled.
            running.unsettled.add(method.delivery_tag)
            if running.cancelled.is_set():
                return  # requeued when the channel closes
            running.in_flight += 1
            work.put((method, props, body))

        queue_name = spec.queue
        if spec.exchange is not None:
            # Short TTL: a subscriber that fell behind wants the newest state, not a backlog.
            declared = channel.queue_declare(
                "",
                exclusive=True,
                auto_delete=True,
                arguments={"x-message-ttl": 10_000, "x-max-length": 1000},
            )
            queue_name = declared.method.queue
            channel.queue_bind(queue_name, spec.exchange)
        running.consumer_tag = channel.basic_consume(queue_name, on_message)
        for i in range(spec.workers):
            thread = threading.Thread(
                target=self._work,
                args=(connection, running),
                name=f"{spec.name}-{i}",
                daemon=True,
            )
            thread.start()
            running.threads.append(thread)
        with self._lock:
            self._running[spec.name] = running
        log.info("%s: consuming %s from %s", self._name, spec.name, spec.queue)

    def _begin_cancel(self, running: _RunningConsumer) -> None:
        """Stop taking messages; handlers already started finish and ack first."""
        running.cancelled.set()
        try:
            running.channel.basic_cancel(running.consumer_tag)
        except CONNECTION_ERRORS as exc:
            log.warning("%s: cancel of %s failed: %s", self._name, running.spec.name, exc)
        # Messages queued for the worker but not started are dropped here and requeued by
        # the broker when the channel closes.
        dropped = 0
        while True:
            try:
                item = running.work.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                dropped += 1
        running.in_flight -= dropped

    def _finish_cancel(self, running: _RunningConsumer) -> None:
        for _ in running.threads:
            running.work.put(None)
        if running.channel.is_open:
            try:
                running.channel.close()  # requeues anything still unacked
            except CONNECTION_ERRORS:
                pass
        log.info("%s: stopped consuming %s", self._name, running.spec.name)

    def _abandon_all(self) -> None:
        """The connection is gone: the broker requeues everything unacked; stop workers."""
        with self._lock:
            running_list = list(self._running.values())
            self._running.clear()
        for running in running_list:
            running.cancelled.set()
            for _ in running.threads:
                running.work.put(None)
        if running_list and self.on_change is not None:
            self.on_change(set())

    # -- worker threads ---------------------------------------------------------------------

    def _work(self, connection: pika.BlockingConnection, running: _RunningConsumer) -> None:
        batch = running.spec.batch if running.spec.batch_handler is not None else 1
        while True:
            item = running.work.get()
            if item is None:
                return
            items, last = [item], False
            # What else is prefetched, and a moment for the rest of a burst the I/O thread
            # is still reading (a worker woken by a burst's first message would take it
            # alone): at most `linger` after the first.
            until = time.monotonic() + running.spec.linger
            while len(items) < batch:
                try:
                    more = running.work.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    last = True
                    break
                items.append(more)
            if not (running.cancelled.is_set() and not running.channel.is_open):
                if running.spec.batch_handler is not None:
                    settles = self._handle_batch(running, items)
                else:
                    settles = [self._handle(running, *item)]
                self._settle_threadsafe(connection, running, settles)
            if last:
                return

    def _delivery(self, running: _RunningConsumer, method: Basic.Deliver,
                  props: BasicProperties, body: bytes) -> Delivery:  # fmt: skip
        headers = dict(props.headers or {})
        return Delivery(
            queue=running.spec.queue,
            body=body,
            headers=headers,
            message_id=props.message_id,
            routing_key=method.routing_key,
            redelivered=bool(method.redelivered),
            delivery_count=int(headers.get("x-delivery-count", 0) or 0),
            retries=int(headers.get(RETRIES_HEADER, 0) or 0),
        )

    def _handle(
        self,
        running: _RunningConsumer,
        method: Basic.Deliver,
        props: BasicProperties,
        body: bytes,
    ) -> _Settle:
        """Run the handler; return what to do with the delivery, to be run on the I/O thread."""
        delivery = self._delivery(running, method, props, body)
        tag = method.delivery_tag
        assert running.spec.handler is not None
        if running.spec.exchange is not None:
            # A broadcast of current state (heartbeat, assignment): the next one supersedes a
            # message that failed, so it is logged and dropped, never retried.
            try:
                running.spec.handler(delivery)
            except Exception:
                log.exception("%s: %s: dropped a bad broadcast", self._name, running.spec.name)
            return _ack(tag)
        error: BaseException | None = None
        try:
            running.spec.handler(delivery)
        except Exception as exc:
            error = exc
        settle, pause = self._settle_for(running, delivery, props, tag, error)
        if pause:
            self._stopping.wait(pause)
        return settle

    def _handle_batch(
        self,
        running: _RunningConsumer,
        items: list[tuple[Basic.Deliver, BasicProperties, bytes]],
    ) -> list[_Settle]:
        """Run the batch handler; what to do with each delivery (as `_handle`)."""
        deliveries = [self._delivery(running, *item) for item in items]
        assert running.spec.batch_handler is not None
        try:
            errors = list(running.spec.batch_handler(deliveries))
            if len(errors) != len(deliveries):
                raise RuntimeError(f"{len(errors)} answers for {len(deliveries)} messages")
        except Exception as exc:  # the handler failed as a whole: each message with it
            errors = [exc] * len(deliveries)
        settles, pause = [], 0.0
        for (method, props, _body), delivery, error in zip(items, deliveries, errors,
                                                            strict=True):  # fmt: skip
            settle, wait = self._settle_for(running, delivery, props, method.delivery_tag, error)
            settles.append(settle)
            pause = max(pause, wait)
        if pause:
            self._stopping.wait(pause)
        return settles

    def _settle_for(
        self,
        running: _RunningConsumer,
        delivery: Delivery,
        props: BasicProperties,
        tag: int,
        error: BaseException | None,
    ) -> tuple[_Settle, float]:
        """What to do with a delivery whose handler returned (`error` None) or raised
        `error`, to be run on the I/O thread; and how long the worker backs off first."""
        if error is None:
            return _ack(tag), 0.0
        if isinstance(error, RejectMessage):
            reason = str(error)
        elif isinstance(error, RetryLater):
            if self._delay(delivery, props, error):
                return _ack(tag), 0.0
            return _requeue(tag), 0.0
        elif isinstance(error, Fenced):
            # This process is not primary any more (primary-only work): the message is the
            # next primary's, untouched; never counted against it, never parked.
            log.info("%s: %s: %s; returned to the queue", self._name, running.spec.name, error)
            return _requeue(tag), FENCED_REQUEUE_DELAY
        elif isinstance(error, INFRASTRUCTURE_ERRORS):
            # Not the message's fault (the database or the broker): back off before it comes
            # again, so an outage does not burn through the delivery limit in seconds. The
            # worker waits (this queue's order may matter, e.g. the sentinel link's).
            attempts = delivery.delivery_count + 1
            reason = f"failed {attempts} time(s): {type(error).__name__}: {error}"
            if attempts < self._delivery_limit:
                log.warning("%s: %s: %s; backing off", self._name, running.spec.name, reason)
                return (_requeue(tag),
                        backoff(delivery.delivery_count))  # fmt: skip
        else:  # a handler bug or a passing fault: retry, up to the limit
            attempts = delivery.delivery_count + 1
            reason = f"failed {attempts} time(s): {type(error).__name__}: {error}"
            if attempts < self._delivery_limit:
                log.warning("%s: %s: %s; will retry", self._name, running.spec.name, reason)
                return _requeue(tag), 0.0
        if self._dead_letter(delivery, props, reason):
            return _ack(tag), 0.0
        # Could not park it: leave it to the broker (its delivery limit dead-letters it).
        return _requeue(tag), 0.0

    def _delay(self, delivery: Delivery, props: BasicProperties, retry: RetryLater) -> bool:
        """Park the message in its delay queue; False if that could not be confirmed."""
        delay = retry.delay if retry.delay is not None else backoff(delivery.retries)
        target = delay_queue(delivery.queue, delay)
        log.info("%s: %s retried via %s: %s", self._name, delivery.message_id, target, retry)
        headers = {k: v for k, v in delivery.headers.items() if k != "x-delivery-count"}
        headers[RETRIES_HEADER] = delivery.retries + 1
        try:
            self._publisher.publish(
                "", target, delivery.body, headers=headers,
                message_id=delivery.message_id or None,
            ).result(timeout=30)  # fmt: skip
            return True
        except Exception as exc:
            log.warning("%s: could not delay %s: %s", self._name, delivery.message_id, exc)
            return False

    def _dead_letter(self, delivery: Delivery, props: BasicProperties, reason: str) -> bool:
        log.error(
            "%s: dead-lettering %s from %s: %s",
            self._name,
            delivery.message_id,
            delivery.queue,
            reason,
        )
        info = DeadLetterInfo(reason=reason, source_queue=delivery.queue,
                              dead_lettered_at=time.time())  # fmt: skip
        headers = {**delivery.headers, **info.to_headers()}
        try:
            self._publisher.publish(
                "",
                f"{delivery.queue}.dead",
                delivery.body,
                headers=headers,
                message_id=delivery.message_id or None,
            ).result(timeout=30)
            return True
        except Exception as exc:
            log.error("%s: could not dead-letter %s: %s", self._name, delivery.message_id, exc)
            return False

    def _settle_threadsafe(
        self,
        connection: pika.BlockingConnection,
        running: _RunningConsumer,
        settles: list[_Settle],
    ) -> None:
        def on_io_thread() -> None:
            running.in_flight -= len(settles)
            if not running.channel.is_open:
                return  # the broker requeues them
            try:
                for settle in settles:
                    if not settle.ack:
                        running.channel.basic_nack(settle.tag, requeue=True)
                        running.unsettled.discard(settle.tag)
                _send_acks(running, {settle.tag for settle in settles if settle.ack})
            except CONNECTION_ERRORS as exc:
                # The broker will redeliver; handlers are idempotent.
                log.warning("%s: ack failed: %s", self._name, exc)

        try:
            connection.add_callback_threadsafe(on_io_thread)
        except CONNECTION_ERRORS:
            pass  # connection gone: the broker redelivers the message


def _send_acks(running: _RunningConsumer, tags: set[int]) -> None:
    """Ack `tags`. Those that, with no unsettled delivery before them, start the channel's
    unsettled deliveries go in one frame (`multiple`); the others one by one. A batch's
    acks are so one frame instead of one per message, unless another worker still holds
    older deliveries."""
    if not tags:
        return
    upto = 0  # delivery tags start at 1
    for tag in sorted(running.unsettled):
        if tag not in tags:
            break
        upto = tag
    if upto:
        running.channel.basic_ack(upto, multiple=True)
    for tag in sorted(tag for tag in tags if tag > upto):
        running.channel.basic_ack(tag)
    running.unsettled.difference_update(tags)
