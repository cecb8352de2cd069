"""Broker plumbing on pika: topology, connections over a list of nodes, confirmed publishing.

Why it looks like this (see DESIGN.md, "Broker facts"):
- pika has no automatic recovery, so every connection here loops over the broker URLs with
  backoff, and a clean node stop (320 CONNECTION_FORCED) is retried like a crash.
- pika is not thread-safe: each connection belongs to exactly one thread; other threads talk
  to it through `add_callback_threadsafe`.
- A confirm round trip per message caps a publisher at ~900 msg/s, so `Publisher` pipelines:
  it keeps publishing while confirms arrive asynchronously, and a nack or a lost connection
  puts the unconfirmed messages back to be published again (consumers are idempotent).
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.channel
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.select_connection import SelectConnection
from pika.spec import Basic, BasicProperties

from ferrylink.settings import (
    DEFAULT_TRANSFER_STATES_MAX_LENGTH,
    FerrylinkSettings,
    redact_url,
)

log = logging.getLogger(__name__)

# Errors after which a connection is gone and must be opened again (possibly elsewhere).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.StreamLostError,
    ConnectionError,
    OSError,
)

# Delay queues (seconds): a message to retry later is parked in the tier nearest its delay;
# the broker dead-letters it back to its work queue when the TTL runs out. Nothing sleeps.
DELAY_TIERS: tuple[int, ...] = (1, 5, 30)


MAX_BACKOFF_SECONDS = 30.0


def backoff(retries: int) -> float:
    """How long to wait before try `retries + 1`: 1, 2, 4, ... seconds, at most
    MAX_BACKOFF_SECONDS (the delay tiers round it to 1, 5 or 30 s)."""
    return float(min(2 ** min(retries, 16), MAX_BACKOFF_SECONDS))


def delay_queue(queue: str, seconds: float) -> str:
    """The delay queue of `queue` for a wait of about `seconds` (the smallest tier that is
    not shorter, else the longest)."""
    tier = next((t for t in DELAY_TIERS if t >= seconds), DELAY_TIERS[-1])
    return f"{queue}.delay.{tier}s"


# --------------------------------------------------------------------------------------------
# Names and topology
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """Every queue and exchange of one Ferrylink cluster, named under one prefix."""

    prefix: str
    delivery_limit: int = 5
    # Work queues shared by the cluster. Node-local queues are declared on demand.
    work_queues: tuple[str, ...] = ("events", "transfer-states")
    fanout_exchanges: tuple[str, ...] = ("assignments", "heartbeats", "config")
    # With a node id, that node's own queues (used in passive_legacy) are declared too.
    node_id: str | None = None
    node_work_queues: tuple[str, ...] = ("events", "transfer-states")
    # Work queues with a length bound (shared and node-local alike). Past the bound the
    # broker rejects new publishes (`x-overflow: reject-publish`): the publisher sees a nack
    # and decides (the transfer-state publisher counts it and drops the state).
    # The default equals the setting's default, so a Topology built without settings
    # declares the same arguments as the services (the broker refuses a mismatch).
    max_lengths: tuple[tuple[str, int], ...] = (
        ("transfer-states", DEFAULT_TRANSFER_STATES_MAX_LENGTH),
    )
    # Work queues whose consumers may retry a message later through delay queues.
    delayed_queues: tuple[str, ...] = ("events",)

    def queue(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def bound_of(self, queue: str) -> int | None:
        """The length bound of a work queue by its full name (shared or node-local), None
        for an unbounded one."""
        for name, bound in self.max_lengths:
            shared = self.queue(name)
            if queue == shared or (queue.startswith(shared + ".") and not queue.endswith(".dead")):
                return bound
        return None

    def node_queue(self, name: str, node_id: str) -> str:
        """A node-local work queue (passive_legacy keeps each server's events apart)."""
        return f"{self.prefix}.{name}.{node_id}"

    def dead_letter_queue(self, queue: str) -> str:
        return f"{queue}.dead"

    def exchange(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def declare(self, channel: BlockingChannel) -> None:
        """Declare everything; idempotent, so every (re)connect may call it."""
        for name in self.fanout_exchanges:
            channel.exchange_declare(self.exchange(name), exchange_type="fanout", durable=True)
        bounds = dict(self.max_lengths)
        for name in self.work_queues:
            self.declare_work_queue(
                channel, self.queue(name), bounds.get(name), name in self.delayed_queues
            )
        if self.node_id is not None:
            for name in self.node_work_queues:
                self.declare_work_queue(
                    channel,
                    self.node_queue(name, self.node_id),
                    bounds.get(name),
                    name in self.delayed_queues,
                )

    def delay_queues(self, queue: str) -> list[str]:
        return [delay_queue(queue, tier) for tier in DELAY_TIERS]

    def declare_work_queue(
        self,
        channel: BlockingChannel,
        queue: str,
        max_length: int | None = None,
        delayed: bool = False,
    ) -> None:
        """A durable quorum queue whose poison messages go to its own dead-letter queue.

        At-least-once dead-lettering (with reject-publish overflow, which it requires) so a
        message is never dropped between the work queue and its dead-letter queue. With
        `delayed`, also its delay queues: consumer-less quorum queues whose messages return
        to `queue` when their TTL ends (the same at-least-once dead-lettering).
        """
        if delayed:
            for tier in DELAY_TIERS:
                channel.queue_declare(
                    delay_queue(queue, tier),
                    durable=True,
                    arguments={
                        "x-queue-type": "quorum",
                        "x-message-ttl": tier * 1000,
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": queue,
                        "x-dead-letter-strategy": "at-least-once",
                        "x-overflow": "reject-publish",
                    },
                )
        dead = self.dead_letter_queue(queue)
        channel.queue_declare(dead, durable=True, arguments={"x-queue-type": "quorum"})
        arguments: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dead,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        if max_length is not None:
            arguments["x-max-length"] = max_length
        channel.queue_declare(queue, durable=True, arguments=arguments)

    @classmethod
    def from_settings(cls, settings: FerrylinkSettings) -> Topology:
        return cls(
            prefix=settings.name_prefix,
            delivery_limit=settings.delivery_limit,
            node_id=settings.node_id,
            max_lengths=(("transfer-states", settings.transfer_states_max_length),),
        )


# --------------------------------------------------------------------------------------------
# Connections
# --------------------------------------------------------------------------------------------


def connection_parameters(urls: Sequence[str], heartbeat: int = 10) -> list[pika.URLParameters]:
    """Parameters for each broker URL; short timeouts so a dead node is skipped quickly."""
    params = []
    for url in urls:
        p = pika.URLParameters(url)
        p.heartbeat = heartbeat
        p.blocked_connection_timeout = 30
        p.socket_timeout = 3
        p.connection_attempts = 1
        p.client_properties = {"connection_name": "ferrylink"}
        params.append(p)
    return params


class Backoff:
    """Exponential backoff with jitter, reset after a connection has held."""

    def __init__(self, initial: float = 0.1, maximum: float = 3.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.current = initial

    def next_delay(self) -> float:
        delay = self.current * random.uniform(0.5, 1.0)
        self.current = min(self.current * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.current = self.initial


def connect_blocking(
    urls: Sequence[str], stop: threading.Event | None = None, deadline: float | None = None
) -> pika.BlockingConnection:
    """Connect to the first broker URL that answers, retrying the list with backoff.

    Rotates the list's start on every round so load spreads over nodes after a failure.
    Raises AMQPConnectionError if `stop` is set or `deadline` (a monotonic time) passes.
    """
    backoff = Backoff()
    start = 0
    while True:
        ordered = list(urls[start:]) + list(urls[:start])
        try:
            return pika.BlockingConnection(connection_parameters(ordered))
        except CONNECTION_ERRORS as exc:
            log.warning("no broker answered (%s): %s", ", ".join(map(redact_url, urls)), exc)
        start = (start + 1) % len(urls)
        delay = backoff.next_delay()
        if deadline is not None and time.monotonic() + delay > deadline:
            raise pika.exceptions.AMQPConnectionError("no broker answered before the deadline")
        if stop is not None:
            if stop.wait(delay):
                raise pika.exceptions.AMQPConnectionError("stopped while connecting")
        else:
            time.sleep(delay)


# --------------------------------------------------------------------------------------------
# Publishing with pipelined confirms
# --------------------------------------------------------------------------------------------


class UnroutableError(Exception):
    """The broker had no queue for a message published as mandatory."""


class PublishRejected(Exception):
    """The broker nacked a message of a publisher whose nacks are final (the queue is full
    and rejects publishes, or a quorum queue's leader is being elected). Not re-published by
    the publisher: its caller decides."""


@dataclass
class OutgoingMessage:
    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any]
    message_id: str
    mandatory: bool
    persistent: bool
    future: Future[None] = field(default_factory=Future)


class Publisher:
    """Thread-safe publisher with publisher confirms, pipelined on its own I/O thread.

    `publish()` returns a future that resolves once the broker confirmed the message (for a
    quorum queue: once a quorum stored it). A nack or a dropped connection re-publishes the
    message, so a confirmed message is stored and an unconfirmed one is retried until
    `close()`. `declare` runs on every (re)connect, before anything is published.

    With `nacks_are_final`, a nack fails the message's future with `PublishRejected` instead
    (for a bounded queue with reject-publish, where publishing again would only wait for
    room). The broker does not say why it nacked: a quorum queue whose leader is being
    elected nacks too, so the caller must tell the two apart (ferrylink.transfer_states
    reads the queue's depth and publishes again unless it is full). The connection is still
    recycled, at most every `NACK_RECYCLE_SECONDS`, to get away from a channel that keeps
    nacking (see `_on_confirm`).
    """

    NACK_RECYCLE_SECONDS = 5.0

    def __init__(
        self,
        urls: Sequence[str],
        declare: Callable[[BlockingChannel], None] | None = None,
        name: str = "publisher",
        nacks_are_final: bool = False,
    ) -> None:
        self._urls = list(urls)
        self._declare = declare
        self._name = name
        self._pending: collections.deque[OutgoingMessage] = collections.deque()
        self._wake_pending = False  # a flush is scheduled on the I/O thread
        self._unconfirmed: dict[int, OutgoingMessage] = {}
        self._returned: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._connection: SelectConnection | None = None
        self._channel: pika.channel.Channel | None = None
        self._next_tag = 0
        self._url_index = 0
        self._backoff = Backoff()
        self._nacks_are_final = nacks_are_final
        self._last_recycle = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.connections_opened = 0  # grows on every (re)connect; shown in tests and logs

    # -- public API (any thread) ------------------------------------------------------------

    def start(self) -> Publisher:
        self._thread.start()
        return self

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        mandatory: bool = True,
        persistent: bool = True,
    ) -> Future[None]:
        message = OutgoingMessage(
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            headers=dict(headers or {}),
            message_id=message_id or uuid.uuid4().hex,
            mandatory=mandatory,
            persistent=persistent,
        )
        if self._stopping.is_set():
            message.future.set_exception(RuntimeError(f"{self._name} is closed"))
            return message.future
        with self._lock:
            self._pending.append(message)
            # One wake-up of the I/O thread flushes everything pending: a burst of publishes
            # costs one, not one each.
            wake, self._wake_pending = not self._wake_pending, True
        if wake:
            self._wake()
        return message.future

    def publish_and_wait(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        self.publish(exchange, routing_key, body, **kwargs).result(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop; messages not yet confirmed fail their futures."""
        self._stopping.set()
        self._wake()
        self._thread.join(timeout)
        with self._lock:
            leftovers = list(self._pending) + list(self._unconfirmed.values())
            self._pending.clear()
            self._unconfirmed.clear()
        for message in leftovers:
            if not message.future.done():
                message.future.set_exception(RuntimeError(f"{self._name} closed unconfirmed"))

    # -- I/O thread ---------------------------------------------------------------------------

    def _wake(self) -> None:
        connection = self._connection
        if connection is not None:
            try:
                connection.ioloop.add_callback_threadsafe(self._flush)
                return
            except Exception:  # the loop is closing; the next connection flushes
                pass
        with self._lock:
            self._wake_pending = False  # no flush is coming: the next publish wakes again

    def _run(self) -> None:
        while not self._stopping.is_set():
            url = self._urls[self._url_index % len(self._urls)]
            self._url_index += 1
            params = connection_parameters([url])[0]
            if not self._declared(params):
                self._stopping.wait(self._backoff.next_delay())
                continue
            connection = SelectConnection(
                params,
                on_open_callback=self._on_connection_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_connection_closed,
            )
            self._connection = connection
            try:
                connection.ioloop.start()
            except Exception:  # never let this thread die: publish through a new connection
                log.exception("%s: broker connection failed", self._name)
            self._connection = None
            self._channel = None
            self._connected.clear()
            self._requeue_unconfirmed()
            if not self._stopping.is_set():
                self._stopping.wait(self._backoff.next_delay())

    def _declared(self, params: pika.URLParameters) -> bool:
        """Declare the topology on a short blocking connection, before the select loop runs
        (never inside its callbacks, where a blocking call would stall every publish)."""
        if self._declare is None:
            return True
        try:
            connection = pika.BlockingConnection(params)
            try:
                self._declare(connection.channel())
            finally:
                connection.close()
            return True
        except CONNECTION_ERRORS as exc:
            log.warning("%s: cannot declare topology: %s", self._name, exc)
            return False

    def _on_open_error(self, connection: SelectConnection, error: BaseException) -> None:
        log.warning("%s: cannot connect: %s", self._name, error)
        connection.ioloop.stop()

    def _on_connection_open(self, connection: SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self._channel = channel
        self._next_tag = 0
        channel.add_on_return_callback(self._on_return)
        channel.add_on_close_callback(self._on_channel_closed)
        channel.confirm_delivery(self._on_confirm)
        self._backoff.reset()
        self.connections_opened += 1
        self._connected.set()
        self._flush()

    def _on_channel_closed(self, channel: pika.channel.Channel, reason: BaseException) -> None:
        log.warning("%s: channel closed: %s", self._name, reason)
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _on_connection_closed(self, connection: SelectConnection, reason: BaseException) -> None:
        if not self._stopping.is_set():
            log.warning("%s: connection lost: %s", self._name, reason)
        connection.ioloop.stop()

    def _requeue_unconfirmed(self) -> None:
        """Unconfirmed messages go first in line again, in their original order."""
        with self._lock:
            for tag in sorted(self._unconfirmed, reverse=True):
                self._pending.appendleft(self._unconfirmed.pop(tag))

    def _flush(self) -> None:
        with self._lock:
            self._wake_pending = False  # what is published from now on wakes again
        if self._stopping.is_set():
            if self._connection is not None and self._connection.is_open:
                self._connection.close()
            return
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        while True:
            with self._lock:
                if not self._pending:
                    return
                message = self._pending.popleft()
                self._next_tag += 1
                self._unconfirmed[self._next_tag] = message
            properties = BasicProperties(
                headers=message.headers,
                message_id=message.message_id,
                delivery_mode=2 if message.persistent else 1,
                content_type="application/json",
            )
            try:
                channel.basic_publish(
                    message.exchange,
                    message.routing_key,
                    message.body,
                    properties=properties,
                    mandatory=message.mandatory,
                )
            except pika.exceptions.UnsupportedAMQPFieldException as exc:
                # A caller's bad header: fail that message, not the connection. Nothing was
                # sent, so the tag was not used either.
                with self._lock:
                    self._unconfirmed.pop(self._next_tag, None)
                    self._next_tag -= 1
                message.future.set_exception(ValueError(f"cannot encode headers: {exc}"))

    def _on_return(
        self,
        channel: pika.channel.Channel,
        method: Basic.Return,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        # A return comes before the confirm of the same message.
        if properties.message_id:
            self._returned.add(properties.message_id)

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        acked = isinstance(method, Basic.Ack)
        with self._lock:
            if method.multiple:
                tags = [t for t in self._unconfirmed if t <= method.delivery_tag]
            else:
                tags = [method.delivery_tag] if method.delivery_tag in self._unconfirmed else []
            messages = [self._unconfirmed.pop(t) for t in sorted(tags)]
            if not acked and not self._nacks_are_final:
                # The broker could not store them (e.g. a quorum leader change): publish again.
                self._pending.extendleft(reversed(messages))
        if acked:
            for message in messages:
                if message.message_id in self._returned:
                    self._returned.discard(message.message_id)
                    message.future.set_exception(
                        UnroutableError(f"no queue for {message.exchange!r}/{message.routing_key}")
                    )
                else:
                    message.future.set_result(None)
        elif self._nacks_are_final:
            for message in messages:
                message.future.set_exception(
                    PublishRejected(f"the broker rejected {message.message_id}")
                )
            now = time.monotonic()
            if now - self._last_recycle >= self.NACK_RECYCLE_SECONDS:
                self._last_recycle = now
                if self._connection is not None and self._connection.is_open:
                    self._connection.close()
        else:
            # Seen on RabbitMQ 3.10: after a quorum leader died, a channel that got nacks can
            # keep nacking although a new leader serves fresh channels. So start over on a new
            # connection (after the usual backoff) instead of re-publishing here.
            if self._connection is not None and self._connection.is_open:
                log.warning("%s: messages nacked; reconnecting to publish them again", self._name)
                self._connection.close()


def wait_all(futures: Iterable[Future[None]], timeout: float) -> None:
    """Wait until every publish is confirmed; raise the first failure."""
    deadline = time.monotonic() + timeout
    for future in futures:
        future.result(max(0.0, deadline - time.monotonic()))


def queue_message_counts(urls: Sequence[str], queues: Sequence[str]) -> dict[str, int]:
    """Messages waiting in each queue; 0 for a queue that was never declared."""
    return {name: messages for name, (messages, _) in queue_stats(urls, queues).items()}


def queue_stats(urls: Sequence[str], queues: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(messages waiting, consumers) of each queue; (0, 0) for one never declared."""
    stats: dict[str, tuple[int, int]] = {}
    connection = connect_blocking(urls, deadline=time.monotonic() + 10)
    try:
        for name in queues:
            channel = connection.channel()
            try:
                method = channel.queue_declare(name, passive=True).method
                stats[name] = (method.message_count, method.consumer_count)
                channel.close()
            except pika.exceptions.ChannelClosedByBroker:  # 404: never declared
                stats[name] = (0, 0)
    finally:
        connection.close()
    return stats
