"""Transfer states (the message is `contracts.TransferState`): staged in the outbox with the leg
they announce, published on their own connection until the broker stored them, and dropped
only when the bounded transfer-states queue rejected them by its overflow policy.

The transfer-states queue is bounded (`FERRYLINK_TRANSFER_STATES_MAX_LENGTH`, quorum queue,
`x-overflow: reject-publish`), so that a tracking outage never stalls event processing. But
a nack does not say why. RabbitMQ 3.10's quorum-queue client also nacks when it cannot
register with the queue's leader (the leader's node was killed, an election is under way),
and after an overflow a channel keeps rejecting until the queue drained below 80 % of its
bound (rabbit_fifo's soft limit). So on a nack the queue's depth is read (a passive
declare) and `verdict()` decides:

- at or above the bound: the overflow policy rejected it. The state is dropped, counted
  (`ferrylink_transfer_states_overflow_total`, `TransferStatePublisher.overflow`), logged,
  and its outbox row deleted. It is never waited for: the transfer log holds every leg;
- between the soft limit and the bound: a queue that overflowed rejects there until its
  consumer made room, so the state is published again; only if it is still rejected there
  after `BAND_PATIENCE_SECONDS` (the consumer stopped in the band) is it dropped and counted;
- below the soft limit, or the depth unreadable (the election itself): not an overflow.
  Published again after a backoff (`retry_delay`) until the broker confirms it.

Nothing is lost in between: the state's outbox row is committed with its leg and deleted
only once confirmed or dropped; a process that dies leaves the row to the outbox relay of
any transaction manager. A state may so arrive twice; the sentinel link drops repeats by
the state's id (`<leg_key>:<status>`).
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import queue as queues
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import pika.exceptions
from opentelemetry import context as otel_context
from prometheus_client import Counter
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, col, delete

from ferrylink import outbox
from ferrylink.contracts import TRANSFER_STATES_PER_MESSAGE, TransferState, TransferStates
from ferrylink.db import writing
from ferrylink.errors import INFRASTRUCTURE_ERRORS
from ferrylink.messaging import CONNECTION_ERRORS, Publisher, PublishRejected, connect_blocking
from ferrylink.tables.outbox import OutboxMessage
from ferrylink.telemetry import attached, producer_span

log = logging.getLogger(__name__)

TRANSFER_STATES_OVERFLOW = Counter(
    "ferrylink_transfer_states_overflow",
    "Transfer states rejected by the full transfer-states queue and dropped",
)
TRANSFER_STATES_RETRIED = Counter(
    "ferrylink_transfer_states_retried",
    "Transfer states nacked by the broker while their queue was not full, published again",
)

# rabbit_fifo (quorum queues): after an overflow, publishes are rejected until the queue holds
# fewer than trunc(bound * 0.8) ready messages.
SOFT_LIMIT_RATIO = 0.8
# How long a state may keep being rejected while its queue sits between the soft limit and
# the bound before it counts as an overflow (far longer than a leader election: ~1-5 s).
BAND_PATIENCE_SECONDS = 30.0
# A queue read at its bound is taken as still full for this long (a burst of nacks costs one
# read, not one each).
FULL_MEMORY_SECONDS = 1.0
RETRY_INITIAL_SECONDS = 0.25
RETRY_MAX_SECONDS = 5.0

Verdict = Literal["drop", "retry"]


# -- pure rules --------------------------------------------------------------------------------


def soft_limit(bound: int) -> int:
    return int(bound * SOFT_LIMIT_RATIO)


def verdict(depth: int | None, bound: int, rejected_for: float) -> Verdict:
    """What to do with a nacked state: its queue holds `depth` ready messages (None: could
    not be read), is bounded at `bound`, and has rejected this state for `rejected_for`
    seconds (0 at the first nack)."""
    if depth is None:
        return "retry"  # unreadable: a node or the leader is gone; not a verified overflow
    if depth >= bound:
        return "drop"
    if depth >= soft_limit(bound) and rejected_for >= BAND_PATIENCE_SECONDS:
        return "drop"
    return "retry"


def retry_delay(retries: int) -> float:
    """Wait before publishing a nacked state again for the `retries`-th time (1, 2, ...):
    0.25 s doubling, at most RETRY_MAX_SECONDS."""
    return float(min(RETRY_INITIAL_SECONDS * 2 ** min(max(retries - 1, 0), 16), RETRY_MAX_SECONDS))


# -- where a staged state goes -------------------------------------------------------------------


class StateOutlet(Protocol):
    """Staging a transfer state in the transaction of its leg, and sending it once committed."""

    def stage(self, session: Session, state: TransferState) -> Any: ...

    def prepare_many(self, states: Sequence[TransferState],
                     traces: Sequence[otel_context.Context]) -> list[Any]: ...  # fmt: skip

    def stage_prepared(self, connection: Connection, prepared: Sequence[Any]) -> list[Any]: ...

    def send(self, staged: Sequence[Any]) -> list[Future[Any]]: ...


class DirectOutlet:
    """No outbox: the state is published after the commit (the in-memory bus of unit tests)."""

    def __init__(self, publish: Callable[[TransferState | TransferStates], Future[Any]]) -> None:
        self.publish = publish

    def stage(self, session: Session, state: TransferState) -> TransferState:
        return state

    def prepare_many(self, states: Sequence[TransferState],
                     traces: Sequence[otel_context.Context]) -> list[Any]:  # fmt: skip
        return [TransferStates(states=chunk) for chunk, _traces in _chunks(states, traces)]

    def stage_prepared(self, connection: Connection, prepared: Sequence[Any]) -> list[Any]:
        return list(prepared)

    def send(self, staged: Sequence[Any]) -> list[Future[Any]]:
        return [self.publish(message) for message in staged]


def _chunks(
    states: Sequence[TransferState], traces: Sequence[otel_context.Context]
) -> Iterator[tuple[list[TransferState], list[otel_context.Context]]]:
    """The states (with their traces) in order, TRANSFER_STATES_PER_MESSAGE at a time."""
    if len(states) != len(traces):
        raise ValueError(f"{len(states)} states but {len(traces)} trace contexts")
    for start in range(0, len(states), TRANSFER_STATES_PER_MESSAGE):
        end = start + TRANSFER_STATES_PER_MESSAGE
        yield list(states[start:end]), list(traces[start:end])


@dataclass
class PendingState:
    """A state's outbox row, on its way to the broker."""

    row_id: int
    queue: str
    body: bytes
    message_id: str
    headers: dict[str, Any]
    outcome: Future[bool] = field(default_factory=Future)
    retries: int = 0
    first_nack: float | None = None  # monotonic


class TransferStatePublisher:
    """Publishes staged transfer states on its own connection (whose nacks are final, so the
    shared publisher of events never sees them) and settles each on a worker thread.

    `stage()` adds a state's outbox row to the caller's transaction; after the commit `send()`
    publishes it. Each returned future resolves to True once the broker stored the state, or
    False once it was dropped because its queue is full (counted); a state nacked for another
    reason is published again until one of those happens (the future waits). Confirmed and
    dropped rows are deleted in batches. `resend()` is the outbox relay's way in.
    """

    def __init__(
        self,
        publisher: Publisher,
        queue: Callable[[], str],
        engine: Engine,
        bound: int,
        amqp_urls: Sequence[str] = (),
        depth: Callable[[str], int | None] | None = None,
    ) -> None:
        self.publisher = publisher
        self.queue = queue  # shared, or the node's own in passive_legacy
        self.engine = engine
        self.bound = bound
        self._urls = list(amqp_urls)
        self._depth = depth or self._read_depth
        self._lock = threading.Lock()
        self._in_flight: dict[int, PendingState] = {}
        self._settled: queues.SimpleQueue[tuple[PendingState, BaseException | None]] = (
            queues.SimpleQueue()
        )
        self._retries: list[tuple[float, int, PendingState]] = []  # heap: (due, tiebreak, ..)
        self._tiebreak = itertools.count()
        self._full_until: dict[str, float] = {}
        self._to_delete: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="transfer-states", daemon=True)
        self.overflow = 0  # dropped: the queue was full
        self.retried = 0  # nacked while the queue was not full, published again
        self.stored = 0

    # -- staging and sending (any thread) ------------------------------------------------------

    def stage(self, session: Session, state: TransferState) -> PendingState:
        """Add `state` to the caller's transaction (the outbox); send it after the commit."""
        queue = self.queue()
        with producer_span("transfer-states", state.id) as headers:
            row = outbox.stage(session, queue, state.to_bytes(), state.id, headers)
        session.flush()  # the row's id, to delete it once settled
        assert row.id is not None
        return PendingState(row.id, queue, row.body, state.id, headers)

    def prepare_many(
        self, states: Sequence[TransferState], traces: Sequence[otel_context.Context]
    ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """The outbox rows (and their headers) of the states of a batch commit, made before
        its transaction: `TransferStates` messages of up to TRANSFER_STATES_PER_MESSAGE
        states. A message's PRODUCER span is in the trace of its first state and links the
        traces of the others (`traces`, one per state)."""
        queue = self.queue()
        prepared = []
        for chunk, chunk_traces in _chunks(states, traces):
            message = TransferStates(states=chunk)
            with attached(chunk_traces[0]), producer_span(
                "transfer-states", message.id, links=chunk_traces[1:]
            ) as headers:  # fmt: skip
                prepared.append((outbox.row(queue, message.to_bytes(), message.id, headers),
                                 headers))  # fmt: skip
        return prepared

    def stage_prepared(self, connection: Connection,
                       prepared: Sequence[tuple[dict[str, Any], dict[str, Any]]]
                       ) -> list[PendingState]:  # fmt: skip
        """Add `prepare_many`'s rows to the caller's Core transaction (one statement); send
        them once committed."""
        ids = outbox.stage_many(connection, [row for row, _headers in prepared])
        return [PendingState(row_id, row["routing_key"], row["body"], row["message_id"], headers)
                for row_id, (row, headers) in zip(ids, prepared, strict=True)]  # fmt: skip

    def send(self, staged: Sequence[PendingState]) -> list[Future[bool]]:
        """Publish committed states; their futures resolve once each is stored or dropped."""
        outcomes = []
        for pending in staged:
            with self._lock:
                current = self._in_flight.setdefault(pending.row_id, pending)
            if current is pending:
                self._publish(pending)
            outcomes.append(current.outcome)
        return outcomes

    def publish(self, state: TransferState) -> Future[bool]:
        """Stage `state` in a transaction of its own, commit, send."""
        with Session(self.engine) as session:
            pending = self.stage(session, state)
            session.commit()
        return self.send([pending])[0]

    def resend(self, rows: Iterable[OutboxMessage]) -> list[Future[bool]]:
        """The outbox relay: states left behind (a crash, a process stopped mid-retry), unless
        this process is still on them."""
        staged = [
            PendingState(row.id, row.routing_key, row.body, row.message_id,
                         json.loads(row.headers_json))
            for row in rows
            if row.id is not None
        ]  # fmt: skip
        return self.send(staged)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.publisher.start()
        self._thread.start()

    def close(self) -> None:
        """Stop; states not yet settled keep their outbox rows (the relay publishes them)."""
        self.publisher.close()  # fails the unconfirmed ones: settled below as "left"
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self._settle_all()
        self._delete_settled()
        with self._lock:
            left = list(self._in_flight.values())
            self._in_flight.clear()
        for pending in left:
            if not pending.outcome.done():
                pending.outcome.set_exception(RuntimeError("closed; left in the outbox"))

    # -- the worker ------------------------------------------------------------------------------

    def _publish(self, pending: PendingState) -> None:
        confirm = self.publisher.publish(
            "", pending.queue, pending.body, headers=pending.headers,
            message_id=pending.message_id,
        )  # fmt: skip
        # Runs on the publisher's I/O thread: hand over, never block there.
        confirm.add_done_callback(lambda done: self._settled.put((pending, done.exception())))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._settled.get(timeout=self._wait())
            except queues.Empty:
                first = None
            try:
                self._settle_all(first)
                self._retry_due()
                self._delete_settled()
            except Exception:  # never let the worker die: rows stay for the relay
                log.exception("transfer states: settling failed")

    def _wait(self) -> float:
        with self._lock:
            due = self._retries[0][0] if self._retries else None
        if due is None:
            return 0.5
        return max(0.0, min(0.5, due - time.monotonic()))

    def _settle_all(self, first: tuple[PendingState, BaseException | None] | None = None) -> None:
        batch = [first] if first is not None else []
        while True:
            try:
                batch.append(self._settled.get_nowait())
            except queues.Empty:
                break
        nacked: list[PendingState] = []
        for pending, error in batch:
            if error is None:
                self._done(pending, True)
            elif isinstance(error, PublishRejected):
                nacked.append(pending)
            else:  # the publisher is closed: the row stays for the relay
                self._forget(pending)
                if not pending.outcome.done():
                    pending.outcome.set_exception(error)
        if nacked:
            self._judge(nacked)

    def _judge(self, nacked: list[PendingState]) -> None:
        now = time.monotonic()
        depths: dict[str, int | None] = {}
        for pending in nacked:
            if pending.first_nack is None:
                pending.first_nack = now
            if pending.queue not in depths:
                if self._full_until.get(pending.queue, 0.0) > now:
                    depths[pending.queue] = self.bound
                else:
                    depths[pending.queue] = self._depth(pending.queue)
                    if (depths[pending.queue] or 0) >= self.bound:
                        self._full_until[pending.queue] = now + FULL_MEMORY_SECONDS
            depth = depths[pending.queue]
            if verdict(depth, self.bound, now - pending.first_nack) == "drop":
                self._count_overflow(pending, depth)
                self._done(pending, False)
            else:
                pending.retries += 1
                with self._lock:
                    self.retried += 1
                    heapq.heappush(self._retries, (now + retry_delay(pending.retries),
                                                   next(self._tiebreak), pending))  # fmt: skip
                TRANSFER_STATES_RETRIED.inc()
                if pending.retries == 1 or pending.retries % 10 == 0:
                    log.info("transfer state %s nacked (%s ready in %s, bound %d): publishing "
                             "it again (try %d)", pending.message_id,
                             "?" if depth is None else depth, pending.queue, self.bound,
                             pending.retries + 1)  # fmt: skip

    def _retry_due(self) -> None:
        now = time.monotonic()
        due: list[PendingState] = []
        with self._lock:
            while self._retries and self._retries[0][0] <= now:
                due.append(heapq.heappop(self._retries)[2])
        for pending in due:
            self._publish(pending)

    def _done(self, pending: PendingState, stored: bool) -> None:
        self._forget(pending)
        with self._lock:
            self._to_delete.append(pending.row_id)
            if stored:
                self.stored += 1
        if not pending.outcome.done():
            pending.outcome.set_result(stored)

    def _forget(self, pending: PendingState) -> None:
        with self._lock:
            self._in_flight.pop(pending.row_id, None)

    def _delete_settled(self) -> None:
        with self._lock:
            ids, self._to_delete = self._to_delete, []
        if not ids:
            return
        try:
            with writing(self.engine), Session(self.engine) as session:
                session.exec(delete(OutboxMessage).where(col(OutboxMessage.id).in_(ids)))
                session.commit()
        except INFRASTRUCTURE_ERRORS as exc:
            # Next round; meanwhile the relay may publish them again (a harmless repeat).
            log.warning("transfer states: cannot delete %d settled outbox row(s): %s",
                        len(ids), exc)  # fmt: skip
            with self._lock:
                self._to_delete.extend(ids)

    def _read_depth(self, queue: str) -> int | None:
        """Ready messages in `queue` (a passive declare), or None if the broker cannot say."""
        if not self._urls:
            return None
        try:
            connection = connect_blocking(self._urls, deadline=time.monotonic() + 3)
        except CONNECTION_ERRORS:
            return None
        try:
            count: int = (
                connection.channel().queue_declare(queue, passive=True).method.message_count
            )
            return count
        except (*CONNECTION_ERRORS, pika.exceptions.AMQPError):
            return None
        finally:
            try:
                connection.close()
            except Exception:
                pass

    def _count_overflow(self, pending: PendingState, depth: int | None) -> None:
        with self._lock:
            self.overflow += 1
            total = self.overflow
        TRANSFER_STATES_OVERFLOW.inc()
        # The 1st, 2nd, 4th, 8th... and every 1000th: visible without flooding the log.
        if total & (total - 1) == 0 or total % 1000 == 0:
            log.warning(
                "%s is full (%s ready, bound %d): dropped transfer state %s (%d dropped so far)",
                pending.queue,
                depth,
                self.bound,
                pending.message_id,
                total,
            )
