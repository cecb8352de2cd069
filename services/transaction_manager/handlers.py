"""Event handlers of the transaction manager: validate, claim, then dispatch by kind.

Exactly once, even when copies of an event run at the same time (a re-published unconfirmed
message, a scheduler re-publishing a run, an overlap around a failover):
- the event is claimed (claims.py) before any side effect; a copy that finds the claim held
  is parked in a delay queue (RetryLater) and comes back later, by when the work is done;
- a completed event has a `processed_event` row (committed with the claim's release), and
  the work of a half-done one is resumed step by step (routing.py).

Batches: `handle_batch` takes the events that waited together (the consumer hands over what
it has prefetched). File arrivals whose route has local steps only are claimed in one
statement and routed together (routing.py: one transaction per round of commits, not per
event); the others - pushes (long, external), scheduled transfers, maintenance, a second
copy of an event in the same batch - run one at a time as before, on a pool as wide as the
consumer's workers. Each event keeps its own outcome: one that fails is settled alone and
never fails or repeats the others.

Failures: attempts are counted here, per event, only when the handler ran and failed for a
reason of the event's own; after `event_attempts` the event is dead-lettered with its
reason. Infrastructure trouble (database locked or unreachable, broker) is retried with
exponential backoff through the delay queues and never counted, so an outage parks nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, assert_never

from opentelemetry import trace
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col

from ferrylink import errors as ferrylink_errors
from ferrylink.clock import as_utc, utcnow
from ferrylink.contracts import (
    Event,
    FileArrived,
    JobRunStatus,
    MaintenanceRun,
    RejectMessage,
    RetryLater,
    TransferScheduled,
)
from ferrylink.db import writing
from ferrylink.faults import fault_point
from ferrylink.messaging import backoff
from ferrylink.metrics import EVENT_BATCH_SIZE, EVENT_LATENCY_SECONDS
from ferrylink.runtime import Received
from ferrylink.tables.events import ProcessedEvent
from ferrylink.tables.scheduling import JobRun
from ferrylink.telemetry import attached
from services.transaction_manager import claims
from services.transaction_manager.purges import Removed
from services.transaction_manager.routing import Config, RouteRunner

log = logging.getLogger(__name__)
tracer = trace.get_tracer("ferrylink.transaction-manager")

# Errors of the infrastructure, not of the event: retried without counting.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    *ferrylink_errors.INFRASTRUCTURE_ERRORS,
    claims.ClaimLost,
)


class EventHandler:
    """Reacts to every event on the event queue (shared, or the node's own)."""

    def __init__(
        self,
        engine: Engine,
        node_id: str,
        routes: RouteRunner,
        data_dir: Path,
        publish: Callable[[FileArrived], Future[None]],
        claim_seconds: float = 60.0,
        max_attempts: int = 5,
        state_dir: Path | None = None,
        workers: int = 4,
    ) -> None:
        self.engine = engine
        self.state_dir = state_dir  # this server's own files (passive_legacy link data)
        self.node_id = node_id
        self.routes = routes
        self.data_dir = data_dir
        self.publish = publish
        self.claim_seconds = claim_seconds
        self.claim_keeper = claims.ClaimKeeper(engine, claim_seconds)
        self.max_attempts = max_attempts
        # Events of a batch that run one at a time (pushes, scheduled work), side by side.
        self._alone = ThreadPoolExecutor(workers, thread_name_prefix="event")

    def handle(self, event: Event) -> bool:
        """Claim and complete `event` once; False if it had been completed before. Raises
        RetryLater (another copy holds it, or the infrastructure failed: the consumer backs
        off) or RejectMessage (it can never succeed, or it failed `max_attempts` times)."""
        with tracer.start_as_current_span("handle event") as span:
            span.set_attribute("ferrylink.event_id", event.id)
            span.set_attribute("ferrylink.event_kind", event.kind)
            span.set_attribute("ferrylink.cycle_id", event.cycle_id)
            try:
                done = self._claimed(event)
            except RejectMessage as exc:
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)[:500]))
                raise
        if done:
            self._observe(event)
        fault_point("after-commit-before-ack")
        return done

    @staticmethod
    def _observe(event: Event) -> None:
        latency = (datetime.now(UTC) - as_utc(event.created_at)).total_seconds()
        EVENT_LATENCY_SECONDS.labels(kind=event.kind).observe(max(0.0, latency))

    def handle_batch(self, items: Sequence[Received[Event]]) -> list[bool | Exception]:
        """Handle events that waited together; per event, what `handle` returns (True, or
        False if it had been completed before) or the RetryLater / RejectMessage it raises,
        for the consumer to settle that event by."""
        outcomes: list[bool | Exception] = [False] * len(items)
        try:
            config = self.routes.config()
        except INFRASTRUCTURE_ERRORS as exc:
            reason = f"infrastructure: cannot read the routes: {_short(exc)}"
            return [RetryLater(reason, None) for _ in items]
        together: dict[str, int] = {}
        alone: list[int] = []
        copies: list[int] = []  # a second copy in the batch: after the first, finds it done
        for i, item in enumerate(items):
            event = item.message
            if event.id in together:
                copies.append(i)
            elif isinstance(event, FileArrived) and config.batched(event):
                together[event.id] = i
            else:
                alone.append(i)
        running = {i: self._alone.submit(self._handle_alone, items[i]) for i in alone}
        if together:
            results = self._handle_together([items[i] for i in together.values()], config)
            for event_id, i in together.items():
                outcomes[i] = results[event_id]
        for i in copies:
            outcomes[i] = self._handle_alone(items[i])
        for i, future in running.items():
            outcomes[i] = future.result()
        return outcomes

    def _handle_alone(self, item: Received[Event]) -> bool | Exception:
        with attached(item.trace):
            try:
                return self.handle(item.message)
            except Exception as exc:
                return exc

    def _handle_together(self, items: Sequence[Received[Event]], config: Config
                         ) -> dict[str, bool | Exception]:  # fmt: skip
        """Claim file arrivals (distinct ids) in one statement and route them together."""
        events = [item.message for item in items]
        assert all(isinstance(event, FileArrived) for event in events)
        owner = claims.new_owner(self.node_id)
        ids = [event.id for event in events]
        outcomes: dict[str, bool | Exception] = {}
        try:
            with writing(self.engine):
                claimed = claims.take_many(self.engine, ids, owner, self.claim_seconds)
            held = [event_id for event_id in ids if event_id not in claimed]
            done = self._processed_among(held)
        except INFRASTRUCTURE_ERRORS as exc:
            return {event_id: RetryLater(f"cannot claim: {_short(exc)}", None) for event_id in ids}
        for event_id in held:
            outcomes[event_id] = (
                False
                if event_id in done
                else RetryLater("another copy of the event holds its claim", None)
            )
        mine = [item for item in items if item.message.id in claimed]
        if not mine:
            return outcomes
        with self.claim_keeper.holding(owner, claimed):
            self._route_claimed(mine, owner, config, outcomes)
        fault_point("after-commit-before-ack", len(mine))
        return outcomes

    def _route_claimed(self, mine: Sequence[Received[Event]], owner: str, config: Config,
                       outcomes: dict[str, bool | Exception]) -> None:  # fmt: skip
        """Route the claimed file arrivals `mine` together; each one's outcome into
        `outcomes`."""
        fault_point("after-claim", len(mine))
        EVENT_BATCH_SIZE.observe(len(mine))
        results = self.routes.process_batch(
            [item.message for item in mine if isinstance(item.message, FileArrived)], owner,
            [item.trace for item in mine], config,
        )  # fmt: skip
        late = []  # copies of completed events: nothing of ours to keep
        for item in mine:
            event = item.message
            result = results[event.id]
            if isinstance(result, Exception):
                outcomes[event.id] = self._failed(event, owner, result)
            else:
                outcomes[event.id] = result
                if result:
                    self._observe(event)
                else:
                    late.append(event.id)
        try:
            claims.drop_many(self.engine, late, owner)
        except INFRASTRUCTURE_ERRORS as exc:  # they expire, and the purge removes them
            log.warning("could not drop the claims of %d late copies: %s", len(late), _short(exc))

    def _claimed(self, event: Event) -> bool:
        owner = claims.new_owner(self.node_id)
        try:
            if not claims.take(self.engine, event.id, owner, self.claim_seconds):
                if self._processed(event.id):
                    return False
                raise RetryLater("another copy of the event holds its claim", None)
        except INFRASTRUCTURE_ERRORS as exc:
            raise RetryLater(f"cannot claim: {_short(exc)}", None) from exc
        fault_point("after-claim")
        with self.claim_keeper.holding(owner, [event.id]):
            try:
                done = self.process(event, owner)
            except Exception as exc:
                error = self._failed(event, owner, exc)
                if error is exc:
                    raise
                raise error from exc
            if not done:  # a late copy of a completed event: nothing of ours to keep
                self._drop(event.id, owner)
        return done

    def _failed(self, event: Event, owner: str, exc: Exception) -> Exception:
        """What a claimed event that failed with `exc` is settled by: RetryLater (the claim
        released, an attempt counted if the failure is the event's own) or RejectMessage."""
        if isinstance(exc, RejectMessage | RetryLater):
            self._release(event.id, owner)
            return exc
        if isinstance(exc, INFRASTRUCTURE_ERRORS):
            if not isinstance(exc, claims.ClaimLost):
                self._release(event.id, owner)
            log.warning("event %s: %s; retrying", event.id, _short(exc))
            return _caused(RetryLater(f"infrastructure: {_short(exc)}", None), exc)
        reason = f"{type(exc).__name__}: {_short(exc)}"
        try:
            attempts = claims.count_failure(self.engine, event.id, owner, reason)
        except INFRASTRUCTURE_ERRORS:
            return _caused(RetryLater(f"{reason} (attempt not counted)", None), exc)
        if attempts >= self.max_attempts:
            return _caused(RejectMessage(f"failed {attempts} time(s): {reason}"), exc)
        log.warning("event %s failed (attempt %d): %s", event.id, attempts, reason)
        return _caused(RetryLater(f"attempt {attempts} failed: {reason}", backoff(attempts)), exc)

    def process(self, event: Event, owner: str) -> bool:
        """Complete a claimed `event`; False if it had been completed before."""
        match event:
            case FileArrived():
                return self.routes.process(event, owner)
            case TransferScheduled():
                # Imported on first use: partner transfers bring asyncssh (~15 MB), which a
                # transaction manager that never runs a scheduled transfer need not hold.
                from services.transaction_manager import scheduled

                scheduled.run_scheduled_transfer(
                    event, self.engine, self.data_dir, self.node_id, self.publish, self.routes.log
                )
                return self._complete(event, owner)
            case MaintenanceRun():
                from services.transaction_manager import scheduled

                result = scheduled.run_maintenance(event, self.engine, self.data_dir,
                                                   self.node_id, self.state_dir)  # fmt: skip
                return self._complete(event, owner, result)
            case _:
                assert_never(event)

    def _processed(self, event_id: str) -> bool:
        with Session(self.engine) as session:
            return session.get(ProcessedEvent, event_id) is not None

    def _drop(self, event_id: str, owner: str) -> None:
        try:
            claims.drop(self.engine, event_id, owner)
        except INFRASTRUCTURE_ERRORS as exc:  # it expires, and the purge removes it
            log.warning("could not drop the claim of %s: %s", event_id, _short(exc))

    def _processed_among(self, event_ids: Sequence[str]) -> set[str]:
        if not event_ids:
            return set()
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(col(ProcessedEvent.event_id)).where(
                    col(ProcessedEvent.event_id).in_(event_ids)
                )
            )
            return set(rows.scalars())

    def _release(self, event_id: str, owner: str) -> None:
        try:
            claims.release(self.engine, event_id, owner)
        except INFRASTRUCTURE_ERRORS as exc:  # it expires by itself
            log.warning("could not release the claim of %s: %s", event_id, _short(exc))

    def _complete(
        self, event: TransferScheduled | MaintenanceRun, owner: str, result: Removed | None = None
    ) -> bool:
        """Mark a scheduled run's event completed, and its job run done (with what a
        maintenance run removed), in one transaction."""
        with Session(self.engine) as session:
            if session.get(ProcessedEvent, event.id) is not None:
                return False
            session.add(
                ProcessedEvent(
                    event_id=event.id,
                    kind=event.kind,
                    node_id=self.node_id,
                    processed_at=time.time(),
                )
            )
            done: dict[str, Any] = {"status": JobRunStatus.DONE, "finished_at": utcnow()}
            if result is not None:
                done |= {"removed": result.total, "result": result.summary()[:1000]}
            session.exec(
                update(JobRun)
                .where(col(JobRun.job_id) == event.job_id, col(JobRun.event_id) == event.id)
                .values(**done)
            )  # fmt: skip
            claims.finish(session, event.id, owner)
            session.commit()
        return True


def _caused(error: Exception, cause: Exception) -> Exception:
    error.__cause__ = cause
    return error


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
