"""Nothing grows forever: the purges of the bookkeeping tables, run as maintenance kinds
(ferrylink.contracts: JobRunPurge, ScheduledFilePurge, EventClaimPurge, OutboxPurge,
SentinelLinkPurge; the transfer log, audit log and dead letters have theirs in scheduled.py).

Each removes only rows that are finished and older than its cutoff (counted from the run's
fire time, so a repeated run acts on the same rows), in batches of `BATCH` rows per
transaction (a purge never holds SQLite's write lock, or many PostgreSQL row locks, for
long), and returns how many rows it removed per table (recorded in the job run).

What "finished" means is table by table; each rule is stated where it is applied. The one
that matters most for exactly-once: a row that keeps a repeated message from acting twice
(an event's `processed_event` row, a sentinel record) is removed only when no copy of that
message can come back; the age (at least a day) must exceed the redelivery window, and
whatever is still pending (a claimed job run, an outbox row, a kept dead letter, a fetched
file not yet announced, a failed transfer that may be resubmitted) is kept explicitly.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import String, and_, cast, exists, func, or_
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, delete, select

from ferrylink.clock import utcnow
from ferrylink.contracts import JobRunStatus, ScheduledFileStatus, TransferStatus
from ferrylink.tables.events import DeadEvent, EventClaim, ProcessedEvent
from ferrylink.tables.outbox import OutboxMessage
from ferrylink.tables.scheduling import JobRun, ScheduledFile, ScheduledJob
from ferrylink.tables.sentinel import (
    SentinelCycle,
    SentinelDelivery,
    SentinelEndpoint,
    SentinelLeg,
    SentinelRecord,
)
from ferrylink.tables.transfers import StepRun, Transfer

log = logging.getLogger(__name__)

BATCH = 1000


@dataclass
class Removed:
    """Rows (or files) a maintenance run removed, per table."""

    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, table: str, count: int) -> Removed:
        return cls({table: count})

    def add(self, table: str, count: int) -> None:
        self.counts[table] = self.counts.get(table, 0) + count

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{table} {count}" for table, count in self.counts.items())


def delete_batched(engine: Engine, key: Any, *conditions: Any) -> int:
    """Delete the rows of `key`'s table that meet `conditions`, BATCH keys per transaction;
    how many were deleted."""
    table = key.class_
    total = 0
    while True:
        with Session(engine) as session:
            keys = list(session.exec(select(key).where(*conditions).limit(BATCH)).all())
            if not keys:
                return total
            result = session.exec(delete(table).where(key.in_(keys)))
            session.commit()
            total += int(result.rowcount or 0)
        if len(keys) < BATCH:
            return total


# -- job runs ------------------------------------------------------------------------------------


def purge_job_runs(engine: Engine, cutoff: datetime) -> Removed:
    """Delete job runs fired before `cutoff` that are finished: submitted (its event is on the
    queue; the event's own id keeps it from running twice), done or missed.

    Kept: a claimed run (its event is not confirmed yet and is published again from this
    row), and each job's latest run (the scheduler resumes a job after its last recorded
    run; without it a restarted scheduler could claim an old fire time again)."""
    later = aliased(JobRun)
    newer = exists().where(
        col(later.job_id) == col(JobRun.job_id), col(later.fire_time) > col(JobRun.fire_time)
    )
    finished = (JobRunStatus.SUBMITTED, JobRunStatus.DONE, JobRunStatus.MISSED)
    removed = Removed()
    removed.add(
        "job_run",
        delete_batched(engine, JobRun.id, col(JobRun.fire_time) < cutoff,
                       col(JobRun.status).in_(finished), newer),
    )  # fmt: skip
    return removed


# -- scheduled files -----------------------------------------------------------------------------


def purge_scheduled_files(engine: Engine, cutoff: datetime) -> Removed:
    """Delete records of scheduled transfers done before `cutoff` that no run needs again.

    A record is the only memory that a version (name, size, mtime) of a file was
    transferred: while that version is still at its source, a later run would transfer it
    again without it. So only these go: a pull whose file was removed at the partner, a push
    whose local file was deleted (the version is gone at its source), and any record of a
    job that no longer exists (ids are never reused), except a fetched file not yet
    announced (its `file.arrived` is published from the record)."""
    gone = col(ScheduledFile.status).in_((ScheduledFileStatus.REMOVED, ScheduledFileStatus.DELETED))
    orphan = and_(
        col(ScheduledFile.status) != ScheduledFileStatus.FETCHED,
        col(ScheduledFile.job_id).not_in(select(cast(col(ScheduledJob.id), String))),
    )
    removed = Removed()
    removed.add(
        "scheduled_file",
        delete_batched(engine, ScheduledFile.id, col(ScheduledFile.done_at) < cutoff,
                       or_(gone, orphan)),
    )  # fmt: skip
    return removed


# -- events: processed marks, step runs, claims --------------------------------------------------


def _copies_may_come(event_id: Any) -> list[Any]:
    """Conditions on an event id: no copy of the event can come back through any of the
    ways one is pending (each a reason to keep its exactly-once bookkeeping)."""
    return [
        # a kept dead letter may be replayed (a copy parked by the broker's backstop)
        col(event_id).not_in(select(DeadEvent.id)),
        # a claimed job run is published again until confirmed
        col(event_id).not_in(select(JobRun.event_id).where(JobRun.status == JobRunStatus.CLAIMED)),
        # an outbox row (an upload's event, a resubmit) is published until confirmed
        col(event_id).not_in(select(OutboxMessage.message_id)),
        # a fetched file's file.arrived is published again until confirmed
        col(event_id).not_in(
            select(ScheduledFile.arrived_event_id).where(
                ScheduledFile.status == ScheduledFileStatus.FETCHED,
                col(ScheduledFile.arrived_event_id).is_not(None),
            )
        ),
        # a failed transfer still in the transfer log may be resubmitted: it resumes from its
        # step runs (resubmit.py); it goes with the transfer log's own purge
        col(event_id).not_in(
            select(Transfer.event_id).where(
                Transfer.leg == "route", Transfer.status == TransferStatus.FAILED
            )
        ),
    ]


def purge_event_records(engine: Engine, cutoff: datetime) -> Removed:
    """The exactly-once bookkeeping of events.

    - `processed_event` is what keeps a repeated event from running again (a redelivery, a
      re-published message, a copy after a failover finds it and does nothing). Removed,
      with the event's step runs, only for events completed before `cutoff` of which no
      copy can still come (`_copies_may_come`). Rule: the age must exceed the longest a copy
      of an event can wait unseen (delay queues: 30 s; a passive_legacy server's own queue
      while that server is down).
    - `event_claim` only keeps two copies from acting at once while an owner holds it; an
      expired claim excludes no one. Removed once no one held it for the age (expiry, or
      release, before `cutoff` on the database clock); a claim being held or retried is
      never that old. What goes with it is the event's attempt count.
    - step runs of an event never completed (dead-lettered, abandoned): removed once the
      event has no claim, no kept dead letter and no outbox row, and they are older than
      `cutoff`; while any of those remains, a replay or redelivery resumes from them."""
    limit = cutoff.timestamp()
    removed = Removed()
    keep = _copies_may_come(ProcessedEvent.event_id)
    while True:
        with Session(engine) as session:
            ids = list(
                session.exec(
                    select(ProcessedEvent.event_id)
                    .where(col(ProcessedEvent.processed_at) < limit, *keep)
                    .limit(BATCH)
                ).all()
            )
            if not ids:
                break
            steps = session.exec(delete(StepRun).where(col(StepRun.event_id).in_(ids)))
            done = session.exec(delete(ProcessedEvent).where(col(ProcessedEvent.event_id).in_(ids)))
            session.commit()
        removed.add("processed_event", int(done.rowcount or 0))
        removed.add("step_run", int(steps.rowcount or 0))
        if len(ids) < BATCH:
            break
    claims = delete_batched(engine, EventClaim.event_id, col(EventClaim.expires_at) < limit)
    removed.add("event_claim", claims)
    # Step runs of events never completed, now that their claims may be gone too.
    orphan = [
        col(StepRun.finished_at) < cutoff,
        col(StepRun.event_id).not_in(select(ProcessedEvent.event_id)),
        col(StepRun.event_id).not_in(select(EventClaim.event_id)),
        col(StepRun.event_id).not_in(select(DeadEvent.id)),
        col(StepRun.event_id).not_in(select(OutboxMessage.message_id)),
    ]
    while True:
        with Session(engine) as session:
            ids = list(session.exec(select(StepRun.event_id).where(*orphan).distinct()
                                    .limit(BATCH)).all())  # fmt: skip
            if not ids:
                break
            steps = session.exec(delete(StepRun).where(col(StepRun.event_id).in_(ids), *orphan))
            session.commit()
        removed.add("step_run", int(steps.rowcount or 0))
        if len(ids) < BATCH:
            break
    return removed


# -- the outbox ----------------------------------------------------------------------------------


def park_stuck_outbox(engine: Engine, cutoff: datetime) -> Removed:
    """Outbox rows leave the outbox when the broker confirms them (or, for a transfer state,
    when its full queue dropped it), so no finished row stays. A row staged before `cutoff`
    is one no relay could publish in all that time (its queue is gone, say; the broker
    itself works: this run came through it). It is not deleted unseen: it moves to the dead
    letters with the reason (`GET /events/dead`, replayable), in the same transaction."""
    limit = cutoff.timestamp()
    removed = Removed()
    while True:
        with Session(engine) as session:
            rows = list(
                session.exec(
                    select(OutboxMessage)
                    .where(col(OutboxMessage.created_at) < limit)
                    .order_by(col(OutboxMessage.id))
                    .limit(BATCH)
                ).all()
            )
            if not rows:
                break
            for row in rows:
                _park(session, row)
                session.delete(row)
            session.commit()
        removed.add("outbox", len(rows))
        log.warning("outbox: %d message(s) never published moved to the dead letters", len(rows))
        if len(rows) < BATCH:
            break
    return removed


def _park(session: Session, row: OutboxMessage) -> None:
    key = row.message_id
    if len(key) > 64:  # DeadEvent ids are at most 64 characters
        key = "sha256-" + hashlib.sha256(key.encode()).hexdigest()[:57]
    dead = session.get(DeadEvent, key)
    if dead is not None and dead.replayed_at is None:
        return  # the same message is a dead letter already
    staged = datetime.fromtimestamp(row.created_at, tz=utcnow().tzinfo)
    dead = dead or DeadEvent(id=key, queue=row.routing_key, body=row.body)
    dead.reason = f"outbox: never published to {row.routing_key} since {staged.isoformat()}"[:1000]
    dead.headers_json = row.headers_json
    dead.dead_at = utcnow()
    dead.replayed_at = None
    session.add(dead)


# -- sentinel link data --------------------------------------------------------------------------


def purge_sentinel_link(engine: Engine, links: Sequence[Engine], cutoff: datetime) -> Removed:
    """Delete the link data (cycle, legs, records) of cycles linked last before `cutoff` of
    which every record is behind every endpoint's position in the record log (delivered, or
    dropped by its bounds). `links` are where link data lives: the shared database, and in
    passive_legacy this server's own file.

    A record's id is the sentinel link's dedup key for a repeated state, and a cycle's row
    numbers its records: both may go once the cycle is quiet for longer than any state can
    be repeated (the outbox relay, a redelivery). Kept: a cycle whose failed transfer may be
    resubmitted (its route leg FAILED in the transfer log of `engine`), so a resubmit
    goes on with the cycle's numbering; a cycle active again after its purge starts over at
    seq 1."""
    limit = cutoff.timestamp()
    removed = Removed()
    with Session(engine) as session:
        endpoint_ids = list(session.exec(select(SentinelEndpoint.id)).all())
    for link in links:
        with Session(link) as session:
            # The lowest position of an endpoint (a deleted endpoint's row does not hold
            # records back); without one, no record is waiting.
            lowest = session.exec(
                select(func.min(SentinelDelivery.through_pos)).where(
                    col(SentinelDelivery.endpoint_id).in_(endpoint_ids)
                )
            ).one()
        quiet = [col(SentinelCycle.updated_at) < limit]
        if lowest is not None:
            waiting = select(SentinelRecord.id).where(
                col(SentinelRecord.cycle_id) == col(SentinelCycle.cycle_id),
                col(SentinelRecord.pos) > lowest,
            )
            quiet.append(~waiting.exists())
        after = ""
        while True:
            with Session(link) as session:
                candidates = list(
                    session.exec(
                        select(SentinelCycle.cycle_id)
                        .where(col(SentinelCycle.cycle_id) > after, *quiet)
                        .order_by(col(SentinelCycle.cycle_id))
                        .limit(BATCH)
                    ).all()
                )
            if not candidates:
                break
            after = candidates[-1]
            with Session(engine) as session:
                resubmittable = set(
                    session.exec(
                        select(Transfer.cycle_id).where(
                            col(Transfer.cycle_id).in_(candidates),
                            Transfer.leg == "route",
                            Transfer.status == TransferStatus.FAILED,
                        )
                    ).all()
                )
            ids = [c for c in candidates if c not in resubmittable]
            if ids:
                with Session(link) as session:
                    # The conditions again, in the deleting statement: a state linked since
                    # the candidates were read keeps its cycle.
                    cycles = list(
                        session.execute(
                            delete(SentinelCycle)
                            .where(col(SentinelCycle.cycle_id).in_(ids), *quiet)
                            .returning(col(SentinelCycle.cycle_id))
                        ).scalars()
                    )
                    if cycles:
                        records = session.exec(
                            delete(SentinelRecord).where(col(SentinelRecord.cycle_id).in_(cycles))
                        )
                        legs = session.exec(
                            delete(SentinelLeg).where(col(SentinelLeg.cycle_id).in_(cycles))
                        )
                        removed.add("sentinel_record", int(records.rowcount or 0))
                        removed.add("sentinel_leg", int(legs.rowcount or 0))
                    session.commit()
                removed.add("sentinel_cycle", len(cycles))
            if len(candidates) < BATCH:
                break
    return removed
