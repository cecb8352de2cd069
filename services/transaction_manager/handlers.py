"""Event handlers of the transaction manager: validate, claim, then dispatch by kind.

Exactly once, even when copies of an event run at the same time (a re-published unconfirmed
message, a scheduler re-publishing a run, an overlap around a failover):
- the event is claimed (claims.py) before any side effect; a copy that finds the claim held
  is parked in a delay queue (RetryLater) and comes back later, by when the work is done;
- a completed event has a `processed_event` row (committed with the claim's release), and
  the work of a half-done one is resumed step by step (routing.py).

Failures: attempts are counted here, per event, only when the handler ran and failed for a
reason of the event's own; after `event_attempts` the event is dead-lettered with its
reason. Infrastructure trouble (database locked or unreachable, broker) is retried with
exponential backoff through the delay queues and never counted, so an outage parks nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, assert_never

from opentelemetry import trace
from sqlalchemy import update
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
from ferrylink.faults import fault_point
from ferrylink.messaging import backoff
from ferrylink.metrics import EVENT_LATENCY_SECONDS
from ferrylink.models import JobRun, ProcessedEvent
from services.transaction_manager import claims
from services.transaction_manager.purges import Removed
from services.transaction_manager.routing import RouteRunner

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
    ) -> None:
        self.engine = engine
        self.state_dir = state_dir  # this server's own files (passive_legacy link data)
        self.node_id = node_id
        self.routes = routes
        self.data_dir = data_dir
        self.publish = publish
        self.claim_seconds = claim_seconds
        self.max_attempts = max_attempts

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
            latency = (datetime.now(UTC) - as_utc(event.created_at)).total_seconds()
            EVENT_LATENCY_SECONDS.labels(kind=event.kind).observe(max(0.0, latency))
        fault_point("after-commit-before-ack")
        return done

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
        try:
            done = self.process(event, owner)
            if not done:  # a late copy of a completed event: nothing of ours to keep
                self._drop(event.id, owner)
            return done
        except (RejectMessage, RetryLater):
            self._release(event.id, owner)
            raise
        except INFRASTRUCTURE_ERRORS as exc:
            if not isinstance(exc, claims.ClaimLost):
                self._release(event.id, owner)
            log.warning("event %s: %s; retrying", event.id, _short(exc))
            raise RetryLater(f"infrastructure: {_short(exc)}", None) from exc
        except Exception as exc:
            reason = f"{type(exc).__name__}: {_short(exc)}"
            try:
                attempts = claims.count_failure(self.engine, event.id, owner, reason)
            except INFRASTRUCTURE_ERRORS:
                raise RetryLater(f"{reason} (attempt not counted)", None) from exc
            if attempts >= self.max_attempts:
                raise RejectMessage(f"failed {attempts} time(s): {reason}") from exc
            log.warning("event %s failed (attempt %d): %s", event.id, attempts, reason)
            raise RetryLater(f"attempt {attempts} failed: {reason}", backoff(attempts)) from exc

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


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
